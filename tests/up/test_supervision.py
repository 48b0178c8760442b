"""`opd up` supervises its services: SIGKILLed services come back and the run ends as if
nothing happened; Ctrl-C during start-up or an outage stops everything at once; a crash loop is named.

Every test runs real `opd up` processes on the tiny models with hf engines in float32. A fault
lands at a known point: the trainer's test pause (services/trainer/pause.py) holds the run at a
phase of a step until the test releases it, and the tests wait only on states the stack reports
(pause markers, /ready, the run's status, the metrics file, the process table), each with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from safetensors.torch import load_file

from opd.common.process import port_free
from opd.trainer.checkpoint import read_trainable
from opd.trainer.metrics import read_records
from tests.up.test_up import marked_processes, stack_yaml

pytestmark = pytest.mark.slow
# The chaos run and the uninterrupted run compute the same float32 operations on the
# same inputs in the same order (hf engines, fixed seeds, full weights reloaded exactly
# after every restart), so they agree bit for bit; the tolerance only allows for a
# kernel that sums in another order between processes, which moves float32 by ~1e-7.
WEIGHT_ATOL = 1e-6
RESTART_S = 180  # the most a tiny hf service takes to come back, on a loaded machine


class Up:
    """One `opd up` in the background, its output in a file; `pause`: the trainer's test pause points."""

    def __init__(self, config: Path, out: Path, pause: str = "") -> None:
        self.mark = uuid.uuid4().hex
        self.out = out
        self.stack = yaml.safe_load(config.read_text())
        self.pauses = out.with_name(out.stem + "-pause")
        self.pauses.mkdir()
        env = {**os.environ, "OPD_TEST_MARK": self.mark, "COLUMNS": "200"}
        if pause:
            env.update(OPD_TEST_PAUSE=pause, OPD_TEST_PAUSE_DIR=str(self.pauses))
        self._key: str | None = None
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

    # ------------------------------------------------------------ the trainer's test pause
    def wait_paused(self, point: str) -> None:
        """Waits until the run holds at `point` ("phase:step")."""
        marker = self.pauses / f"{point.replace(':', '-')}.paused"
        self.wait_for(marker.is_file, f"the run to pause at {point}")

    def release(self, point: str) -> None:
        (self.pauses / f"{point.replace(':', '-')}.release").touch()

    # ------------------------------------------------------------ the services
    def find_pid(self, name: str) -> int | None:
        command = f"opd\0{name}\0serve".encode()
        for pid in marked_processes(self.mark):
            try:
                if command in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        return None

    def service_pid(self, name: str) -> int:
        pid = self.find_pid(name)
        assert pid is not None, f"no {name} process"
        return pid

    def api_key(self) -> str:
        """The key opd up gave its services (they hold it in their environment)."""
        for pid in marked_processes(self.mark) if self._key is None else []:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            self._key = next((v[len(b"OPD_API_KEY="):].decode() for v in environ if v.startswith(b"OPD_API_KEY=")), None)
            if self._key:
                break
        assert self._key, "no service of this opd up holds an API key"
        return self._key

    def get(self, name: str, path: str) -> httpx.Response | None:
        url = f"http://127.0.0.1:{self.stack[name]['port']}{path}"
        try:
            return httpx.get(url, headers={"Authorization": f"Bearer {self.api_key()}"}, timeout=5)
        except httpx.TransportError:
            return None

    def ready(self, name: str) -> bool:
        answer = self.get(name, "/ready")
        return answer is not None and answer.status_code == 200

    def run_status(self) -> dict:
        """The run's status as the trainer reports it ({} while the trainer does not answer)."""
        answer = self.get("trainer", "/runs")
        runs = answer.json()["runs"] if answer is not None and answer.status_code == 200 else []
        return runs[-1] if runs else {}

    def kill(self, name: str) -> int:
        """SIGKILLs the service; returns once it is gone (or a zombie), with its pid."""
        pid = self.service_pid(name)
        os.kill(pid, signal.SIGKILL)
        self.wait_for(lambda: gone(pid), f"{name} (pid {pid}) to die", timeout=30)
        return pid

    def wait_back(self, name: str, killed: int) -> None:
        """Waits until another process of `name` than `killed` answers /ready."""
        self.wait_for(lambda: self.find_pid(name) not in (None, killed) and self.ready(name),
                      f"{name} to come back", timeout=RESTART_S)

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


