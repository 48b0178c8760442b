"""Several teachers in one run (`teachers`): each prompt scored by the teacher its row names.

Real hf services: two teachers on DIFFERENT tiny models (same tokenizer) and an hf student. Two prompt groups,
one per teacher: in a short LoRA run each sample is scored by its own teacher (checked against the teachers directly), and the per-teacher metrics equal the figures computed
here from the samples. Also: an unknown teacher name and a teacher on another tokenizer are refused at start,
naming them; one teacher's outage holds only its own samples, and the run completes with every row scored once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from opd.common.client import TeacherClient
from opd.common.errors import TokenizerMismatch
from opd.common.process import ServiceProcess
from opd.trainer import loop
from opd.trainer.config import ConfigError, RunConfig, build_config
from opd.trainer.context import score_sequence
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from opd.trainer.rollouts import Sample
from tests.trainer.runs import base_run, build, hf_args, start_service, started, wait_all
from tests.utils.tiny_models import WORDS, build_llama

BASE = {"student": {"model": "m"}, "student_url": "http://s", "dataset": {"path": "d"}}


def has_the(row: dict, completion: str) -> bool:
    """The test verifier: does the completion hold the word 'the'?"""
    return "the" in completion.split()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- config alone
@pytest.mark.parametrize(("given", "named"), [
    ({"teacher_urls": "http://t", "teachers": {"a": {"urls": "http://a"}}}, "teacher_urls"),
    ({"teachers": {"a": {"urls": "http://a"}}, "teacher_protocol": "openai"}, "teacher_protocol"),
    ({"teachers": {"a": {"urls": "http://a"}}, "teacher_prompt": {"system": "x"}}, "teacher_prompt"),
])
def test_both_styles_are_refused_naming_the_fields(given: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=f"teachers: give teachers .* or {named} .*not both"):
        build_config({**BASE, **given}, environ={})


def test_the_teachers_config_and_its_defaults() -> None:
    """One style or the other; a single-teacher config is one teacher named `default`; default_teacher must name
    a teacher; a posted config with `teachers` drops the trainer service's OPD_TRAIN_TEACHER_URLS default."""
    one = build_config({**BASE, "teacher_urls": "http://t", "teacher_protocol": "openai"}, environ={})
    assert list(one.teacher_set) == ["default"] and one.teacher_set["default"].urls == ("http://t",)
    assert one.teacher_set["default"].protocol == "openai" and one.default_teacher_name == "default"
    two = build_config({**BASE, "teachers": {"a": {"urls": "http://a"}, "b": {"urls": ["http://b1", "http://b2"],
                                                                             "protocol": "sglang", "api_key": "sekrit-k"}}},
                       environ={})
    assert two.default_teacher_name == "a" and two.teacher_set["b"].urls == ("http://b1", "http://b2")
    assert "sekrit-k" not in repr(two), "a teacher's key stays out of logs"
    assert build_config({**BASE, "teachers": {"a": {"urls": "u"}, "b": {"urls": "v"}}, "default_teacher": "b"},
                        environ={}).default_teacher_name == "b"
    with pytest.raises(ConfigError, match="default_teacher: 'c' is not one of the teachers \\(a\\)"):
        build_config({**BASE, "teachers": {"a": {"urls": "u"}}, "default_teacher": "c"}, environ={})
    with pytest.raises(ConfigError, match="teacher_urls: Field required: give teacher_urls .* or teachers"):
        build_config(BASE, environ={})
    posted = RunConfig.model_validate({**BASE, "teachers": {"a": {"urls": "u"}}},
                                      context={"environ": {"OPD_TRAIN_TEACHER_URLS": "http://env"}})
    assert posted.teacher_urls is None and list(posted.teacher_set) == ["a"]
    with pytest.raises(ConfigError, match="not both"):  # a variable beside a file's teachers: refused, not preferred
        build_config({**BASE, "teachers": {"a": {"urls": "u"}}}, environ={"OPD_TRAIN_TEACHER_URLS": "http://env"})


# ---------------------------------------------------------------- services
@pytest.fixture(scope="module")
def second_teacher(models_dir: Path, tiny_tokenizer: Path) -> Path:
    """Another model on the same tokenizer: other weights, so other scores."""
    return build_llama(models_dir / "teacher-b", tiny_tokenizer, seed=7, layers=2, init_std=0.08)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teachers-checkpoints")


