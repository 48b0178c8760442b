"""Student replicas (`student_urls`): two real hf student services, sharing one checkpoint root, serve one run.

Each step's prompts are split across the replicas and sampled at once; every replica loads every version and
is checked on it; two replicas sample exactly what one does; a replica that goes away mid-run is waited for,
and one that comes back on its base weights (version 0) is given the run's current weights. Also: the config
takes `student_url` or `student_urls`, never both or neither, and a replica on another tokenizer is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opd.common import protocol as p
from opd.common.client import StudentClient
from opd.common.errors import TokenizerMismatch
from opd.common.process import ServiceProcess
from opd.trainer.config import ConfigError, RunConfig, build_config
from opd.trainer.data import PromptRow
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from opd.trainer.remote import Remote
from opd.trainer.rollouts import sample
from tests.trainer.runs import base_run, build, hf_args, start_service, started, wait_all

pytestmark = pytest.mark.slow


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replica-checkpoints")


@pytest.fixture(scope="module")
def stack(teacher_model: Path, student_model: Path, root: Path, service_logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    """An hf teacher and two hf student replicas with one checkpoint root; a test may replace a replica (same port)."""
    with started(service_logs, teacher=("teacher", hf_args("teacher", teacher_model)),
                 a=("student", hf_args("student", student_model, root)),
                 b=("student", hf_args("student", student_model, root))) as running:
        yield running


@pytest.fixture
def make(stack: dict[str, ServiceProcess], student_model: Path, prompts_file: Path, root: Path,
         tmp_path: Path) -> Callable[..., RunConfig]:
    """A short LoRA run on the replicas (both unless `students` says which); `a__b=value` overrides `a.b`."""

    def config(students: tuple[str, ...] = ("a", "b"), **overrides) -> RunConfig:
        urls = {"teacher_urls": [stack["teacher"].url], "student_urls": [stack[s].url for s in students]}
        return build(base_run(student_model, prompts_file, tmp_path / "run", root, urls), {
            "name": "replicas",
            "dataset": {"eval_size": 5},
            "sampling": {"prompts_per_step": 7, "samples_per_prompt": 2, "max_tokens": 12},
            "steps": 3,
            "seed": 5,
            "services": {"retries": 1, "max_backoff_s": 1},
        }, **overrides)

    return config


def versions(stack: dict[str, ServiceProcess]) -> list[int | None]:
    return [StudentClient(stack[s].url).info().policy_version for s in ("a", "b")]


def test_two_replicas_serve_a_run_each_on_every_version(make, stack: dict[str, ServiceProcess]) -> None:
    """Every publish leaves both replicas on the new version; each step's prompts reach both replicas (7 prompts:
    4 and 3), and the run's samples come back whole, in prompt order."""
    seen: list[tuple[int, list[int | None]]] = []
    shares: list[list[tuple[str, int, int]]] = []

    class Watched(Trainer):
        def publish(self, *args, **kwargs):
            super().publish(*args, **kwargs)
            seen.append((self.version, versions(stack)))

    config = make()
    trainer = Watched(config)
    asked = trainer.remote.rollouts

    def spy(request):
        answer = asked(request)
        shares.append([(s.url, s.first, len(s.response.rollouts)) for s in answer])
        return answer

    trainer.remote.rollouts = spy
    assert trainer.run() == "completed"
    assert len(seen) == 2 + 3, "the base and the start weights, then a version per step"
    for version, served in seen:
        assert served == [version, version], f"a replica missed version {version}: {served}"
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["policy_version"] for r in train] == [v for v, _ in seen[2:]]
    assert versions(stack) == [train[-1]["policy_version"]] * 2
    a, b = stack["a"].url, stack["b"].url
    steps = [s for s in shares if sum(n for *_, n in s) == 7 * 2]
    assert len(steps) == 3 and all(s == [(a, 0, 8), (b, 4, 6)] for s in steps), shares
    evals = [s for s in shares if sum(n for *_, n in s) == 5]
    assert len(evals) == 2 and all(s == [(a, 0, 3), (b, 3, 2)] for s in evals), "held-out prompts split too"
    assert all(r["sequences"] == 14 for r in train) and [r["step"] for r in records if r["kind"] == "eval"] == [0, 3]
    assert all(0.98 < r["ratio_min"] <= r["ratio_max"] < 1.02 for r in train), "every replica sampled the trained policy"


