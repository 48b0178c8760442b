"""The teacher KL in words: a record's figures, and what the held-out KL did over a run.

    kl_text(record)                  # '5.432 per completion, 0.8057 per token'
    held_out_before_after(records)   # the lines `opd train`, `opd trainer demo` and `opd up` end with

Choices:
1) The KL per completion (`teacher_kl_per_completion`, the sum over a reply's
   tokens: what the objective minimises) comes first, the mean per token
   (`teacher_kl`) beside it. When replies shrink the mean per token can rise
   while the KL of a whole reply falls; the mean length tells them apart.
2) A record without the per-completion figure (a run from before it) shows
   the per-token figure alone, as it always did.
"""

from __future__ import annotations

from typing import Any

from opd.trainer.metrics import KL, KL_PER_COMPLETION, Record, per_teacher_kl


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kl_text(record: Record, name: str | None = None) -> str:
    """'5.432 per completion, 0.8057 per token' (one teacher's figures with `name`); '0.8057' without the first."""
    suffix = f"/{name}" if name else ""
    token, completion = record.get(KL + suffix), record.get(KL_PER_COMPLETION + suffix)
    per_token = f"{token:.4f}" if number(token) else "nan"
    return f"{completion:.3f} per completion, {per_token} per token" if number(completion) else per_token


def kl_change(first: Record, last: Record, name: str | None = None) -> str:
    """'13.651 -> 5.395 per completion, 0.8977 -> 0.9991 per token'; per token alone where either record lacks
    the per-completion figure."""
    suffix = f"/{name}" if name else ""

    def change(key: str, digits: int) -> str:
        values = [r.get(key + suffix) for r in (first, last)]
        return " -> ".join(f"{v:.{digits}f}" if number(v) else "nan" for v in values)

    if all(number(r.get(KL_PER_COMPLETION + suffix)) for r in (first, last)):
        return f"{change(KL_PER_COMPLETION, 3)} per completion, {change(KL, 4)} per token"
    return change(KL, 4)


def held_out_before_after(records: list[Record]) -> list[str]:
    """The held-out teacher KL at the first evaluation and at the last (with the mean length of the replies), then
    for a run of several teachers each teacher's (and its accuracy, with a verifier); none without evaluations."""
    evals = [r for r in records if r.get("kind") == "eval" and number(r.get(KL))]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    if len(evals) == 1:
        line = f"teacher KL on held-out prompts at step {last['step']}: {kl_text(last)}"
        if number(last.get("mean_length")):
            line += f"; mean length {last['mean_length']:.1f} tokens"
    else:
        line = f"teacher KL on held-out prompts, step {first['step']} -> step {last['step']}: {kl_change(first, last)}"
        if number(first.get("mean_length")) and number(last.get("mean_length")):
            line += f"; mean length {first['mean_length']:.1f} -> {last['mean_length']:.1f} tokens"
    return [line, *teachers_before_after(records)]


def teachers_before_after(records: list[Record]) -> list[str]:
    """Each teacher's held-out KL (and accuracy, with a verifier) at the first evaluation and at the last, one line
    each; none for a single-teacher run (its records carry no teacher_kl/<name>)."""
    evals = [r for r in records if r.get("kind") == "eval" and per_teacher_kl(r)]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    lines = [f"teacher KL on held-out prompts per teacher, step {first['step']} -> step {last['step']}:"]
    for name in per_teacher_kl(first) | per_teacher_kl(last):
        line = f"  {name}: {kl_change(first, last, name)}"
        if isinstance(first.get(f"accuracy/{name}"), (int, float)) and isinstance(last.get(f"accuracy/{name}"), (int, float)):
            line += f"  (accuracy {first[f'accuracy/{name}']:.3f} -> {last[f'accuracy/{name}']:.3f})"
        lines.append(line)
    return lines
