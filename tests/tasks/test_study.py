"""The efficiency study's arithmetic on hand-made metrics records."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.tasks.study import Point, costs_table, curve, evaluations_table, first_reaching, mean_curve, plot, seeds_table, table


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
    # records without the KL per completion (runs from before it): "-" in its columns
    assert "| opd | 0.100 | 0.800 | 0.800 | 1.000 | 0.200 | - | - | 2 | 60 | 8 |" in text
    assert "| rl | 0.100 | 0.760 | 0.760 | 1.000 | 0.059 | - | - | 16 | 320 | 48 |" in text
    assert "| sft | 0.100 | 0.600 | 0.600 | 1.000 | 0.048 | - | - | not in 20 (400 tokens, 40 s) | - | - |" in text
    assert "| RL/OPD | 8.0x | 5.3x | 6.0x | 7-10x fewer steps than RL |" in text
    assert "| SFT/OPD | >10.0x | >6.7x | >5.0x | 9-30x less compute |" in text, "a run that never got there: a lower bound"
    out = plot(curves, 0.8, tmp_path / "accuracy.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_give_the_mean_and_range_of_every_measure_and_the_teachers_figures() -> None:
    def run(acc: tuple[float, float], content: tuple[float, float], kl_after: float) -> list[Point]:
        return [Point(0, 0.0, 0, acc[0], 0.8, {"correct": 0.0, "content": content[0]}),
                Point(4, 10.0, 40, acc[1], kl_after, {"correct": acc[1] * content[1], "content": content[1]})]

    runs = {
        0: {"opd": run((0.0, 0.8), (0.2, 0.25), 0.3), "rl-correct": run((0.0, 0.5), (0.2, 0.1), 2.0)},
        1: {"opd": run((0.1, 0.6), (0.2, 0.15), 0.5), "rl-correct": run((0.1, 0.7), (0.2, 0.3), 3.0)},
    }
    teachers = {0: {"accuracy": 0.75, "correct": 0.2, "content": 0.25}, 1: {"accuracy": 0.85, "correct": 0.1, "content": 0.15}}
    text = seeds_table(runs, teachers)
    assert text.startswith("2 seeds (0, 1)")
    assert ("| teacher, with the context | - | 0.800 (0.750-0.850) | - | 0.150 (0.100-0.200) | - | 0.200 (0.150-0.250) "
            "| - | - | - | - |") in text
    # form before/after, correct before/after, content before/after, KL before/after, KL per completion before/after
    assert ("| opd | 0.050 (0.000-0.100) | 0.700 (0.600-0.800) | 0.000 (0.000-0.000) | 0.145 (0.090-0.200) "
            "| 0.200 (0.200-0.200) | 0.200 (0.150-0.250) | 0.800 (0.800-0.800) | 0.400 (0.300-0.500) | - | - |") in text
    assert "| rl-correct | 0.050 (0.000-0.100) | 0.600 (0.500-0.700) |" in text
    assert text.index("| opd |") < text.index("| rl-correct |"), "arms in the order they ran"
    one = seeds_table({3: runs[0]}, {3: teachers[0]})
    assert one.startswith("1 seed (3)") and "| opd | 0.000 | 0.800 | 0.000 | 0.200 | 0.200 | 0.250 | 0.800 | 0.300 | - | - |" in one


def test_a_mean_curve_averages_the_seeds_at_the_steps_all_of_them_evaluated(tmp_path: Path) -> None:
    a = [Point(0, 0.0, 0, 0.0, 1.0, {"content": 0.2}), Point(2, 4.0, 10, 0.5, 0.5, {"content": 0.3}),
         Point(4, 8.0, 20, 0.7, 0.4, {"content": 0.1})]
    b = [Point(0, 0.0, 0, 0.2, 2.0, {"content": 0.4}), Point(4, 10.0, 30, 0.9, 0.6, {"content": 0.3})]
    mean = mean_curve([a, b])
    assert [pt.step for pt in mean] == [0, 4], "step 2 is one seed's only"
    assert mean[1].accuracy == pytest.approx(0.8) and mean[1].seconds == 9.0 and mean[1].tokens == 25
    assert mean[1].teacher_kl == pytest.approx(0.5) and mean[1].measures["content"] == pytest.approx(0.2)
    two = [Point(0, 0.0, 0, 0.0, 1.0, {"correct": 0.1, "content": 0.2, "short": 0.5}),
           Point(0, 0.0, 0, 0.0, 1.0, {"correct": 0.3, "content": 0.4})]
    assert list(mean_curve([[two[0]], [two[1]]])[0].measures) == ["correct", "content"], "the runs' order, all seeds'"
    out = plot({"opd": mean}, {"accuracy": 0.8, "content": 0.25}, tmp_path / "mean.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_curve_carries_the_held_out_measures() -> None:
    records = [{"kind": "eval", "step": 0, "accuracy": 0.5, "accuracy_correct": 0.25, "accuracy_content": 0.5,
                "teacher_kl": 1.0}]
    assert curve(records)[0].measures == {"correct": 0.25, "content": 0.5}


def test_every_rl_arm_is_compared_with_opd() -> None:
    curves = {"opd": curve(records({0: 0.1, 2: 0.75}, seconds=4.0, tokens=10, scored=True)),
              "rl-form": curve(records({0: 0.1, 4: 0.76}, seconds=3.0, tokens=10, scored=False)),
              "rl-correct": curve(records({0: 0.1, 4: 0.2}, seconds=3.0, tokens=10, scored=False))}
    text = table(curves, teacher_accuracy=0.8)
    assert "| RL-FORM/OPD | 2.0x | 1.3x | 1.5x | 7-10x fewer steps than RL |" in text
    assert "| RL-CORRECT/OPD | >2.0x | >1.3x | >1.5x |" in text


def test_a_study_of_one_arm_has_no_table_of_ratios() -> None:
    """A sweep runs opd alone (or sft alone): no ratio to compare, so no empty table under the costs."""
    for arm in ("opd", "sft"):
        text = table({arm: curve(records({0: 0.1, 2: 0.75}, seconds=4.0, tokens=10, scored=True))}, teacher_accuracy=0.8)
        assert f"| {arm} | 0.100 | 0.750 |" in text
        assert "ratio to opd" not in text, text


def test_the_kl_per_completion_stands_beside_the_kl_per_token_without_changing_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies that shrink: per token 0.5 -> 1.0, per completion (x mean length 8 -> 2) 4.0 -> 2.0."""
    import matplotlib.pyplot as plt

    def run(seconds: float, after: float) -> list[dict]:
        out = records({0: 0.1, 2: 0.75}, seconds=seconds, tokens=10, scored=True)
        for r, (kl, completion) in zip(out[-2:], ((0.5, 4.0), (1.0, after)), strict=True):
            r.update(teacher_kl=kl, teacher_kl_per_completion=completion)
        return out

    opd = curve(run(4.0, 2.0))
    assert [(pt.teacher_kl, pt.teacher_kl_per_completion) for pt in opd] == [(0.5, 4.0), (1.0, 2.0)]
    assert opd == curve(run(4.0, 2.0)) and opd[0].accuracy == 0.1 and opd[1].seconds == 8.0, "the rest is as it was"
    assert "| opd | 0.100 | 0.750 | 0.750 | 0.500 | 1.000 | 4.000 | 2.000 | 2 | 60 | 8 |" in table({"opd": opd}, 0.8)
    other = curve(run(4.0, 3.0))
    assert mean_curve([opd, other])[1].teacher_kl_per_completion == pytest.approx(2.5)
    assert mean_curve([opd, curve(records({0: 0.1, 2: 0.75}, seconds=4.0, tokens=10, scored=True))])[1] \
        .teacher_kl_per_completion is None, "a seed without the figure: no mean of it"
    text = seeds_table({0: {"opd": opd}, 1: {"opd": other}}, {0: {"accuracy": 0.8}, 1: {"accuracy": 0.8}}, measures=())
    assert "| KL per completion before | KL per completion after |" in text
    assert "| 0.500 (0.500-0.500) | 1.000 (1.000-1.000) | 4.000 (4.000-4.000) | 2.500 (2.000-3.000) |" in text
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    plot({"opd": opd}, 0.8, tmp_path / "accuracy.png")
    labels = [ax.get_ylabel() for ax in figures[-1].axes]
    assert labels[-2:] == ["held-out teacher KL (nats/completion)", "held-out teacher KL (nats/token)"]
    assert list(figures[-1].axes[-2].get_lines()[0].get_ydata()) == [4.0, 2.0]


