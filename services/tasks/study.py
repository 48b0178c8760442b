"""What the efficiency study reports, computed from each arm's metrics records.

    curves = {arm: curve(records) for arm, records in ...}
    print(table(curves, teacher_accuracy))
    plot(curves, teacher_accuracy, Path("accuracy.png"))

Choices:
1) A curve has one point per evaluation: the step, the training seconds and
   tokens spent up to it, held-out accuracy and teacher KL. Seconds are the
   sum of the steps' own times (sample, score, train, sync), evaluation time
   excluded, so arms are compared on what training costs.
2) Tokens are sampled + scored + trained completion tokens (objectives.py):
   opd pays for the teacher's scoring, rl pays for none, sft samples with the
   teacher's model instead of the student.
3) The target is `fraction` (0.9) of the teacher's held-out accuracy; an arm
   that never reaches it within the budget is reported with its best accuracy,
   and a ratio against it is a lower bound (">").
4) Several seeds: `seeds_table` gives each figure as the mean over seeds and
   its range (lowest-highest); `mean_curve` averages an arm's curves step by
   step for the plot. A point's `measures` are the task's further verdicts
   (`eval.measures`: correct, content), held out like the accuracy.
5) Beside the held-out teacher KL per token (`teacher_kl`) the tables and the
   plot give the KL per completion (`teacher_kl_per_completion`, the sum over
   a reply's tokens) where the records have it ("-" where they do not); it
   changes nothing the study measures or compares.
6) Per arm, `costs_table` gives the steps each seed took to reach the
   target, the seconds per training step and the bytes the teachers sent
   back per step (`teacher_bytes`: the scores, and a top-k loss's top-k, on
   the wire); `evaluations_table` gives the mean curves' every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

# The reference figures (Thinking Machines, "On-Policy Distillation", 2025).
BLOG = {"rl_steps": "7-10x", "compute": "9-30x"}


@dataclass(frozen=True)
class Point:
    step: int
    seconds: float
    tokens: int
    accuracy: float
    teacher_kl: float
    measures: dict[str, float] = field(default_factory=dict)
    teacher_kl_per_completion: float | None = None  # None: records from before the figure
    teacher_bytes: int = 0  # the teachers' responses to the scoring of the steps up to this one (6)


def per_completion(points: Sequence[Point]) -> list[float] | None:
    """The points' held-out KL per completion; None unless every point has it."""
    values = [pt.teacher_kl_per_completion for pt in points]
    return None if any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]


def kl_cells(before: Sequence[Point], after: Sequence[Point]) -> str:
    """'before | after' of the KL per completion over seeds (spread), '- | -' where a run lacks it."""
    b, a = per_completion(before), per_completion(after)
    return f"{spread(b)} | {spread(a)}" if b is not None and a is not None else "- | -"


def curve(records: list[dict[str, Any]]) -> list[Point]:
    """One point per evaluation record, with the training cost of the steps before it."""
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    out = []
    for e in sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"]):
        done = [r for r in train if r["step"] <= e["step"]]
        seconds = sum(r.get("time_step", 0.0) for r in done)
        tokens = sum(int(r.get("tokens_sampled", 0)) + int(r.get("tokens_scored", 0)) + int(r.get("tokens_trained", 0))
                     for r in done)
        measures = {k.removeprefix("accuracy_"): float(v) for k, v in e.items() if k.startswith("accuracy_")}
        completion = e.get("teacher_kl_per_completion")
        out.append(Point(e["step"], seconds, tokens, float(e.get("accuracy", float("nan"))),
                         float(e.get("teacher_kl", float("nan"))), measures,
                         float(completion) if isinstance(completion, (int, float)) else None,
                         sum(int(r.get("teacher_bytes", 0)) for r in done)))
    return out


def mean_curve(curves: Sequence[list[Point]]) -> list[Point]:
    """The seeds' curves of one arm averaged at each step all of them evaluated."""
    steps = sorted(set.intersection(*({pt.step for pt in c} for c in curves))) if curves else []
    out = []
    for step in steps:
        pts = [next(pt for pt in c if pt.step == step) for c in curves]
        names = [n for n in pts[0].measures if all(n in pt.measures for pt in pts)]  # in the runs' order
        completion = per_completion(pts)
        out.append(Point(step, fmean(pt.seconds for pt in pts), round(fmean(pt.tokens for pt in pts)),
                         fmean(pt.accuracy for pt in pts), fmean(pt.teacher_kl for pt in pts),
                         {n: fmean(pt.measures[n] for pt in pts) for n in names},
                         None if completion is None else fmean(completion), round(fmean(pt.teacher_bytes for pt in pts))))
    return out


