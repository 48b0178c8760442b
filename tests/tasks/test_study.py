"""The efficiency study's arithmetic on hand-made metrics records."""

from __future__ import annotations

from pathlib import Path

from opd.tasks.study import Point, curve, first_reaching, plot, table


def records(accuracy_by_step: dict[int, float], *, seconds: float, tokens: int, scored: bool) -> list[dict]:
    """A run with one training record per step and evaluations at the given steps."""
    last = max(accuracy_by_step)
    out = [{"kind": "train", "step": s, "time_step": seconds, "tokens_sampled": tokens,
            "tokens_scored": tokens if scored else 0, "tokens_trained": tokens} for s in range(1, last + 1)]
    out += [{"kind": "eval", "step": s, "accuracy": a, "teacher_kl": 1.0 / (s + 1)} for s, a in accuracy_by_step.items()]
    return out


def test_a_curve_charges_each_evaluation_with_the_steps_before_it() -> None:
    points = curve(records({0: 0.1, 2: 0.5, 4: 0.8}, seconds=3.0, tokens=10, scored=True))
    assert points == [Point(0, 0.0, 0, 0.1, 1.0), Point(2, 6.0, 60, 0.5, 1 / 3), Point(4, 12.0, 120, 0.8, 0.2)]
    assert first_reaching(points, 0.5) == points[1] and first_reaching(points, 0.9) is None


def test_the_table_gives_costs_to_target_and_ratios_to_opd(tmp_path: Path) -> None:
    curves = {
        "opd": curve(records({0: 0.1, 2: 0.75, 4: 0.8}, seconds=4.0, tokens=10, scored=True)),
        "rl": curve(records({0: 0.1, 8: 0.4, 16: 0.76}, seconds=3.0, tokens=10, scored=False)),
        "sft": curve(records({0: 0.1, 10: 0.5, 20: 0.6}, seconds=2.0, tokens=10, scored=False)),
    }
    text = table(curves, teacher_accuracy=0.8)
    assert "target 90% of it = 0.720" in text
    assert "| opd | 0.100 | 0.800 | 0.800 | 1.000 | 0.200 | 2 | 60 | 8 |" in text
    assert "| rl | 0.100 | 0.760 | 0.760 | 1.000 | 0.059 | 16 | 320 | 48 |" in text
    assert "| sft | 0.100 | 0.600 | 0.600 | 1.000 | 0.048 | not in 20 (400 tokens, 40 s) | - | - |" in text
    assert "| RL/OPD | 8.0x | 5.3x | 6.0x | 7-10x fewer steps than RL |" in text
    assert "| SFT/OPD | >10.0x | >6.7x | >5.0x | 9-30x less compute |" in text, "a run that never got there: a lower bound"
    out = plot(curves, 0.8, tmp_path / "accuracy.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
