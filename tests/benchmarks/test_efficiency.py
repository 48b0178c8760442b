"""The study (benchmarks/efficiency.py) end to end on a tiny model whose skill lives in a prompt: two seeds, opd and
an rl arm rewarded by one of the task's measures, hf engines, real processes and HTTP; then `--report` rebuilds the
tables from the finished runs alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.trainer.metrics import read_records
from tests.utils.skill_model import SKILL_CONTEXT, build_skill_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "efficiency.py"


def stack_file(tmp_path: Path, model: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about thing {i}"}) + "\n" for i in range(40)))
    engine = {"model": {"path": str(model)}, "engine": "hf", "dtype": "float32"}
    stack = {  # the study starts its services on free ports of its own
        "workdir": str(tmp_path / "unused"),
        "teacher": {**engine, "port": 18001},
        "student": {**engine, "port": 18002},
        "run": {
            "name": "study",
            "student": {"finetune": "lora", "lora": {"rank": 8, "alpha": 16}, "dtype": "float32", "device": "cpu",
                        "torch_threads": 1},
            "teacher_prompt": {"system": SKILL_CONTEXT},
            "dataset": {"path": str(prompts), "eval_size": 8},
            "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 4},
            "optimizer": {"lr": 0.01},
            "eval": {"every": 2, "samples_per_prompt": 2, "verifier": "tests.trainer.tasks:begins_with_the_skill_word",
                     "measures": {"short": "tests.trainer.tasks:is_short"}},
            "steps": 2,
            "seed": 7,
        },
    }
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack))
    return path


def test_two_seeds_a_topk_loss_and_an_rl_arm_rewarded_by_a_measure(tmp_path: Path, models_dir: Path, tiny_tokenizer: Path) -> None:
    model = build_skill_model(models_dir / "study-skill", tiny_tokenizer, steps=40)
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(stack_file(tmp_path, model)), "--workdir",
                           str(work), "--arms", "opd,opd-reverse,rl-short", "--seeds", "0,1", "--top-k", "4"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((work / "results.json").read_text())
    assert sorted(saved["teacher"]) == ["0", "1"] and set(saved["teacher"]["0"]) == {"accuracy", "short"}
    for seed in (0, 1):
        for arm, objective, reward, distill in (("opd", "opd", None, "sampled"), ("opd-reverse", "opd", None, "topk_reverse"),
                                                ("rl-short", "rl", "tests.trainer.tasks:is_short", "sampled")):
            config = json.loads((work / f"seed{seed}" / arm / "config.json").read_text())
            assert (config["seed"], config["objective"], config["reward_fn"]) == (seed, objective, reward)
            assert config["loss"]["distill"] == distill and (distill == "sampled" or config["loss"]["top_k"] == 4)
            evals = [r for r in read_records(work / f"seed{seed}" / arm / "metrics.jsonl") if r["kind"] == "eval"]
            assert [r["step"] for r in evals] == [0, 2] and all("accuracy_short" in r for r in evals)
            points = saved["runs"][str(seed)][arm]
            assert [pt["measures"]["short"] for pt in points] == [r["accuracy_short"] for r in evals]
    train = [r for r in read_records(work / "seed1" / "rl-short" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["tokens_scored"] == 0 and r["teacher_bytes"] == 0 for r in train), "an rl arm never asks the teacher"
    per_token = {arm: [r["teacher_bytes"] / r["tokens"] for r in read_records(work / "seed1" / arm / "metrics.jsonl")
                       if r["kind"] == "train"] for arm in ("opd", "opd-reverse")}
    assert min(per_token["opd-reverse"]) > 2 * max(per_token["opd"]) > 0, f"the top-4 costs bytes on the wire: {per_token}"
    text = (work / "results.md").read_text()
    assert "### seed 0" in text and "### seed 1" in text and "2 seeds (0, 1)" in text
    assert "| short before | short after |" in text and "| rl-short |" in text and "| RL-SHORT/OPD |" in text
    assert "### costs" in text and "| opd-reverse | " in text and "### every evaluation" in text
    assert (work / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (work / "results.md").unlink()
    again = subprocess.run([sys.executable, str(SCRIPT), "--report", "--workdir", str(work)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert (work / "results.md").read_text() == text, "the report is rebuilt from the runs' own records"


@pytest.mark.parametrize(("args", "message"), [
    (["--arms", "opd,rl-wrong"],
     "unknown arm 'rl-wrong': this stack's arms are opd, opd-forward, opd-reverse, opd-mix, sft, rl-form, rl-short"),
    (["--arms", "opd-reverse", "--top-k", "40"], "give a top-k from 1 to 20"),
    (["--seeds", "0,x"], "give seeds as integers"),
    (["--seeds", "1,1"], "distinct seeds"),
])
def test_a_wrong_arm_or_seed_is_refused_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(stack_file(tmp_path, tmp_path / "no-model")),
                           "--workdir", str(tmp_path / "w"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "w").exists(), "nothing was started or written"
