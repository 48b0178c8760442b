"""Run metrics: one JSON line per record, TensorBoard scalars, a final PNG plot.

Records are `{"kind": "train" | "eval", "step": N, ...numbers}`. Choices:
1) JSONL is the source of truth (GET /runs/{id}/metrics reads it); TensorBoard
   gets the same numbers as `train/<key>` and `eval/<key>`. A few evaluation
   completions go to eval_samples.jsonl as text.
2) On resume from step N, records after N are dropped from the JSONL and
   TensorBoard purges its events after N, so no step is counted twice.
   A NaN or infinite number is written as null: JSON has no such numbers,
   and the trainer's API answers with these records.
3) The plot (matplotlib's Agg backend: no display) shows the teacher reverse
   KL per training step and on the held-out prompts; with several teachers,
   also each teacher's held-out KL (`teacher_kl/<name>`). Its top panel is the
   KL per completion (`teacher_kl_per_completion`: the sum over a reply's
   tokens, what the objective minimises), the one below the mean per token;
   records without the first (older runs) give the per-token panel alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by a kill: everything before it is whole
    return out


class MetricsWriter:
    def __init__(self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "eval_samples.jsonl"
        self.records = self._truncate(self.path, resume_step)
        self._truncate(self.samples_path, resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    @staticmethod
    def _truncate(path: Path, resume_step: int | None) -> list[Record]:
        if resume_step is None:
            path.write_text("")
            return []
        kept = [r for r in read_records(path) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """A few evaluation completions as text, to read what the numbers mean."""
        with self.samples_path.open("a") as fh:
            for sample in samples:
                fh.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")

    def write(self, kind: str, step: int, values: dict[str, float]) -> Record:
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        record: Record = {"kind": kind, "step": step, **finite}
        self.records.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in finite.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()
        return record

    def latest(self, kind: str) -> Record | None:
        return next((r for r in reversed(self.records) if r["kind"] == kind), None)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# The teacher reverse KL of a record; a run of several teachers adds <key>/<name> beside the overall figure.
KL = "teacher_kl"  # mean per sampled token
KL_PER_COMPLETION = "teacher_kl_per_completion"  # mean over completions of the sum over a completion's tokens
PANELS = ((KL_PER_COMPLETION, "reverse KL to the teacher\n(nats / completion)"),
          (KL, "reverse KL to the teacher\n(nats / token)"))


def per_teacher_kl(record: Record, key: str = KL) -> dict[str, float]:
    """A record's teacher KL per teacher (`<key>/<name>`: `teacher_kl/<name>`, or `teacher_kl_per_completion/<name>`
    with key=KL_PER_COMPLETION), by name in name order; empty for a single-teacher run."""
    prefix = f"{key}/"
    return {k.removeprefix(prefix): float(value) for k, value in sorted(record.items())
            if k.startswith(prefix) and isinstance(value, (int, float))}


def kl_series(records: list[Record], key: str = KL) -> dict[str, list[tuple[int, float]]]:
    """The lines of one panel: label -> [(step, KL)] of `key` (KL or KL_PER_COMPLETION); empty lines are left out."""
    def has(r: Record) -> bool:
        return isinstance(r.get(key), (int, float))

    series = {
        "training samples": [(r["step"], r[key]) for r in records if r["kind"] == "train" and has(r)],
        "held-out prompts": [(r["step"], r[key]) for r in records if r["kind"] == "eval" and has(r)],
    }
    evals = [r for r in records if r["kind"] == "eval"]
    for name in sorted({name for r in evals for name in per_teacher_kl(r, key)}):
        series[f"held-out, teacher {name}"] = [(r["step"], per_teacher_kl(r, key)[name]) for r in evals
                                               if name in per_teacher_kl(r, key)]
    return {label: points for label, points in series.items() if points}


def plot_teacher_kl(records: list[Record], out: Path, title: str = "teacher reverse KL") -> Path | None:
    """PNG of the teacher KL per step (train samples, held-out prompts, and each teacher's held-out prompts where
    there are several): per completion on top, per token below; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(kl_series(records, key), label) for key, label in PANELS]
    panels = [(series, label) for series, label in panels if series]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.4 * len(panels) + 0.6), dpi=120, sharex=True, squeeze=False)
    styles = {"training samples": {"color": "tab:blue", "alpha": 0.7}, "held-out prompts": {"fmt": "o-", "color": "tab:red"}}
    for ax, (series, label) in zip(axes[:, 0], panels, strict=True):
        for name, points in series.items():
            style = dict(styles.get(name, {"fmt": "s--"}))
            ax.plot(*zip(*points, strict=True), style.pop("fmt", "-"), label=name, **style)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
