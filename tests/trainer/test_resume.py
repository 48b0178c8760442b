"""Resume: N steps straight equal a run killed after step N/2 + 1, and resumed.

The killed and the resumed runs are real `opd train CONFIG.yaml` processes.
The kill lands once step N/2 + 1 is published to the student and written to
the metrics, but not checkpointed (the checkpoint is at N/2): the resumed run
must drop that step's record, supersede the version the student serves, and
train step N/2 + 1 again exactly. LoRA dropout draws from torch's RNG, so the
RNG state restored from the checkpoint matters. Stated tolerance: every
step's metrics agree with the straight run's to 1e-4 (token counts exactly)
and the final trainable weights to 1e-5: the resumed run draws the same
prompts with the same seeds from the same weights and RNG state, so it
computes the same thing.

Also: a stop during an evaluation, and a missing config.json.
"""

from __future__ import annotations

import json

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from opd.trainer.checkpoint import read_trainable
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS, HALF = 8, 4
COMPARED = ("teacher_kl", "entropy", "loss", "grad_norm", "ratio_mean")


def train_process(config_file: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "opd", "train", str(config_file), "--no-progress"],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300.0) -> None:
    """SIGKILL as soon as the train record of `step` is written (after its weights were published)."""
    deadline = time.monotonic() + timeout
    while not any(r["kind"] == "train" and r["step"] == step for r in read_records(metrics)):
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout:.0f}s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_equals_the_straight_run(make_config, services, tmp_path: Path) -> None:
    from opd.common.client import StudentClient

    common = dict(steps=STEPS, save_every=HALF, eval__every=HALF, student__lora__dropout=0.1)
    straight = make_config(name="straight", output_dir=str(tmp_path / "straight"), **common)
    assert Trainer(straight).run() == "completed"

    resumed = make_config(name="resumed", output_dir=str(tmp_path / "resumed"), **common)
    config_file = tmp_path / "resumed.yaml"
    config_file.write_text(yaml.safe_dump(resumed.model_dump(mode="json")))
    out = Path(resumed.output_dir)
    kill_after(train_process(config_file), out / "metrics.jsonl", HALF + 1)
    killed = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in killed if r["kind"] == "train"][-1] == HALF + 1 < STEPS
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == [f"step-{HALF:06d}"], "step 5 not checkpointed"
    published = killed[-1]["policy_version"]
    assert StudentClient(services["student"].url).info().policy_version == published, "the student serves step 5"

    proc = train_process(config_file)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step-{HALF:06d}'}" in log

    a = read_records(Path(straight.output_dir) / "metrics.jsonl")
    b = read_records(out / "metrics.jsonl")
    assert next(r for r in b if r["step"] == HALF + 1)["policy_version"] > published, "the served version superseded"
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b], "no step skipped or counted twice"
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        for key in COMPARED:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["kind"], ra["step"], key)
    final = f"step-{STEPS:06d}"
    wa = read_trainable(Path(straight.output_dir) / "checkpoints" / final)
    wb = read_trainable(out / "checkpoints" / final)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert any(not torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k), "the adapter trained"


def test_resume_refuses_a_different_config(make_config, tmp_path: Path) -> None:
    from opd.trainer.checkpoint import CheckpointError

    first = make_config(name="refuse", steps=1, save_every=1, eval__every=0, output_dir=str(tmp_path / "r"))
    assert Trainer(first).run() == "completed"
    threads = torch.get_num_threads()
    changed = make_config(name="refuse", steps=2, eval__every=0, output_dir=str(tmp_path / "r"), kl_coef=0.5)
    refused = Trainer(changed)
    with pytest.raises(CheckpointError, match="kl_coef"):
        refused.run()
    assert refused.policy is None, "a resume of another config is refused before any model loads"
    assert torch.get_num_threads() == threads, "and gives torch its thread count back (student.torch_threads is 1)"
    for saved in (tmp_path / "r").rglob("config.json"):  # as written before student.precision existed
        tree = json.loads(saved.read_text())
        if "student" in tree:
            del tree["student"]["precision"]
            saved.write_text(json.dumps(tree))
    longer = make_config(name="refuse", steps=2, save_every=1, eval__every=0, output_dir=str(tmp_path / "r"))
    assert Trainer(longer).run() == "completed"  # more steps is the same run, continued; an added setting's default too
    assert [r["step"] for r in read_records(tmp_path / "r" / "metrics.jsonl")] == [1, 2]


def test_a_stop_during_an_evaluation_keeps_its_record(make_config, tmp_path: Path) -> None:
    """The stop request comes while step 2's evaluation waits for a student that is down: the run ends,
    checkpointing step 2; resumed, it evaluates step 2 first, so no evaluation is lost."""
    from opd.common.errors import ServiceError

    config = make_config(name="stop-eval", steps=3, eval__every=2, save_every=3, output_dir=str(tmp_path / "r"))

    class StoppedDuringEval(Trainer):
        def evaluate(self):
            if self.step != 2 or self.stop.is_set():
                return super().evaluate()

            def down(request):
                self.stop.set()  # POST /runs/{id}/stop, while the student is unavailable
                raise ServiceError(503, "the student is restarting")

            self.remote.student.rollouts = down
            try:
                return super().evaluate()
            finally:
                del self.remote.student.rollouts

    assert StoppedDuringEval(config).run() == "stopped"
    done = lambda: [(r["kind"], r["step"]) for r in read_records(tmp_path / "r" / "metrics.jsonl")]  # noqa: E731
    assert done() == [("eval", 0), ("train", 1), ("train", 2)]
    assert Trainer(config).run() == "completed"
    assert done() == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]


def test_a_missing_config_json_keeps_the_checkpoints(make_config, tmp_path: Path) -> None:
    """Each checkpoint carries its run's config: without output_dir/config.json a run still resumes (and
    still refuses other settings); with no config at all it refuses instead of deleting the checkpoints."""
    from opd.trainer.checkpoint import CheckpointError

    out = tmp_path / "r"
    make = lambda **kw: make_config(name="no-config", save_every=1, eval__every=0, output_dir=str(out), **kw)  # noqa: E731
    assert Trainer(make(steps=1)).run() == "completed"
    step_1 = read_records(out / "metrics.jsonl")
    (out / "config.json").unlink()
    assert Trainer(make(steps=2)).run() == "completed"
    records = read_records(out / "metrics.jsonl")
    assert records[:1] == step_1 and [r["step"] for r in records] == [1, 2], "step 1 resumed, not trained again"
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="kl_coef"):
        Trainer(make(steps=3, kl_coef=0.5)).run()
    assert not (out / "config.json").exists()
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="resume=false"):
        Trainer(make(steps=3)).run()
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