@pytest.fixture(scope="module")
def stack(teacher_model: Path, second_teacher: Path, student_model: Path, root: Path,
          service_logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    """hf teachers a and b and an hf student; a test may replace one (same port) in the dict."""
    with started(service_logs, a=("teacher-a", hf_args("teacher", teacher_model)),
                 b=("teacher-b", hf_args("teacher", second_teacher)),
                 student=("student", hf_args("student", student_model, root))) as running:
        yield running


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two prompt groups: group a opens with 'the', names no teacher (the default, a); group b names teacher b."""
    import random

    rng = random.Random(5)
    words = [w for w in WORDS if w != "the"]
    rows = []
    for i in range(48):
        text = " ".join(rng.choices(words, k=rng.randint(2, 4)))
        rows.append({"prompt": f"The {text}"} if i % 2 == 0 else {"prompt": text.capitalize(), "teacher": "b"})
    folder = tmp_path_factory.mktemp("teacher-data")
    return {"train": write_rows(folder / "train.jsonl", rows[:40]), "eval": write_rows(folder / "eval.jsonl", rows[40:])}


@pytest.fixture
def make(stack: dict[str, ServiceProcess], student_model: Path, data: dict[str, Path], root: Path,
         tmp_path: Path) -> Callable[..., RunConfig]:
    """A short LoRA run with teachers a (default) and b; `a__b=value` overrides `a.b`."""

    def config(**overrides: Any) -> RunConfig:
        urls = {"teachers": {"a": {"urls": [stack["a"].url]}, "b": {"urls": [stack["b"].url]}},
                "student_url": stack["student"].url}
        return build(base_run(student_model, data["train"], tmp_path / "run", root, urls), {
            "name": "teachers",
            "dataset": {"eval_path": str(data["eval"]), "eval_size": 8},
            "sampling": {"max_tokens": 12},
            "optimizer": {"lr": 0.02},
            "eval": {"every": 6, "samples_per_prompt": 2, "verifier": "tests.trainer.test_teachers:has_the"},
            "save_every": 6,
            "seed": 4,
            "services": {"retries": 1, "max_backoff_s": 1},
        }, **overrides)

    return config


def watch_summaries(monkeypatch: pytest.MonkeyPatch) -> list[list[Sample]]:
    """Every list of samples the loop summarises (a step's, an evaluation's), in order."""
    seen: list[list[Sample]] = []
    summary = loop.kl_summary

    def spy(samples: list[Sample], *args: Any) -> dict[str, float]:
        seen.append(list(samples))
        return summary(samples, *args)

    monkeypatch.setattr(loop, "kl_summary", spy)
    return seen


def by_hand(samples: list[Sample], teacher: str) -> tuple[float, float, int]:
    """(mean per-token reverse KL, share verified, sequences) of one teacher's samples, from the raw numbers."""
    mine = [s for s in samples if s.row.get("teacher", "a") == teacher]
    if not mine:
        return float("nan"), float("nan"), 0
    return kl_sum(mine) / sum(len(s.token_ids) for s in mine), sum(has_the(s.row, s.text) for s in mine) / len(mine), len(mine)


def kl_sum(samples: list[Sample]) -> float:
    """The reverse KL summed over every token of the samples, from the raw numbers."""
    return sum(lp - t for s in samples for lp, t in zip(s.sampling_logprobs, s.teacher_logprobs, strict=True))


@pytest.mark.slow
def test_each_group_is_scored_by_its_own_teacher(make, stack: dict[str, ServiceProcess], monkeypatch) -> None:
    """Each sample carries the scores of its row's teacher (rescored here by both teachers: its own matches, the
    other does not); every record's teacher_kl/<name>, teacher_kl_per_completion/<name> and accuracy/<name> (train
    and held out) equal the figures of that teacher's samples computed by hand.
    That each group learns from its own teacher (held-out KL falls per teacher) is test_teachers_learn.py's:
    these random teachers hold no skill to learn in a few steps."""
    seen = watch_summaries(monkeypatch)
    config = make()
    trainer = Trainer(config)
    assert trainer.run() == "completed"
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), *(("train", i) for i in range(1, config.steps + 1)),
                                                         ("eval", config.steps)]
    assert len(seen) == len(records)
    for record, samples in zip(records, seen, strict=True):
        prefix = "train_" if record["kind"] == "train" else ""
        for name in ("a", "b"):
            kl, accuracy, count = by_hand(samples, name)
            assert count > 0 and record[f"teacher_kl/{name}"] == pytest.approx(kl, abs=1e-9)
            mine = [s for s in samples if s.row.get("teacher", "a") == name]
            assert record[f"teacher_kl_per_completion/{name}"] == pytest.approx(kl_sum(mine) / count, abs=1e-9)
            assert record[f"{prefix}accuracy/{name}"] == pytest.approx(accuracy, abs=1e-9)
        assert record["teacher_kl"] == pytest.approx(
            sum(sum(s.sampling_logprobs) - sum(s.teacher_logprobs) for s in samples) / record["tokens"], abs=1e-9)
        assert record["teacher_kl_per_completion"] == pytest.approx(kl_sum(samples) / len(samples), abs=1e-9)
    clients = {name: TeacherClient(stack[name].url) for name in ("a", "b")}
    last = seen[-1]
    for name, other in (("a", "b"), ("b", "a")):
        mine = [s for s in last if s.row.get("teacher", "a") == name]
        assert all(s.teacher == name for s in mine)
        sequences = [score_sequence(s.prompt_ids, s.token_ids, s.teacher_prompt) for s in mine]
        own, theirs = (clients[n].logprobs(sequences).results for n in (name, other))
        for s, o, t in zip(mine, own, theirs, strict=True):
            assert s.teacher_logprobs == pytest.approx(o.logprobs, abs=1e-4), f"scored by teacher {name}"
            assert max(abs(x - y) for x, y in zip(s.teacher_logprobs, t.logprobs)) > 0.05, "the teachers differ"
    shown = read_records(Path(config.output_dir) / "eval_samples.jsonl")
    assert {x["teacher"] for x in shown} <= {"a", "b"}


