"""End to end over real HTTP: vLLM teacher and student services on the tiny models,
on-policy distillation with LoRA and with full fine-tuning.

What must hold (fixed seeds, so these runs repeat exactly):
- the teacher reverse KL on the 16 held-out prompts falls clearly: the last
  evaluation is below 80% of the one before training;
- the run is on-policy: every step's importance ratio stays within 2% of 1,
  which holds only if the student serves exactly the weights the trainer
  holds after every step (a stale or wrong sync shows at once);
- metrics, TensorBoard events, the plot, checkpoints and policy versions are
  where the design says, and old policy versions are pruned.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records

pytestmark = pytest.mark.slow
STEPS = 12


def run(config) -> list[dict]:
    assert Trainer(config).run() == "completed"
    return read_records(Path(config.output_dir) / "metrics.jsonl")


@pytest.mark.parametrize(
    ("finetune", "lr"),
    # LoRA before full: a LoRA run must also cope with a student left on another run's full weights.
    [("lora", 0.01), ("full", 0.001)],
)
def test_distillation_lowers_the_teacher_kl(make_config, checkpoint_root: Path, finetune: str, lr: float) -> None:
    config = make_config(name=f"distill-{finetune}", student__finetune=finetune, optimizer__lr=lr,
                         steps=STEPS, eval__every=6, save_every=6)
    records = run(config)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, 6, STEPS]
    first, last = evals[0]["teacher_kl"], evals[-1]["teacher_kl"]
    assert last < 0.8 * first, f"held-out teacher KL went from {first:.4f} to {last:.4f}"
    for r in train:
        assert 0.98 < r["ratio_min"] <= r["ratio_max"] < 1.02, f"step {r['step']} is off-policy: {r}"
        assert r["sequences"] == 32 and 32 <= r["tokens"] <= 32 * 16  # 8 prompts x 4 samples x 1..16 tokens
        assert min(r[k] for k in ("time_sample", "time_score", "time_train", "time_sync")) > 0
    versions = [r["policy_version"] for r in train]
    assert versions == sorted(set(versions)), "every step serves a new policy version"

    out = Path(config.output_dir)
    assert (out / "teacher_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    kept = sorted(d.name for d in (checkpoint_root / config.name).iterdir() if not d.name.startswith("."))
    assert kept == [f"v{v:06d}" for v in versions[-config.keep_versions:]]
    marker = "adapter_config.json" if finetune == "lora" else "config.json"
    assert (checkpoint_root / config.name / kept[-1] / marker).is_file()


def test_ppo_substeps_and_verifier(make_config) -> None:
    """Two substeps move the policy away from the sampler within a step: PPO sees ratios off 1 and clips.
    The held-out accuracy is the verifier's verdict on the evaluation completions (four prompts, so all of
    them are kept as text in eval_samples.jsonl and the accuracy is recomputed from them here); a measure
    beside it (eval.measures) is recorded as accuracy_<name>, and train_accuracy_<name> at each step."""
    from tests.trainer.tasks import is_short, mentions_a_word_of_the_prompt

    config = make_config(name="ppo", steps=2, substeps=2, loss__kind="ppo", loss__clip_range=0.05,
                         optimizer__lr=0.05, eval__every=2, dataset__eval_size=4,
                         eval__verifier="tests.trainer.tasks:mentions_a_word_of_the_prompt",
                         eval__measures={"short": "tests.trainer.tasks:is_short"})
    records = run(config)
    train = [r for r in records if r["kind"] == "train"]
    assert any(r["ratio_max"] > 1.001 or r["ratio_min"] < 0.999 for r in train), "the second substep is off-policy"
    assert any(r["clip_fraction"] > 0 for r in train)
    evals = [r for r in records if r["kind"] == "eval"]
    shown = read_records(Path(config.output_dir) / "eval_samples.jsonl")
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        verdicts = [mentions_a_word_of_the_prompt({"prompt": x["prompt"]}, x["completion"]) for x in shown if x["step"] == r["step"]]
        assert len(verdicts) == 4 and r["accuracy"] == sum(verdicts) / 4
        assert r["accuracy_short"] == sum(is_short({}, x["completion"]) for x in shown if x["step"] == r["step"]) / 4
    assert all(0 <= r["train_accuracy_short"] <= 1 and "train_accuracy" in r for r in train)


def test_the_task_reward_drives_the_update(make_config, tmp_path: Path) -> None:
    """With kl_coef 0 only the task reward can move the policy: with `prefers_short` a step has a loss and a
    gradient; without a reward the same step has neither. reward_mean is the raw reward's mean, -chars/100."""
    common = dict(steps=1, eval__every=0, save_every=1, kl_coef=0)
    rewarded = run(make_config(name="reward", reward_fn="tests.trainer.tasks:prefers_short",
                               output_dir=str(tmp_path / "reward"), **common))[0]
    plain = run(make_config(name="no-reward", output_dir=str(tmp_path / "plain"), **common))[0]
    assert rewarded["grad_norm"] > 0 and rewarded["loss"] != 0 and rewarded["reward_mean"] < 0
    assert plain["grad_norm"] == 0 and plain["loss"] == 0 and "reward_mean" not in plain


def test_top_p_run_stays_on_policy(make_config) -> None:
    """vLLM's nucleus logprobs (the student's) and the trainer's agree: with top_p < 1 the ratio stays at 1
    (scored without the nucleus it would sit near the nucleus mass, about top_p)."""
    config = make_config(name="top-p", steps=2, eval__every=0, save_every=2, sampling__top_p=0.8)
    for r in run(config):
        assert 0.98 < r["ratio_min"] <= r["ratio_max"] < 1.02, f"step {r['step']} is off-policy: {r}"
