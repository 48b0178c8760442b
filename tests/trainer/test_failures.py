"""Failures a real run meets: the teacher goes away mid-run and comes back;
models that do not share a tokenizer are refused at start; a step whose loss
is not finite is skipped and never published."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from opd.common.errors import TokenizerMismatch
from opd.common.process import ServiceProcess
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from tests.trainer.runs import hf_args, start_service, wait_all

pytestmark = pytest.mark.slow


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_teacher_restart_mid_run_completes_every_step(
    make_config, teacher_model: Path, service_logs: Path, caplog, tmp_path: Path, monkeypatch,
) -> None:
    """The trainer's test pause holds step 3 with its rollouts in hand; the teacher stops, the step goes on and
    waits for it (the run's `waiting_for` says so), and the teacher comes back. The teacher is one of this
    test's own on the hf engine (a start costs seconds, a vLLM one tens): the waiting is the trainer's."""
    steps = 8
    pauses = tmp_path / "pause"
    pauses.mkdir()
    monkeypatch.setenv("OPD_TEST_PAUSE", "score:3")
    monkeypatch.setenv("OPD_TEST_PAUSE_DIR", str(pauses))
    teacher = start_service("teacher-hf", hf_args("teacher", teacher_model), service_logs)
    try:
        wait_all(teacher)
        config = make_config(name="restart", steps=steps, eval__every=0, save_every=steps, teacher_urls=[teacher.url])
        trainer, outcome = Trainer(config), []
        thread = threading.Thread(target=lambda: outcome.append(trainer.run()))
        thread.start()
        try:
            wait_for((pauses / "score-3.paused").is_file, 120, "step 3 to hold before scoring")
            teacher.stop()
            (pauses / "score-3.release").touch()
            wait_for(lambda: trainer.remote.waiting_for is not None, 120, "the run to wait for the teacher")
            teacher = start_service("teacher-hf", hf_args("teacher", teacher_model), service_logs, port=teacher.port)
            wait_all(teacher)
        finally:
            thread.join(300)
    finally:
        teacher.stop()
    assert outcome == ["completed"]
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "no step skipped or counted twice"
    assert records[2]["time_waiting"] > 0 and trainer.remote.waiting_for is None
    assert any("waiting" in m for m in caplog.messages)
    assert all(r["sequences"] == 32 for r in records), "a waiting step keeps and scores its own rollouts"


def test_student_restart_mid_run_reloads_the_policy_and_stays_on_policy(
    make_config, student_model: Path, checkpoint_root: Path, service_logs: Path, caplog
) -> None:
    """A restarted student serves its base model at version 0. Restarted right before step 3 samples, it
    answers with version 0: the trainer detects it, loads its own weights again as a new version, samples
    again, and every step stays on-policy. The student is this test's own, on the hf engine (see above)."""
    from opd.common.client import StudentClient

    steps, expected = 5, []
    student = {"now": start_service("student-hf", hf_args("student", student_model, checkpoint_root), service_logs)}

    class RestartsTheStudent(Trainer):
        def sample_on_policy(self, rows, **kwargs):
            if self.step == 2 and not expected:
                expected.append(self.version)
                old = student["now"]
                old.stop()
                student["now"] = start_service("student-hf", old.args[:-2], service_logs, port=old.port)
                wait_all(student["now"])
            return super().sample_on_policy(rows, **kwargs)

    try:
        wait_all(student["now"])
        config = make_config(name="student-restart", steps=steps, eval__every=0, save_every=steps,
                             student_url=student["now"].url)
        assert RestartsTheStudent(config).run() == "completed"
        records = read_records(Path(config.output_dir) / "metrics.jsonl")
        assert StudentClient(student["now"].url).info().policy_version == records[-1]["policy_version"]
    finally:
        student["now"].stop()
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    stale = [m for m in caplog.messages if "again before sampling" in m]
    assert stale == [f"the student sampled with policy version 0, the trainer expects {expected[0]}: "
                     f"loading version {expected[0]} again before sampling"]
    assert records[2]["policy_version"] == expected[0] + 2, "republished once, then step 3's own version"
    for r in records:  # off-policy samples (the restarted student's base model) would show here
        assert 0.98 < r["ratio_min"] <= r["ratio_max"] < 1.02, r


def test_teacher_with_another_tokenizer_is_refused(
    make_config, other_tokenizer_model: Path, service_logs: Path, services
) -> None:
    other = start_service("teacher-other", ["teacher", "serve", "--model", str(other_tokenizer_model), "--engine", "hf",
                                            "--dtype", "float32", "--device", "cpu"], service_logs)
    try:
        wait_all(other)
        config = make_config(name="mismatch", teacher_urls=f"[{services['teacher'].url}, {other.url}]")
        with pytest.raises(TokenizerMismatch) as err:
            Trainer(config).run()
    finally:
        other.stop()
    message = str(err.value)
    assert str(other_tokenizer_model) in message and config.student.model in message
    assert other.url in message and "tokenizer" in message
    assert not (Path(config.output_dir) / "metrics.jsonl").exists(), "refused before anything ran"


def test_trainable_student_must_match_the_student_service(make_config, other_tokenizer_model: Path) -> None:
    config = make_config(name="mismatch2", student__model=str(other_tokenizer_model))
    with pytest.raises(TokenizerMismatch) as err:
        Trainer(config).run()
    assert str(other_tokenizer_model) in str(err.value) and "student" in str(err.value)


def test_a_non_finite_step_is_skipped_and_never_published(make_config, services: dict[str, ServiceProcess], monkeypatch) -> None:
    """Step 2's loss is NaN (one teacher logprob made NaN on its way into the update): the step takes no
    optimizer step and publishes nothing, so the student keeps step 1's version; step 3 trains on."""
    from opd.common.client import StudentClient
    from opd.trainer import update

    real, calls = update.train_on, []

    def nan_at_step_2(policy, samples, config, rewards=None):
        calls.append(1)
        if len(calls) == 2:
            samples[0].teacher_logprobs[0] = float("nan")
        return real(policy, samples, config, rewards)

    monkeypatch.setattr(update, "train_on", nan_at_step_2)  # Policy.train calls it
    config = make_config(name="nan-step", steps=3, eval__every=0, save_every=3)
    assert Trainer(config).run() == "completed"
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    assert [r["skipped_updates"] for r in records] == [0, 1, 0]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None, "written as null, not NaN"
    v1, v2, v3 = (r["policy_version"] for r in records)
    assert v1 == v2 < v3, "nothing was published for step 2"
    assert StudentClient(services["student"].url).info().policy_version == v3
    assert 0.98 < records[2]["ratio_min"] <= records[2]["ratio_max"] < 1.02, "step 3 sampled the weights it trains"


def test_a_student_serving_broken_weights_fails_the_call_at_once_naming_the_version(
    make_config, services: dict[str, ServiceProcess], student_model: Path, checkpoint_root: Path
) -> None:
    """A student whose weights give NaN answers 500 naming the version; the trainer does not wait on it
    (services.max_wait_s is 180 s here) and reports one line, not a validation dump of every logprob.
    The shared vLLM student serves the broken version; the next run publishes its own weights first."""
    from opd.common import protocol as p
    from opd.common.client import StudentClient
    from opd.common.errors import ServiceError
    from opd.trainer.remote import Remote
    from tests.student.test_lora_matrix import save_broken

    save_broken(student_model, checkpoint_root / "nan")
    student = StudentClient(services["student"].url)
    version = student.info().policy_version + 1
    student.load_weights(p.WeightsRequest(version=version, kind="full", path="nan"))
    remote = Remote(make_config())
    with pytest.raises(ServiceError) as caught:
        remote.rollouts(p.RolloutRequest(prompts=[{"text": "The boy"}], n=2, max_tokens=8, seed=1))
    assert remote.waited_s == 0 and remote.waiting_for is None, "the trainer must not wait out a 500"
    message = str(caught.value)
    assert caught.value.status_code == 500 and services["student"].url in message and "\n" not in message
    assert f"policy version {version} (full checkpoint nan)" in message and "non-finite" in message
