"""The demo's settings chosen by measurement: each variant of the skill stack is one run on services started once.

    python benchmarks/demo_sweep.py                       # the variants below, seed 0
    python benchmarks/demo_sweep.py --variants fast,lr2e-3 --seeds 0,1

Each variant is a set of `--set`-style overrides of services/configs/skill.yaml (the demo's stack). The teacher
and student services start once (as `opd up` starts them) and serve every run; each run is the trainer in this
process, from the student's base weights. Printed per run: wall seconds of the run itself (start to last
evaluation, service start excluded: measured apart, the `services started in` line), seconds per step and per
evaluation, and the held-out figures of the first and last evaluations: KL per completion, KL per token, the form
(accuracy), correct and content. The demo's own start-up (model preparation from the cache, two vLLM services,
the trainer) comes on top: `make demo` gives the whole.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from opd.common.process import ServiceProcess  # noqa: E402
from opd.trainer.config import build_config, deep_merge  # noqa: E402
from opd.trainer.metrics import read_records  # noqa: E402
from opd.up.config import StackConfig, load_stack  # noqa: E402
from opd.up.runner import resolve_model  # noqa: E402

from efficiency import ready, start  # noqa: E402  (benchmarks/, this script's folder)

ROOT = Path(__file__).resolve().parents[1]


def variant(steps: int, prompts: int, lr: str, eval_samples: int = 2) -> list[str]:
    """A demo of `steps` steps of `prompts` prompts x the stack's samples each at `lr`, evaluated before and after."""
    return [f"run.steps={steps}", f"run.sampling.prompts_per_step={prompts}", f"run.optimizer.lr={lr}",
            f"run.eval.every={steps}", f"run.eval.samples_per_prompt={eval_samples}", f"run.save_every={steps}"]


VARIANTS: dict[str, list[str]] = {
    "shipped": [],  # the stack file as it is
    "s8-p4-lr2e-3": variant(8, 4, "2e-3"),
    "s8-p4-lr3e-3": variant(8, 4, "3e-3"),
    "s6-p8-lr2e-3": variant(6, 8, "2e-3"),
    "s10-p4-lr2e-3": variant(10, 4, "2e-3"),
    "s8-p8-lr1e-3": variant(8, 8, "1e-3"),
    "s8-p4-lr1.5e-3-e1": variant(8, 4, "1.5e-3", eval_samples=1),
    "s8-p4-lr2e-3-e1": variant(8, 4, "2e-3", eval_samples=1),
    "s8-p4-lr2e-3-cos-e1": variant(8, 4, "2e-3", eval_samples=1) + ["run.optimizer.decay=cosine"],
    "s8-p4-lr3e-3-cos-e1": variant(8, 4, "3e-3", eval_samples=1) + ["run.optimizer.decay=cosine"],
    "s8-p8x2-lr2e-3-e1": variant(8, 8, "2e-3", eval_samples=1) + ["run.sampling.samples_per_prompt=2"],
    # the teacher's top-8 in the loss (issue 41): forward KL over its buckets, alone and half and half with sampled
    "s8-p4-lr2e-3-e1-fwd8": variant(8, 4, "2e-3", eval_samples=1) + ["run.loss.distill=topk_forward", "run.loss.top_k=8"],
    "s8-p4-lr2e-3-e1-mix8": variant(8, 4, "2e-3", eval_samples=1) + [
        "run.loss.distill=topk_forward", "run.loss.top_k=8", "run.loss.topk_weight=0.5"],
    "s8-p4-lr2e-3-e1-rev8": variant(8, 4, "2e-3", eval_samples=1) + ["run.loss.distill=topk_reverse", "run.loss.top_k=8"],
}


def start_services(stack: StackConfig, workdir: Path, console: Console) -> tuple[list[ServiceProcess], str]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    teacher_model = resolve_model(stack.teacher, workdir / "models", console)
    student_model = resolve_model(stack.student, workdir / "models", console)
    procs = [start("teacher", ["teacher", "serve", "--model", teacher_model], stack.teacher, logs),
             start("student", ["student", "serve", "--model", student_model, "--checkpoint-root",
                               str(workdir / "checkpoints")], stack.student, logs)]
    ready(procs, stack.startup_timeout_s, console, f"teacher and student (logs: {logs})")
    return procs, student_model


def figures(record: dict) -> str:
    return (f"KL/completion {record.get('teacher_kl_per_completion', float('nan')):6.2f}  "
            f"KL/token {record.get('teacher_kl', float('nan')):.3f}  len {record.get('mean_length', float('nan')):4.1f}  "
            f"form {record.get('accuracy', float('nan')):.3f}  correct {record.get('accuracy_correct', float('nan')):.3f}  "
            f"content {record.get('accuracy_content', float('nan')):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "services" / "configs" / "skill.yaml")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "shipped"), help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each variant once per seed")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo-sweep"))
    args = parser.parse_args()
    from opd.trainer.loop import Trainer

    console = Console()
    workdir = args.workdir.resolve()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    began = time.perf_counter()
    stack = load_stack(args.config, [])
    procs, student_model = start_services(stack, workdir, console)
    console.print(f"services started in {time.perf_counter() - began:.0f} s")
    rows = []
    try:
        urls = {"teacher_urls": [procs[0].url], "student_url": procs[1].url}
        for name in names:
            varied = load_stack(args.config, VARIANTS[name])
            for seed in seeds:
                out = workdir / name / f"seed{seed}"
                run = build_config(deep_merge(varied.run, {
                    "student": {"model": student_model}, **urls, "checkpoint_root": str(workdir / "checkpoints"),
                    "output_dir": str(out), "name": f"sweep-{name}-{seed}", "seed": seed, "resume": False}))
                t0 = time.perf_counter()
                Trainer(run, progress=False).run()
                wall = time.perf_counter() - t0
                records = read_records(out / "metrics.jsonl")
                train = [r for r in records if r["kind"] == "train"]
                evals = [r for r in records if r["kind"] == "eval"]
                per_step = sum(r["time_step"] for r in train) / max(1, len(train))
                per_eval = (wall - sum(r["time_step"] for r in train)) / max(1, len(evals))
                line = (f"{name} seed {seed}: {wall:.0f} s ({len(train)} steps of {per_step:.1f} s, {len(evals)} "
                        f"evaluations of about {per_eval:.1f} s)\n  first  {figures(evals[0])}\n  last   {figures(evals[-1])}")
                console.print(line)
                rows.append(line)
    finally:
        for proc in reversed(procs):
            proc.stop()
    (workdir / "sweep.txt").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
