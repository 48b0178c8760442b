"""What `opd up` shows a person: a run's progress step by step, and samples side by side."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from services.common.client import SyncClient

DONE = {"completed", "failed", "stopped"}


def step_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>3}"]
    if "teacher_kl" in record:  # the rl and sft arms ask no teacher while training
        parts.append(f"teacher KL {record['teacher_kl']:.4f}")
    for key, label in (("train_accuracy", "accuracy"), ("entropy", "entropy"), ("tokens", "tokens")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}" if isinstance(record[key], float) else f"{label} {record[key]}")
    times = [f"{k.removeprefix('time_')} {record[k]:.1f}s" for k in ("time_sample", "time_score", "time_train", "time_sync")
             if k in record]
    return "  ".join(parts) + ("  (" + ", ".join(times) + ")" if times else "")


def eval_line(record: dict[str, Any]) -> str:
    accuracy = f", accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
    return (f"[cyan]eval    teacher KL on held-out prompts {record.get('teacher_kl', float('nan')):.4f}{accuracy}"
            f" (step {record['step']})[/cyan]")


class RunWatcher:
    """Polls the trainer for one run, prints each new metrics record, shows a progress bar."""

    def __init__(self, trainer: SyncClient, run_id: str, console: Console, interval: float = 2.0) -> None:
        self.trainer, self.run_id, self.console, self.interval = trainer, run_id, console, interval
        self.seen = 0

    def _print_new(self) -> None:
        records = self.trainer.request("GET", f"/runs/{self.run_id}/metrics")["records"]
        for record in records[self.seen :]:
            if record.get("kind") == "eval":
                self.console.print(eval_line(record))
            else:
                self.console.print(step_line(record))
        self.seen = len(records)

    def follow(self) -> dict[str, Any]:
        columns = (TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = None
            while True:
                status = self.trainer.request("GET", f"/runs/{self.run_id}")
                if task is None:
                    task = progress.add_task("run", total=status["steps"])
                progress.update(task, completed=status["step"])
                self._print_new()
                if status["state"] in DONE:
                    return status
                time.sleep(self.interval)


def samples_table(prompts: list[dict], before: list[str], after: list[str]) -> Table:
    table = Table(title="the student on held-out prompts, before and after distillation", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("before", ratio=2)
    table.add_column("after", ratio=2)
    for prompt, b, a in zip(prompts, before, after, strict=True):
        table.add_row(prompt["messages"][-1]["content"], b.strip(), a.strip())
    return table