def spread(values: Sequence[float], digits: int = 3) -> str:
    """'mean (lowest-highest)' over seeds; the bare value for one seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{fmean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def seeds_table(runs: dict[int, dict[str, list[Point]]], teachers: dict[int, dict[str, float]],
                measures: Sequence[str] = ("correct", "content")) -> str:
    """A markdown table over seeds: per arm, held-out form (the verifier), each measure and teacher KL (per token,
    then per completion), before and after, as the mean and range over seeds; the teacher (with its context) first.

    runs: seed -> arm -> curve; teachers: seed -> {"accuracy": ..., measure: ...}, the teacher's held-out figures."""
    seeds = sorted(runs)
    names = ["form", *measures]
    keys = ["accuracy", *measures]
    head = " | ".join(f"{n} before | {n} after" for n in names)
    lines = [f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): the mean over seeds, "
             "and its range in brackets; held out, after the last step",
             "", f"| arm | {head} | teacher KL before | teacher KL after | KL per completion before "
             "| KL per completion after |", "|---|" + "---|" * (2 * len(names) + 4)]
    teacher_cells = " | ".join(f"- | {spread([teachers[s].get(k, float('nan')) for s in seeds])}" for k in keys)
    lines.append(f"| teacher, with the context | {teacher_cells} | - | - | - | - |")
    arms = list(dict.fromkeys(arm for s in seeds for arm in runs[s]))
    for arm in arms:
        curves = [runs[s][arm] for s in seeds if arm in runs[s]]

        def value(pt: Point, key: str) -> float:
            return pt.accuracy if key == "accuracy" else pt.measures.get(key, float("nan"))

        cells = [f"{spread([value(c[0], k) for c in curves])} | {spread([value(c[-1], k) for c in curves])}" for k in keys]
        kl = f"{spread([c[0].teacher_kl for c in curves])} | {spread([c[-1].teacher_kl for c in curves])}"
        kl += f" | {kl_cells([c[0] for c in curves], [c[-1] for c in curves])}"
        lines.append(f"| {arm} | {' | '.join(cells)} | {kl} |")
    return "\n".join(lines)


def costs_table(runs: dict[int, dict[str, list[Point]]], teachers: dict[int, dict[str, float]], fraction: float = 0.9) -> str:
    """A markdown table (6): per arm, the step at which each seed's held-out form first reached `fraction` of that
    seed's teacher, and the mean and range over seeds of the seconds and the teachers' kilobytes per training step."""
    seeds = sorted(runs)
    lines = [f"per arm: the first evaluated step at which held-out form reached {fraction:.0%} of the teacher's "
             f"(seeds {', '.join(map(str, seeds))}; '-': not within the run); seconds and teacher kilobytes per "
             "training step, the mean over seeds and its range", "",
             f"| arm | steps to {fraction:.0%} of the teacher's form | seconds per step | teacher KB per step |",
             "|---|---|---|---|"]
    for arm in dict.fromkeys(arm for s in seeds for arm in runs[s]):
        curves = {s: runs[s][arm] for s in seeds if arm in runs[s]}
        hits = [first_reaching(c, fraction * teachers[s]["accuracy"]) for s, c in curves.items()]
        steps = ", ".join("-" if hit is None else str(hit.step) for hit in hits)
        done = [c[-1] for c in curves.values() if c[-1].step > 0]
        per_step = spread([pt.seconds / pt.step for pt in done], 1) if done else "-"
        kb = spread([pt.teacher_bytes / pt.step / 1000 for pt in done], 1) if done else "-"
        lines.append(f"| {arm} | {steps} | {per_step} | {kb} |")
    return "\n".join(lines)