def test_two_replicas_sample_what_one_does(make, stack: dict[str, ServiceProcess], student_model: Path, root: Path) -> None:
    """On the same weights, one request (7 prompts x 3) split over two replicas returns exactly the rollouts the
    first replica returns for the whole request: token ids, logprobs, prompt order, group indices."""
    import shutil

    shutil.copytree(student_model, root / "same", dirs_exist_ok=True)
    one, two = Remote(make(students=("a",))), Remote(make())
    version = max(v or 0 for v in versions(stack)) + 1
    loaded = two.load_weights(p.WeightsRequest(version=version, kind="full", path="same"))
    assert [w.policy_version for w in loaded] == [version, version] and versions(stack) == [version, version]
    rows = [PromptRow({"text": t}, {}) for t in ("The boy", "A big dog ran", "Where", "She said that the",
                                                 "It", "One two", "The old man and the sea")]
    args = {"n": 3, "max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 123_456, "version": version}
    alone, split = sample(one, rows, **args), sample(two, rows, **args)
    assert [s.group for s in split] == [s.group for s in alone] == [i for i in range(7) for _ in range(3)]
    assert [s.prompt_ids for s in split] == [s.prompt_ids for s in alone]
    assert [s.token_ids for s in split] == [s.token_ids for s in alone]
    for x, y in zip(split, alone, strict=True):
        assert x.sampling_logprobs == pytest.approx(y.sampling_logprobs, abs=1e-4)
    other = sample(two, rows, **{**args, "seed": 654_321})
    assert [s.token_ids for s in other] != [s.token_ids for s in alone], "the seed matters: this is no fixed output"
    few = sample(two, rows[:1], **args)  # fewer prompts than replicas: the second is not asked
    assert [s.token_ids for s in few] == [s.token_ids for s in alone[:3]]


def test_a_replica_down_is_waited_for_and_given_the_current_weights_when_back(
    make, stack: dict[str, ServiceProcess], student_model: Path, root: Path, service_logs: Path, tmp_path: Path,
    monkeypatch, caplog,
) -> None:
    """Replica b stops before step 2 samples: the step waits for it alone (the run's `waiting_for` names it), b
    comes back on its base weights at version 0, answers with version 0, and the trainer loads its current
    weights on every replica as a new version and samples again. The run completes, on-policy throughout."""
    pauses = tmp_path / "pause"
    pauses.mkdir()
    monkeypatch.setenv("OPD_TEST_PAUSE", "sample:2")
    monkeypatch.setenv("OPD_TEST_PAUSE_DIR", str(pauses))
    config = make(steps=3, eval__every=0)
    trainer, outcome = Trainer(config), []
    thread = threading.Thread(target=lambda: outcome.append(trainer.run()))
    thread.start()
    try:
        wait_for((pauses / "sample-2.paused").is_file, 300, "step 2 to hold before sampling")
        held = trainer.version
        old = stack["b"]
        old.stop()
        (pauses / "sample-2.release").touch()
        wait_for(lambda: old.url in (trainer.remote.waiting_for or ""), 120, "the run to wait for replica b")
        assert stack["a"].url not in (trainer.remote.waiting_for or ""), "only the replica that is down is waited for"
        stack["b"] = start_service("student", hf_args("student", student_model, root), service_logs, port=old.port)
        wait_all(stack["b"])
    finally:
        thread.join(300)
    assert outcome == ["completed"]
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3], "no step skipped or counted twice"
    assert records[1]["time_waiting"] > 0 and trainer.remote.waiting_for is None
    b = stack["b"].url
    stale = [m for m in caplog.messages if "again before sampling" in m]
    assert stale == [(f"the student at {b} sampled with policy version 0, the trainer expects {held}: "
                      f"loading version {held} again before sampling")]
    assert any(f"the student at {b} serves policy version 0, the trainer's is {held}" in m for m in caplog.messages)
    assert records[1]["policy_version"] == held + 2, "republished once, then step 2's own version"
    assert versions(stack) == [records[-1]["policy_version"]] * 2
    assert all(0.98 < r["ratio_min"] <= r["ratio_max"] < 1.02 for r in records), "never trained on the base weights"