def gone(pid: int) -> bool:
    """The process has ended: no such pid, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
    return read_trainable(run_dir / "checkpoints" / f"step-{steps:06d}")


def test_killed_services_come_back_and_the_run_ends_as_if_uninterrupted(tmp_path, teacher_model, student_model) -> None:
    """The student, then the teacher, then the trainer are SIGKILLed while the trainer's test pause holds
    the run at a known point: the student before a step's rollouts (restarted, it serves its base model,
    and the trainer must not train on that), the teacher with a step's rollouts in hand (scoring waits for
    it), the trainer before an update (it resumes from the step before). Each pause is released once
    the service is dead, so the run also waits out each outage."""
    steps = 6
    kills = (("student", "sample:2"), ("teacher", "score:3"), ("trainer", "train:5"))
    reference = Up(hf_stack(tmp_path / "reference", teacher_model, student_model, steps), tmp_path / "reference.out")
    chaos = Up(hf_stack(tmp_path / "chaos", teacher_model, student_model, steps), tmp_path / "chaos.out",
               pause=" ".join(point for _, point in kills))
    try:
        for name, point in kills:
            chaos.wait_paused(point)
            killed = chaos.kill(name)
            chaos.release(point)
            chaos.wait_back(name, killed)
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
    """The student is killed before step 3's rollouts, its restart is far off, and the run's status says the
    trainer waits for it: one SIGINT ends it all, and the trainer checkpoints step 2 on its way out."""
    config = hf_stack(tmp_path, teacher_model, student_model, steps=5, restart={"backoff_s": 300, "max_backoff_s": 300},
                      run={"save_every": 1000})
    up = Up(config, tmp_path / "up.out", pause="sample:3")
    try:
        up.wait_paused("sample:3")
        up.kill("student")
        up.release("sample:3")
        up.wait_for(lambda: up.run_status().get("waiting_for") == "student /rollouts", "the trainer to wait for the student")
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(30)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert took < 15, f"opd up took {took:.1f}s to stop:\n{out[-4000:]}"
    assert up.proc.returncode == 130, out[-4000:]
    assert "restarting student in 300.0s" in out and "stopping: the trainer ends the run at its next safe point" in out
    assert "steps completed: 2 of 5" in out, out[-3000:]
    assert re.search(r"last checkpoint: .*step-000002 \(step 2\)", out), out[-3000:]
    up.assert_nothing_left()


@pytest.mark.parametrize("when", ["teacher and student spawn", "the trainer spawns"])
def test_ctrl_c_while_the_services_start_stops_them_at_once(tmp_path, teacher_model, student_model, when) -> None:
    """SIGINT as soon as the first services' processes exist (not yet ready), or the trainer's (the others
    are ready): nothing is left behind, not even a child that was being spawned."""
    up = Up(hf_stack(tmp_path, teacher_model, student_model, steps=2), tmp_path / "up.out")
    spawned = {"teacher and student spawn": ("teacher", "student"), "the trainer spawns": ("trainer",)}[when]
    try:
        up.wait_for(lambda: all(up.find_pid(name) for name in spawned), when, timeout=RESTART_S)
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(30)
        took = time.monotonic() - began
    finally:
        out = up.finish(30)
    assert up.proc.returncode == 130 and "interrupted: stopping every service at once" in out, out[-3000:]
    assert not re.search(r"^run \S+ started", out, re.M), "the run had started: the interrupt came after start-up"
    assert took < 15, f"{took:.1f}s"
    up.assert_nothing_left()


def test_a_second_ctrl_c_during_a_step_stops_everything_at_once(tmp_path, teacher_model, student_model) -> None:
    """The pause holds step 2 before its update: the first Ctrl-C asks the trainer to end the run after the
    step (the run's status says "stopping"); a second one does not wait for the step, nor for anything."""
    up = Up(hf_stack(tmp_path, teacher_model, student_model, steps=5), tmp_path / "up.out", pause="train:2")
    try:
        up.wait_paused("train:2")
        up.proc.send_signal(signal.SIGINT)
        up.wait_for(lambda: up.run_status().get("state") == "stopping", "the first Ctrl-C to reach the trainer", timeout=30)
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
    """With step 2's rollouts in hand, the teacher's weights vanish and it is killed: each restart fails to
    load; beyond the limit opd up stops."""
    teacher = shutil.copytree(teacher_model, tmp_path / "teacher-copy")
    config = hf_stack(tmp_path, teacher, student_model, steps=5, restart={"max_restarts": 1, "backoff_s": 0.5})
    up = Up(config, tmp_path / "up.out", pause="score:2")
    try:
        up.wait_paused("score:2")
        for weights in teacher.glob("*.safetensors"):
            weights.unlink()
        began = time.monotonic()
        up.kill("teacher")
        up.release("score:2")
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
