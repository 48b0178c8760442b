"""Resume: N steps straight equal N/2 steps, a SIGKILL, and a resume.

The killed and the resumed runs are real `opd train CONFIG.yaml` processes;
the kill lands right after the step-N/2 checkpoint appears, in the middle of
whatever comes next. Stated tolerance: every step's metrics agree with the
straight run's to 1e-4 (token counts exactly) and the final trainable weights
to 1e-5: the resumed run draws the same prompts with the same seeds from the
same weights, so it computes the same thing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from services.trainer.loop import Trainer
from services.trainer.metrics import read_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS, HALF = 8, 4
COMPARED = ("teacher_kl", "entropy", "loss", "grad_norm", "ratio_mean")


def train_process(config_file: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "services", "train", str(config_file), "--no-progress"],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(proc: subprocess.Popen, marker: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {marker.name}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {marker.name} after {timeout:.0f}s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_equals_the_straight_run(make_config, tmp_path: Path) -> None:
    common = dict(steps=STEPS, save_every=HALF, eval__every=HALF)
    straight = make_config(name="straight", output_dir=str(tmp_path / "straight"), **common)
    assert Trainer(straight).run() == "completed"

    resumed = make_config(name="resumed", output_dir=str(tmp_path / "resumed"), **common)
    config_file = tmp_path / "resumed.yaml"
    config_file.write_text(yaml.safe_dump(resumed.model_dump(mode="json")))
    out = Path(resumed.output_dir)
    kill_after(train_process(config_file), out / "checkpoints" / f"step-{HALF:06d}")
    before = read_records(out / "metrics.jsonl")
    assert max(r["step"] for r in before) < STEPS, "the kill came too late to test anything"

    proc = train_process(config_file)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step-{HALF:06d}'}" in log

    a = read_records(Path(straight.output_dir) / "metrics.jsonl")
    b = read_records(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b], "no step skipped or counted twice"
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        for key in COMPARED:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["kind"], ra["step"], key)
    final = f"step-{STEPS:06d}"
    wa = load_file(str(Path(straight.output_dir) / "checkpoints" / final / "trainable.safetensors"))
    wb = load_file(str(out / "checkpoints" / final / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert any(not torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k), "the adapter trained"


def test_resume_refuses_a_different_config(make_config, tmp_path: Path) -> None:
    from services.trainer.checkpoint import CheckpointError

    first = make_config(name="refuse", steps=1, save_every=1, eval__every=0, output_dir=str(tmp_path / "r"))
    assert Trainer(first).run() == "completed"
    changed = make_config(name="refuse", steps=2, eval__every=0, output_dir=str(tmp_path / "r"), kl_coef=0.5)
    with pytest.raises(CheckpointError, match="kl_coef"):
        Trainer(changed).run()
    longer = make_config(name="refuse", steps=2, save_every=1, eval__every=0, output_dir=str(tmp_path / "r"))
    assert Trainer(longer).run() == "completed"  # more steps is the same run, continued
    assert [r["step"] for r in read_records(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