def test_the_costs_give_steps_to_target_per_seed_and_seconds_and_teacher_bytes_per_step() -> None:
    def run(accuracy_by_step: dict[int, float], seconds: float, per_step_bytes: int) -> list[Point]:
        rows = records(accuracy_by_step, seconds=seconds, tokens=10, scored=True)
        return curve([r | {"teacher_bytes": per_step_bytes} if r["kind"] == "train" else r for r in rows])

    runs = {0: {"opd": run({0: 0.1, 2: 0.8, 4: 0.9}, 4.0, 1000), "opd-reverse": run({0: 0.1, 2: 0.5, 4: 0.95}, 5.0, 9000)},
            1: {"opd": run({0: 0.1, 2: 0.3, 4: 0.5}, 6.0, 1000), "opd-reverse": run({0: 0.1, 2: 0.9, 4: 0.9}, 5.0, 11000)}}
    assert runs[0]["opd"][-1].teacher_bytes == 4000, "bytes add up over the steps before an evaluation"
    text = costs_table(runs, {0: {"accuracy": 1.0}, 1: {"accuracy": 0.5}})
    assert "| opd | 4, 4 | 5.0 (4.0-6.0) | 1.0 (1.0-1.0) |" in text  # seed 1 is held to its own, weaker teacher: 0.45
    assert "| opd-reverse | 4, 2 | 5.0 (5.0-5.0) | 10.0 (9.0-11.0) |" in text
    assert "| opd | 2, - |" in costs_table(runs, {0: {"accuracy": 0.8}, 1: {"accuracy": 1.0}}), "never reached: '-'"

    means = {arm: mean_curve([runs[0][arm], runs[1][arm]]) for arm in ("opd", "opd-reverse")}
    rows = evaluations_table(means).splitlines()
    assert "| arm | step | form | KL per token | KL per completion |" in rows
    assert "| opd-reverse | 2 | 0.700 | 0.333 | - |" in rows and len([r for r in rows if r.startswith("| opd")]) == 6
