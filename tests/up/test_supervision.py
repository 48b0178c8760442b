"""`opd up` supervises its services: SIGKILLed services come back and the run ends as if
nothing happened; Ctrl-C during an outage stops everything at once; a crash loop is named.

Every test runs real `opd up` processes on the tiny models with hf engines in float32.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from opd.common.process import port_free
from opd.trainer.metrics import read_records
from tests.up.test_up import marked_processes, stack_yaml

pytestmark = pytest.mark.slow
# The chaos run and the uninterrupted run compute the same float32 operations on the
# same inputs in the same order (hf engines, fixed seeds, full weights reloaded exactly
# after every restart), so they agree bit for bit; the tolerance only allows for a
# kernel that sums in another order between processes, which moves float32 by ~1e-7.
WEIGHT_ATOL = 1e-6


class Up:
    """One `opd up` in the background, its output in a file."""

    def __init__(self, config: Path, out: Path) -> None:
        self.mark = uuid.uuid4().hex
        self.out = out
        self.stack = yaml.safe_load(config.read_text())
        env = {**os.environ, "OPD_TEST_MARK": self.mark, "COLUMNS": "200"}
        with out.open("w") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "opd", "up", str(config)], stdout=sink,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def text(self) -> str:
        return self.out.read_text()

    @property
    def run_dir(self) -> Path:
        return Path(self.stack["workdir"]) / "run"

    def steps_done(self) -> int:
        return sum(r["kind"] == "train" for r in read_records(self.run_dir / "metrics.jsonl"))

    def wait_for(self, condition, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"opd up ended while waiting for {what}:\n{self.text[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text[-4000:]}"
            time.sleep(0.1)

    def service_pid(self, name: str) -> int:
        command = f"opd\0{name}\0serve".encode()
        for pid in marked_processes(self.mark):
            try:
                if command in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no {name} process")

    def finish(self, timeout: float = 600) -> str:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
        return self.text

    def assert_nothing_left(self) -> None:
        assert marked_processes(self.mark) == [], "opd up left processes running"
        for name in ("teacher", "student", "trainer"):
            assert port_free("127.0.0.1", self.stack[name]["port"]), f"{name}'s port is still held"


def hf_stack(tmp_path: Path, teacher: Path, student: Path, steps: int, **extra) -> Path:
    """A stack of hf engines in float32, full fine-tuning, a checkpoint every step unless told otherwise;
    the trainer retries a service that is down every 2 s or so (the default backs off to 10 s)."""
    config = stack_yaml(tmp_path, teacher, student, steps=steps)
    stack = yaml.safe_load(config.read_text())
    for service in ("teacher", "student"):
        stack[service]["engine"] = "hf"
    stack["run"].update({"student": {"finetune": "full"}, "eval": {"every": 0}, "save_every": 1,
                         "services": {"retries": 1, "max_backoff_s": 2}})
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(stack.get(key), dict):
            stack[key].update(value)
        else:
            stack[key] = value
    config.write_text(yaml.safe_dump(stack))
    return config


def final_weights(run_dir: Path, steps: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{steps:06d}" / "trainable.safetensors"))


def test_killed_services_come_back_and_the_run_ends_as_if_uninterrupted(tmp_path, teacher_model, student_model) -> None:
    """The student, then the teacher, then the trainer are SIGKILLed at seeded random points of a run."""
    steps = 14  # tiny hf steps take well under a second: the run must outlast the last kill
    reference = Up(hf_stack(tmp_path / "reference", teacher_model, student_model, steps), tmp_path / "reference.out")
    chaos = Up(hf_stack(tmp_path / "chaos", teacher_model, student_model, steps), tmp_path / "chaos.out")
    rng = random.Random(14)
    try:
        for name, after_step in (("student", 1), ("teacher", 3), ("trainer", 5)):
            chaos.wait_for(lambda n=after_step: chaos.steps_done() >= n, f"step {after_step}")
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the next step: sampling, scoring, training or sync
            os.kill(chaos.service_pid(name), signal.SIGKILL)
            assert chaos.steps_done() < steps, "the run must still be going when a service is killed"
            chaos.wait_for(lambda n=name: f"{n} is ready again" in chaos.text, f"{name} to come back")
        out, reference_out = chaos.finish(), reference.finish()
    finally:
        for up in (chaos, reference):
            up.finish(30)
    assert reference.proc.returncode == 0, reference_out[-4000:]
    assert chaos.proc.returncode == 0, out[-6000:]
    for name in ("student", "teacher", "trainer"):
        assert re.search(rf"{name} was killed by SIGKILL \(pid \d+\); last lines of ", out), out[-6000:]
    assert "restarts: teacher 1, student 1, trainer 1" in out
    assert f"state: completed after {steps} steps" in out and f"steps completed: {steps} of {steps}" in out
    assert re.search(rf"last checkpoint: .*step-{steps:06d} \(step {steps}\)", out)
    assert len(re.findall(r"^run \S+ resumed", out, re.M)) == 1
    for step in range(1, steps + 1):  # each step's metrics exactly once, on the terminal and in the metrics file
        assert len(re.findall(rf"^step +{step} +teacher KL", out, re.M)) == 1, out[-6000:]
    assert [r["step"] for r in read_records(chaos.run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    trainer_log = (chaos.run_dir.parent / "logs" / "trainer.log").read_text()
    assert re.search(r"the student serves policy version 0, the trainer's is [1-9]\d* .*loading the trainer's weights "
                     r"as version \d+", trainer_log), "the restarted student's base model went unnoticed"
    got, want = final_weights(chaos.run_dir, steps), final_weights(reference.run_dir, steps)
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    base = load_file(str(student_model / "model.safetensors"))
    moved = max((want[k] - base[k]).abs().max().item() for k in want if k in base)
    assert worst <= WEIGHT_ATOL < moved, (worst, moved)
    chaos.assert_nothing_left()
    reference.assert_nothing_left()


def test_ctrl_c_during_a_service_outage_stops_everything_within_15s(tmp_path, teacher_model, student_model) -> None:
    """The student is down (its restart is far off) and the trainer waits for it: one SIGINT ends it all,
    and the trainer checkpoints the last whole step on its way out."""
    config = hf_stack(tmp_path, teacher_model, student_model, steps=50, restart={"backoff_s": 300, "max_backoff_s": 300},
                      run={"save_every": 1000})
    up = Up(config, tmp_path / "up.out")
    try:
        up.wait_for(lambda: up.steps_done() >= 2, "two steps")
        os.kill(up.service_pid("student"), signal.SIGKILL)
        trainer_log = Path(up.stack["workdir"]) / "logs" / "trainer.log"
        up.wait_for(lambda: "student /rollouts: service unavailable" in trainer_log.read_text(), "the trainer to wait")
        done = up.steps_done()
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(30)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert took < 15, f"opd up took {took:.1f}s to stop:\n{out[-4000:]}"
    assert up.proc.returncode == 130, out[-4000:]
    assert "restarting student in 300.0s" in out and "stopping: the trainer ends the run at its next safe point" in out
    assert f"steps completed: {done} of 50" in out
    assert re.search(rf"last checkpoint: .*step-{done:06d} \(step {done}\)", out), out[-3000:]
    up.assert_nothing_left()


def test_ctrl_c_while_the_services_start_stops_them_at_once(tmp_path, teacher_model, student_model) -> None:
    up = Up(hf_stack(tmp_path, teacher_model, student_model, steps=2), tmp_path / "up.out")
    try:
        up.wait_for(lambda: len(marked_processes(up.mark)) >= 3, "opd up and two services")
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(30)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert up.proc.returncode == 130 and "interrupted: stopping every service at once" in out, out[-3000:]
    assert took < 15, f"{took:.1f}s"
    up.assert_nothing_left()


def test_a_second_ctrl_c_during_a_step_stops_everything_at_once(tmp_path, teacher_model, student_model) -> None:
    """The first Ctrl-C lets the trainer finish its step; a second one does not wait for it, nor for anything."""
    up = Up(hf_stack(tmp_path, teacher_model, student_model, steps=50, run={"sampling": {
        "prompts_per_step": 4, "samples_per_prompt": 4, "max_tokens": 64}}), tmp_path / "up.out")
    try:
        up.wait_for(lambda: up.steps_done() >= 1, "a step")
        up.proc.send_signal(signal.SIGINT)
        up.wait_for(lambda: "stopping: the trainer ends the run" in up.text, "the first Ctrl-C to be heard", timeout=30)
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(30)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert up.proc.returncode == 130 and "interrupted: stopping every service at once" in out, out[-3000:]
    assert took < 10, f"{took:.1f}s"
    up.assert_nothing_left()


def test_a_service_that_keeps_crashing_stops_everything_and_is_named(tmp_path, teacher_model, student_model) -> None:
    """The teacher's weights vanish and it is killed: each restart fails to load; beyond the limit opd up stops."""
    teacher = shutil.copytree(teacher_model, tmp_path / "teacher-copy")
    config = hf_stack(tmp_path, teacher, student_model, steps=50, restart={"max_restarts": 1, "backoff_s": 0.5})
    up = Up(config, tmp_path / "up.out")
    try:
        up.wait_for(lambda: up.steps_done() >= 1, "a step")
        for weights in teacher.glob("*.safetensors"):
            weights.unlink()
        os.kill(up.service_pid("teacher"), signal.SIGKILL)
        began = time.monotonic()
        up.proc.wait(120)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert up.proc.returncode == 1, out[-4000:]
    assert "restarting teacher in 0.5s (restart 1 of 1)" in out
    assert re.search(r"teacher exited with code \d+ while starting again and keeps crashing: 2 crash\(es\), beyond the "
                     r"restart limit \(restart.policy=on-failure, restart.max_restarts=1\); stopping everything", out), out[-4000:]
    assert "restarts: teacher 1, student 0, trainer 0" in out
    assert took < 90, f"{took:.0f}s from the crash loop to the end"
    up.assert_nothing_left()