@pytest.mark.slow
def test_an_unknown_teacher_name_is_refused_at_start(make, data: dict[str, Path], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
    rows[5] = {**rows[5], "teacher": "physics"}
    config = make(dataset__path=str(write_rows(tmp_path / "bad.jsonl", rows)))
    with pytest.raises(ConfigError) as err:
        Trainer(config).run()
    message = str(err.value)
    assert "train row 5" in message and "'physics'" in message and "(a, b)" in message
    assert not (Path(config.output_dir) / "metrics.jsonl").exists(), "refused before anything ran"


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_refused_naming_it(
    make, stack: dict[str, ServiceProcess], other_tokenizer_model: Path, service_logs: Path,
) -> None:
    other = start_service("teacher-other", hf_args("teacher", other_tokenizer_model), service_logs)
    try:
        wait_all(other)
        config = make(**{"teachers.b.urls": f"[{stack['b'].url}, {other.url}]"})
        with pytest.raises(TokenizerMismatch) as err:
            Trainer(config).run()
    finally:
        other.stop()
    message = str(err.value)
    assert "teacher b" in message and other.url in message and str(other_tokenizer_model) in message
    assert stack["b"].url not in message, "the replica that matches is not blamed"
    assert not (Path(config.output_dir) / "metrics.jsonl").exists(), "refused before anything ran"


@pytest.mark.slow
def test_one_teachers_outage_holds_only_its_own_rows(
    make, stack: dict[str, ServiceProcess], second_teacher: Path, service_logs: Path, tmp_path: Path, monkeypatch,
) -> None:
    """Teacher b stops while step 2 holds its rollouts: the step scores teacher a's samples while it waits for b
    alone (`waiting_for` names b, not a); b comes back on its port, and the run completes with every sample
    scored exactly once, by its own teacher."""
    pauses = tmp_path / "pause"
    pauses.mkdir()
    monkeypatch.setenv("OPD_TEST_PAUSE", "score:2")
    monkeypatch.setenv("OPD_TEST_PAUSE_DIR", str(pauses))
    seen = watch_summaries(monkeypatch)
    config = make(steps=3, eval__every=0, save_every=3)
    trainer, outcome = Trainer(config), []
    asked: list[tuple[str, int]] = []  # (teacher, sequences) of every scoring request that came back
    score = trainer.remote.score

    def spy(sequences, teacher=None):
        answer = score(sequences, teacher)
        asked.append((teacher, len(sequences)))
        return answer

    trainer.remote.score = spy
    thread = threading.Thread(target=lambda: outcome.append(trainer.run()))
    thread.start()
    try:
        wait_for((pauses / "score-2.paused").is_file, 300, "step 2 to hold before scoring")
        scored_a = sum(n for t, n in asked if t == "a")
        old = stack["b"]
        old.stop()
        (pauses / "score-2.release").touch()
        wait_for(lambda: "teacher b (opd)" in (trainer.remote.waiting_for or ""), 120, "the run to wait for teacher b")
        wait_for(lambda: sum(n for t, n in asked if t == "a") > scored_a, 120, "teacher a to score step 2 meanwhile")
        assert "teacher b" in trainer.remote.waiting_for and "teacher a" not in trainer.remote.waiting_for
        stack["b"] = start_service("teacher-b", hf_args("teacher", second_teacher), service_logs, port=old.port)
        wait_all(stack["b"])
    finally:
        thread.join(300)
    assert outcome == ["completed"] and trainer.remote.waiting_for is None
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["time_waiting"] > 0
    assert all(r["sequences"] == 32 for r in records)
    for name in ("a", "b"):
        count = sum(by_hand(samples, name)[2] for samples in seen)
        assert sum(n for t, n in asked if t == name) == count, f"teacher {name}'s samples scored exactly once"
    assert all(s.teacher_logprobs is not None for samples in seen for s in samples)