def evaluations_table(means: dict[str, list[Point]]) -> str:
    """A markdown table (6): each arm's mean curve, one row per evaluation: form, each measure, teacher KL per token
    and per completion."""
    names = list(dict.fromkeys(n for points in means.values() for pt in points for n in pt.measures))
    lines = ["the mean over seeds at each evaluation, held out", "",
             f"| arm | step | form | {' | '.join(names)}{' | ' if names else ''}KL per token | KL per completion |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    for arm, points in means.items():
        for pt in points:
            cells = [f"{pt.measures[n]:.3f}" if n in pt.measures else "-" for n in names]
            completion = "-" if pt.teacher_kl_per_completion is None else f"{pt.teacher_kl_per_completion:.2f}"
            lines.append(f"| {arm} | {pt.step} | {pt.accuracy:.3f} | {' | '.join(cells)}{' | ' if names else ''}"
                         f"{pt.teacher_kl:.3f} | {completion} |")
    return "\n".join(lines)


def first_reaching(points: list[Point], target: float) -> Point | None:
    return next((pt for pt in points if pt.accuracy >= target), None)


def ratio(slow: Point | None, fast: Point | None, field: str, slow_budget: Point | None) -> str:
    """slow / fast on one cost; '>x' when the slow arm never reached the target (a lower bound); '-' when fast did not."""
    if fast is None or getattr(fast, field) == 0:
        return "-"
    if slow is None:
        return f">{getattr(slow_budget, field) / getattr(fast, field):.1f}x" if slow_budget is not None else "-"
    return f"{getattr(slow, field) / getattr(fast, field):.1f}x"


def table(curves: dict[str, list[Point]], teacher_accuracy: float, fraction: float = 0.9) -> str:
    """A markdown table: per arm, accuracy before/after and the cost to reach fraction x the teacher's accuracy."""
    target = fraction * teacher_accuracy
    lines = [
        f"teacher held-out accuracy {teacher_accuracy:.3f}; target {fraction:.0%} of it = {target:.3f}",
        "",
        "| arm | accuracy before | after | best | teacher KL before | after | KL per completion before | after "
        "| steps to target | tokens to target | seconds to target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reached = {}
    for arm, points in curves.items():
        hit = reached[arm] = first_reaching(points, target)
        best = max((pt.accuracy for pt in points), default=float("nan"))
        cost = (f"{hit.step} | {hit.tokens:,} | {hit.seconds:.0f}" if hit is not None
                else f"not in {points[-1].step} ({points[-1].tokens:,} tokens, {points[-1].seconds:.0f} s) | - | -")
        kl = f"{points[0].teacher_kl:.3f} | {points[-1].teacher_kl:.3f} | {kl_cells(points[:1], points[-1:])}"
        lines.append(f"| {arm} | {points[0].accuracy:.3f} | {points[-1].accuracy:.3f} | {best:.3f} | {kl} | {cost} |")
    ratios = []
    for arm in curves:
        blog = (f"{BLOG['rl_steps']} fewer steps than RL" if arm.startswith("rl")
                else f"{BLOG['compute']} less compute" if arm == "sft" else None)
        if blog is not None and "opd" in curves:
            last = curves[arm][-1]
            cells = [ratio(reached[arm], reached["opd"], f, last) for f in ("step", "tokens", "seconds")]
            ratios.append(f"| {arm.upper()}/OPD | {' | '.join(cells)} | {blog} |")
    if ratios:  # a study of opd alone (a sweep), or without opd, has nothing to compare
        lines += ["", "| ratio to opd | steps | tokens | seconds | the blog |", "|---|---|---|---|---|", *ratios]
    return "\n".join(lines)


def plot(curves: dict[str, list[Point]], teacher: float | dict[str, float], out: Path, fraction: float = 0.9) -> Path:
    """Held-out form accuracy against step and against training seconds, the `content` measure (when the runs have
    it) against step, held-out teacher KL per completion (when the runs have it) and per token; one line per arm.
    `teacher`: its held-out accuracy, or its figures by name ("accuracy", "content", ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = teacher if isinstance(teacher, dict) else {"accuracy": teacher}
    content = all("content" in pt.measures for points in curves.values() for pt in points)
    completion = all(per_completion(points) is not None for points in curves.values())
    count = 3 + content + completion
    fig, axes = plt.subplots(1, count, figsize=(5 * count, 4), dpi=120)
    panels = [(axes[0], "step", "accuracy", "training step"), (axes[1], "seconds", "accuracy", "training seconds (wall clock)")]
    if content:
        panels.append((axes[2], "step", "content", "training step"))
    for ax, x, y, label in panels:
        for arm, points in curves.items():
            ys = [pt.accuracy if y == "accuracy" else pt.measures[y] for pt in points]
            ax.plot([getattr(pt, x) for pt in points], ys, "o-", label=arm)
        if y in teacher:
            ax.axhline(teacher[y], color="black", linestyle="--", linewidth=1, label="teacher (with context)")
        if y == "accuracy":
            ax.axhline(fraction * teacher[y], color="grey", linestyle=":", linewidth=1, label=f"{fraction:.0%} of teacher")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (verifier: the form)" if y == "accuracy" else "held-out content (the right answer)")
        ax.grid(alpha=0.3)
    kl_panels = [(axes[-2], "teacher_kl_per_completion", "nats/completion")] if completion else []
    for ax, key, unit in [*kl_panels, (axes[-1], "teacher_kl", "nats/token")]:
        for arm, points in curves.items():
            ax.plot([pt.step for pt in points], [getattr(pt, key) for pt in points], "o-", label=arm)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"held-out teacher KL ({unit})")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right")
    fig.suptitle("the student under each objective: held-out form and content, and how far it moved from the teacher")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