def test_a_replica_with_another_tokenizer_is_refused_naming_it(
    make, stack: dict[str, ServiceProcess], other_tokenizer_model: Path, service_logs: Path, tmp_path: Path
) -> None:
    other = start_service("student-other", hf_args("student", other_tokenizer_model, tmp_path), service_logs)
    try:
        wait_all(other)
        config = make()
        config = config.model_copy(update={"student_urls": (stack["a"].url, other.url)})
        with pytest.raises(TokenizerMismatch) as err:
            Trainer(config).run()
    finally:
        other.stop()
    message = str(err.value)
    assert other.url in message and str(other_tokenizer_model) in message and "tokenizer" in message
    assert not (Path(config.output_dir) / "metrics.jsonl").exists(), "refused before anything ran"


def test_each_replica_is_held_to_its_share_of_the_prompts(make, stack: dict[str, ServiceProcess]) -> None:
    """7 prompts over two replicas: the larger share is 4, checked against the smallest max_prompts of the two."""
    from opd.common.client import TeacherClient

    teachers, info = [TeacherClient(stack["teacher"].url).info()], StudentClient(stack["a"].url).info()
    capped = lambda n: info.model_copy(update={"limits": {**info.limits, "max_prompts": n}})  # noqa: E731
    remote = Remote(make(eval__every=0))
    remote.check_limits(teachers, [info, capped(4)], eval_prompts=0)
    with pytest.raises(ConfigError, match=r"4 prompts \(of 7, split over 2 replicas\).* at most 3 \(max_prompts\)") as err:
        remote.check_limits(teachers, [capped(3), info], eval_prompts=0)
    assert stack["a"].url in str(err.value) and stack["b"].url in str(err.value)
    with pytest.raises(ConfigError, match=r"7 prompts in one rollout request"):
        Remote(make(students=("a",), eval__every=0)).check_limits(teachers, [capped(4)], eval_prompts=0)


@pytest.mark.parametrize(("given", "error"), [
    ({}, "student_url: give student_url (the student service's URL) or student_urls (student replicas' URLs)"),
    ({"student_url": None}, "student_url: give student_url"),
    ({"student_url": "http://s", "student_urls": ["http://s"]}, "student_urls: give student_url (one student) or "
                                                                 "student_urls (replicas), not both"),
])
def test_the_config_takes_student_url_or_student_urls(given: dict, error: str) -> None:
    base = {"student": {"model": "m"}, "teacher_urls": "http://t", "dataset": {"path": "d.jsonl"}}
    with pytest.raises(ConfigError) as refused:
        build_config({**base, **given}, environ={})
    assert error in str(refused.value)
    assert build_config({**base, "student_url": "http://s"}, environ={}).student_replicas == ("http://s",)
    replicas = build_config({**base, "student_urls": ["http://s1", "http://s2"]}, environ={})
    assert replicas.student_replicas == ("http://s1", "http://s2") and replicas.student_url is None
    # A later layer (environment, then --set) that names the students replaces the earlier layer's.
    env = build_config({**base, "student_urls": ["http://s1"]}, environ={"OPD_TRAIN_STUDENT_URL": "http://env"})
    assert env.student_replicas == ("http://env",)
    assert build_config({**base, "student_url": "http://s"}, ["student_urls=[http://a, http://b]"],
                        environ={}).student_replicas == ("http://a", "http://b")
    # A trainer service's default student_url does not add to a posted config's student_urls.
    posted = RunConfig.model_validate({**base, "student_urls": ["http://s1"]},
                                      context={"environ": {"OPD_TRAIN_STUDENT_URL": "http://default"}})
    assert posted.student_replicas == ("http://s1",)


def test_a_posted_run_with_both_is_a_422_naming_the_fields(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from opd.common.settings import TrainerSettings
    from opd.trainer.app import build_app

    body = {"student": {"model": "m"}, "teacher_urls": ["http://t"], "dataset": {"path": "p.jsonl"},
            "student_url": "http://s", "student_urls": ["http://s1", "http://s2"]}
    with TestClient(build_app(TrainerSettings(runs_dir=str(tmp_path)))) as client:
        r = client.post("/runs", json=body)
    assert r.status_code == 422 and "student_urls: give student_url (one student)" in r.json()["detail"], r.text
    with TestClient(build_app(TrainerSettings(runs_dir=str(tmp_path)))) as client:
        r = client.post("/runs", json={"dataset": {"path": "p.jsonl"}, "student": {"model": "m"}})
    assert r.status_code == 422 and "teacher_urls: Field required" in r.json()["detail"], r.text
    assert "student_url: give student_url" in r.json()["detail"], "named beside the other missing fields"
