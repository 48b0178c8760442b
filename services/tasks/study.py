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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


def curve(records: list[dict[str, Any]]) -> list[Point]:
    """One point per evaluation record, with the training cost of the steps before it."""
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    out = []
    for e in sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"]):
        done = [r for r in train if r["step"] <= e["step"]]
        seconds = sum(r.get("time_step", 0.0) for r in done)
        tokens = sum(int(r.get("tokens_sampled", 0)) + int(r.get("tokens_scored", 0)) + int(r.get("tokens_trained", 0))
                     for r in done)
        out.append(Point(e["step"], seconds, tokens, float(e.get("accuracy", float("nan"))),
                         float(e.get("teacher_kl", float("nan")))))
    return out


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
        "| arm | accuracy before | after | best | teacher KL before | after | steps to target | tokens to target "
        "| seconds to target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reached = {}
    for arm, points in curves.items():
        hit = reached[arm] = first_reaching(points, target)
        best = max((pt.accuracy for pt in points), default=float("nan"))
        cost = (f"{hit.step} | {hit.tokens:,} | {hit.seconds:.0f}" if hit is not None
                else f"not in {points[-1].step} ({points[-1].tokens:,} tokens, {points[-1].seconds:.0f} s) | - | -")
        kl = f"{points[0].teacher_kl:.3f} | {points[-1].teacher_kl:.3f}"
        lines.append(f"| {arm} | {points[0].accuracy:.3f} | {points[-1].accuracy:.3f} | {best:.3f} | {kl} | {cost} |")
    if "opd" in curves:
        lines += ["", "| ratio to opd | steps | tokens | seconds | the blog |", "|---|---|---|---|---|"]
        for arm, blog in (("rl", f"{BLOG['rl_steps']} fewer steps than RL"), ("sft", f"{BLOG['compute']} less compute")):
            if arm in curves:
                last = curves[arm][-1]
                cells = [ratio(reached[arm], reached["opd"], f, last) for f in ("step", "tokens", "seconds")]
                lines.append(f"| {arm.upper()}/OPD | {' | '.join(cells)} | {blog} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[Point]], teacher_accuracy: float, out: Path, fraction: float = 0.9) -> Path:
    """Held-out accuracy against step and against training seconds, and held-out teacher KL; one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=120)
    for ax, field, label in ((axes[0], "step", "training step"), (axes[1], "seconds", "training seconds (wall clock)")):
        for arm, points in curves.items():
            ax.plot([getattr(pt, field) for pt in points], [pt.accuracy for pt in points], "o-", label=arm)
        ax.axhline(teacher_accuracy, color="black", linestyle="--", linewidth=1, label="teacher (with context)")
        ax.axhline(fraction * teacher_accuracy, color="grey", linestyle=":", linewidth=1, label=f"{fraction:.0%} of teacher")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for arm, points in curves.items():
        axes[2].plot([pt.step for pt in points], [pt.teacher_kl for pt in points], "o-", label=arm)
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("held-out teacher KL (nats/token)")
    axes[2].grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (verifier)")
    axes[1].legend(loc="lower right")
    fig.suptitle("the student under three objectives: held-out accuracy, and how far it moved from the teacher")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
