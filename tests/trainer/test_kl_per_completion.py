"""The teacher KL per completion beside the mean per token, on hand-made samples: records, plot and end lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.trainer.metrics import KL, KL_PER_COMPLETION, kl_series, per_teacher_kl, plot_teacher_kl
from opd.trainer.rollouts import Sample, kl_summary, teacher_kl, teacher_kl_per_completion
from opd.trainer.summary import held_out_before_after, kl_change, kl_text


def sample(rkl: list[float], teacher: str = "default") -> Sample:
    """A scored completion of len(rkl) tokens whose per-token reverse KL is `rkl` (student -1 nat a token)."""
    return Sample(0, [1, 2], list(range(len(rkl))), [-1.0] * len(rkl), "x", "stop", {}, [-1.0 - k for k in rkl],
                  teacher=teacher)


# Two completions, of 1 and 3 tokens: 2.0 nats on the one token, 0.5 + 0 + 1.0 = 1.5 nats over the three.
SHORT, LONG = [2.0], [0.5, 0.0, 1.0]


def test_the_kl_per_completion_sums_each_completion_then_averages_over_completions() -> None:
    samples = [sample(SHORT), sample(LONG)]
    summary = kl_summary(samples)
    assert summary[KL] == pytest.approx(3.5 / 4), "per token: 3.5 nats over 4 tokens"
    assert summary[KL_PER_COMPLETION] == pytest.approx(3.5 / 2), "per completion: (2.0 + 1.5) / 2"
    assert summary["mean_length"] == 2.0 and summary["tokens"] == 4 and summary["sequences"] == 2
    assert summary[KL_PER_COMPLETION] == pytest.approx(summary[KL] * summary["mean_length"])
    assert not per_teacher_kl(summary) and not per_teacher_kl(summary, KL_PER_COMPLETION), "one teacher: no per-teacher"
    assert teacher_kl_per_completion([]) == 0.0 and teacher_kl([]) == 0.0
    assert kl_summary([])[KL_PER_COMPLETION] == 0.0
    unscored = [Sample(0, [1], [5], [-1.0], "x", "stop", {})]
    assert KL_PER_COMPLETION not in kl_summary(unscored), "the rl and sft arms ask no teacher while training"


def test_a_run_of_two_teachers_records_each_teachers_kl_per_completion() -> None:
    # teacher a: the 1-token completion and another of 2 tokens (0.25 + 0.25); teacher b: the 3-token one.
    samples = [sample(SHORT, "a"), sample(LONG, "b"), sample([0.25, 0.25], "a")]
    summary = kl_summary(samples, ["a", "b"])
    assert summary["teacher_kl/a"] == pytest.approx(2.5 / 3) and summary["teacher_kl_per_completion/a"] == pytest.approx(1.25)
    assert summary["teacher_kl/b"] == pytest.approx(0.5) and summary["teacher_kl_per_completion/b"] == pytest.approx(1.5)
    assert summary[KL] == pytest.approx(4.0 / 6) and summary[KL_PER_COMPLETION] == pytest.approx(4.0 / 3)
    assert per_teacher_kl(summary, KL_PER_COMPLETION) == pytest.approx({"a": 1.25, "b": 1.5})
    assert per_teacher_kl(summary) == pytest.approx({"a": 2.5 / 3, "b": 0.5}), "teacher_kl/<name> alone"
    assert "teacher_kl/c" not in kl_summary(samples, ["a", "b", "c"]), "a teacher without samples has no figure"


def shrinking() -> list[dict]:
    """Replies that shrink from 3 tokens to 1: the mean per token rises (0.5 -> 1.25), per completion falls
    (1.5 -> 1.25)."""
    before = kl_summary([sample(LONG, "a"), sample(LONG, "b")], ["a", "b"])
    after = kl_summary([sample([1.0], "a"), sample([1.5], "b")], ["a", "b"])
    return [{"kind": "eval", "step": 0, **before}, {"kind": "train", "step": 1, **after},
            {"kind": "eval", "step": 2, **after}]


def test_the_plot_leads_with_the_kl_per_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    records = shrinking()
    assert kl_series(records, KL_PER_COMPLETION) == {
        "training samples": [(1, 1.25)], "held-out prompts": [(0, 1.5), (2, 1.25)],
        "held-out, teacher a": [(0, 1.5), (2, 1.0)], "held-out, teacher b": [(0, 1.5), (2, 1.5)]}
    assert kl_series(records)["held-out prompts"] == [(0, 0.5), (2, 1.25)], "the per-token lines are as they were"
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    assert plot_teacher_kl(records, tmp_path / "teacher_kl.png").read_bytes()[:4] == b"\x89PNG"
    top, below = figures[-1].axes
    assert "completion" in top.get_ylabel() and "token" in below.get_ylabel()
    held_out = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    assert held_out["held-out prompts"] == [1.5, 1.25] and held_out["held-out, teacher a"] == [1.5, 1.0]
    assert [line.get_label() for line in below.get_lines()][:2] == ["training samples", "held-out prompts"]
    old = [{"kind": "eval", "step": 0, KL: 0.9}, {"kind": "train", "step": 1, KL: 0.8}]
    plot_teacher_kl(old, tmp_path / "old.png")
    assert len(figures[-1].axes) == 1 and "token" in figures[-1].axes[0].get_ylabel(), "records of before: one panel"


def test_the_end_lines_give_the_held_out_kl_per_completion_and_per_token_first_to_last() -> None:
    records = shrinking()
    first, _, last = records
    assert kl_text(first) == "1.500 per completion, 0.5000 per token"
    assert kl_text(last, "b") == "1.500 per completion, 1.5000 per token"
    assert kl_text({KL: 0.5}) == "0.5000", "a record of before: per token alone"
    assert kl_change(first, last) == "1.500 -> 1.250 per completion, 0.5000 -> 1.2500 per token"
    assert held_out_before_after(records) == [
        "teacher KL on held-out prompts, step 0 -> step 2: 1.500 -> 1.250 per completion, 0.5000 -> 1.2500 per token; "
        "mean length 3.0 -> 1.0 tokens",
        "teacher KL on held-out prompts per teacher, step 0 -> step 2:",
        "  a: 1.500 -> 1.000 per completion, 0.5000 -> 1.0000 per token",
        "  b: 1.500 -> 1.500 per completion, 0.5000 -> 1.5000 per token"]
    assert held_out_before_after([{"kind": "train", "step": 1, KL: 0.5}]) == [], "no evaluation, nothing to say"


def test_the_trainers_log_line_gives_both_figures_and_each_teachers() -> None:
    from types import SimpleNamespace

    from opd.trainer.loop import Trainer

    me = SimpleNamespace(teacher_names=["a", "b"])
    me.per_teacher = lambda record, key=KL: Trainer.per_teacher(me, record, key)
    after = shrinking()[-1]
    assert Trainer.kl_log(me, after) == ("teacher_kl_per_completion 1.250 (a 1.000, b 1.500) "
                                         "teacher_kl 1.2500 (a 1.000, b 1.500) mean_length 1.0")
    me.teacher_names = []
    assert Trainer.kl_log(me, {"tokens": 4}) == "teacher_kl_per_completion nan teacher_kl nan mean_length nan", "rl, sft"


def test_opd_train_ends_with_the_held_out_kl_first_to_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`opd train`'s last lines, on a run (a stand-in for the trainer) whose records it reads."""
    import json

    from typer.testing import CliRunner

    from opd.cli import app
    from opd.trainer import loop

    class Written:
        def __init__(self, config, **kwargs) -> None:
            self.out = Path(config.output_dir)

        def run(self) -> str:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shrinking()))
            return "completed"

    monkeypatch.setattr(loop, "Trainer", Written)
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[2] / "services" / "configs" / "smollm2.yaml"
    result = CliRunner().invoke(app, ["train", str(config), "--set", f"output_dir={out}", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"completed: metrics {out / 'metrics.jsonl'}, plot {out / 'teacher_kl.png'}"
    assert lines[1:] == held_out_before_after(shrinking())
    assert lines[1].startswith("teacher KL on held-out prompts, step 0 -> step 2: 1.500 -> 1.250 per completion")
