"""What `opd up` shows a person: a run's progress step by step, samples side by side, and how it ended."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from opd.trainer.metrics import KL, per_teacher_kl, read_records
from opd.trainer.summary import held_out_before_after, kl_text

DONE = {"completed", "failed", "stopped"}
STEP_DIR = re.compile(r"^step-(\d{6,})$")  # the trainer's checkpoint folders (trainer/checkpoint.py)


def step_line(record: dict[str, Any]) -> str:
    """The teacher KL per completion and per token (summary.py), accuracy, entropy, tokens, mean length, times."""
    parts = [f"step {record['step']:>3}"]
    if KL in record:  # the rl and sft arms ask no teacher while training
        parts.append(f"teacher KL {kl_text(record)}")
    for key, label in (("train_accuracy", "accuracy"), ("entropy", "entropy"), ("tokens", "tokens"),
                       ("mean_length", "mean length")):
        if key in record:
            digits = 1 if key == "mean_length" else 3
            parts.append(f"{label} {record[key]:.{digits}f}" if isinstance(record[key], float) else f"{label} {record[key]}")
    times = [f"{k.removeprefix('time_')} {record[k]:.1f}s" for k in ("time_sample", "time_score", "time_train", "time_sync")
             if k in record]
    return "  ".join(parts) + ("  (" + ", ".join(times) + ")" if times else "")


def eval_line(record: dict[str, Any]) -> str:
    """Teacher KL per completion and per token (and the mean length), the verifier's `accuracy`, each further measure
    by its name (`accuracy_correct`: correct), and each teacher's figures in a run of several."""
    length = f" (mean length {record['mean_length']:.1f})" if isinstance(record.get("mean_length"), (int, float)) else ""
    accuracy = f", accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
    accuracy += "".join(f", {key.removeprefix('accuracy_')} {value:.3f}" for key, value in record.items()
                        if key.startswith("accuracy_") and isinstance(value, (int, float)))
    by_teacher = "; per teacher: " + "; ".join(
        f"{name} {kl_text(record, name)}" + (f" (accuracy {record[f'accuracy/{name}']:.3f})"
                                            if isinstance(record.get(f"accuracy/{name}"), (int, float)) else "")
        for name in per_teacher_kl(record)) if per_teacher_kl(record) else ""
    return (f"[cyan]eval    teacher KL on held-out prompts {kl_text(record)}{length}{accuracy}"
            f"{by_teacher} (step {record['step']})[/cyan]")


class RunWatcher:
    """Shows a run: each metrics record once, under a progress bar.

    Records are keyed by kind and step, so a run that a restarted trainer
    resumed (and that repeats the steps after its last checkpoint) shows each
    step once. The longest step seen bounds how long a stop may take.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.shown: set[tuple[str, int]] = set()
        self.longest_step = 0.0
        self.longest_eval = 0.0

    def print_new(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            key = (record.get("kind", "train"), record["step"])
            if key in self.shown:
                continue
            self.shown.add(key)
            if key[0] == "eval":
                self.console.print(eval_line(record))
                self.longest_eval = max(self.longest_eval, float(record.get("time_eval", 0.0)))
            else:
                self.console.print(step_line(record))
                self.longest_step = max(self.longest_step, float(record.get("time_step", 0.0)))

    @contextmanager
    def live(self) -> Iterator[Callable[[dict[str, Any], list[dict[str, Any]]], None]]:
        """Yields show(status, records): moves the progress bar and prints the records not shown yet."""
        columns = (TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("run", total=None)

            def show(status: dict[str, Any], records: list[dict[str, Any]]) -> None:
                progress.update(task, total=status["steps"], completed=status["step"])
                self.print_new(records)

            yield show


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete trainer checkpoint (`checkpoints/step-NNNNNN`) of a run's output folder."""
    folder = output_dir / "checkpoints"
    found = sorted(d for d in folder.glob("step-*") if d.is_dir() and STEP_DIR.match(d.name)) if folder.is_dir() else []
    return found[-1] if found else None


def end_summary(output_dir: Path, steps: int, restarts: dict[str, int]) -> list[str]:
    """What happened, read from the run's own files once every service has stopped."""
    records = read_records(output_dir / "metrics.jsonl")
    done = max((r["step"] for r in records if r.get("kind") == "train"), default=0)
    ckpt = last_checkpoint(output_dir)
    where = f"{ckpt} (step {int(ckpt.name.removeprefix('step-'))})" if ckpt else "none yet"
    return [
        f"steps completed: {done} of {steps}",
        "restarts: " + ", ".join(f"{name} {count}" for name, count in restarts.items()),
        f"last checkpoint: {where}",
        *held_out_before_after(records),
    ]


def verdicts(row: dict[str, Any], reply: str, judges: dict[str, Callable[[dict, str], Any]]) -> str:
    """'verifier ✓  correct ✗  content ✓': each judge's verdict on one reply, a judge that fails marked '?'."""
    marks = []
    for name, judge in judges.items():
        try:
            mark = "[green]✓[/green]" if judge(row, reply) else "[red]✗[/red]"
        except (ValueError, KeyError, TypeError):  # a row the judge cannot read (no `answer`): shown, not fatal
            mark = "?"
        marks.append(f"{name} {mark}")
    return "  ".join(marks)


def samples_table(
    rows: list[dict], before: list[str], after: list[str], judges: dict[str, Callable[[dict, str], Any]] | None = None
) -> Table:
    """The held-out rows' questions, reference answers (when the rows have them) and replies before and after;
    under each reply, every judge's verdict (the run's verifier and measures)."""
    table = Table(title="the student on held-out prompts, before and after distillation", show_lines=True)
    table.add_column("prompt", ratio=2)
    answers = any("answer" in row for row in rows)
    if answers:
        table.add_column("answer", ratio=1)
    table.add_column("before", ratio=3)
    table.add_column("after", ratio=3)
    for row, b, a in zip(rows, before, after, strict=True):
        cells = [prompt_text(row)] + ([str(row.get("answer", ""))] if answers else [])
        for reply in (b, a):
            marks = verdicts(row, reply, judges) if judges else ""
            cells.append(escape(reply.strip()) + (f"\n[dim]{marks}[/dim]" if marks else ""))
        table.add_row(*cells)
    return table


def prompt_text(row: dict[str, Any]) -> str:
    """A row's question: its `prompt`, else the last message of its `messages`."""
    return escape(str(row["prompt"] if "prompt" in row else row["messages"][-1]["content"]))
