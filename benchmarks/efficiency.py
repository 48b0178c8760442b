"""The efficiency study: opd, rl and sft on the shipped skill task, one trainer, one budget.

    python benchmarks/efficiency.py --steps 20 --eval-every 2         # services/configs/skill.yaml, all three arms (make study)
    python benchmarks/efficiency.py --arms opd,rl --steps 16 --eval-every 4 --set run.sampling.max_tokens=12
    python benchmarks/efficiency.py --report --workdir runs/efficiency     # the table and plot of a finished study again

1) Models are prepared as `opd up` prepares them; the teacher service, the
   student service and a teacher sampler (a student service serving the
   teacher's model) start once and serve every arm.
2) The teacher's held-out accuracy: the teacher sampler answers the held-out
   prompts given the privileged context, with the evaluation's settings
   (samples per prompt, max tokens, temperature, seed).
3) Each arm is one trainer run in this process, from the same student
   weights, with the same prompts, seeds, batch shape and optimizer; only
   `objective` differs (services/trainer/objectives.py).
4) Held-out accuracy and teacher KL every `--eval-every` steps; then the table
   and the plot of accuracy against step and against training seconds
   (services/tasks/study.py), written to the workdir and printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from opd.common import protocol as p  # noqa: E402
from opd.common.client import StudentClient  # noqa: E402
from opd.common.process import ServiceProcess, free_port  # noqa: E402
from opd.tasks.study import Point, curve, plot, table  # noqa: E402
from opd.trainer.config import RunConfig, build_config, deep_merge  # noqa: E402
from opd.trainer.context import with_teacher_prompts  # noqa: E402
from opd.trainer.data import load_prompts  # noqa: E402
from opd.trainer.metrics import read_records  # noqa: E402
from opd.trainer.rollouts import load_callable  # noqa: E402
from opd.up.config import EngineService, StackConfig, load_stack  # noqa: E402
from opd.up.runner import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start(name: str, args: list[str], spec: EngineService, logs: Path) -> ServiceProcess:
    port = free_port()
    full = [*args, "--engine", spec.engine, "--dtype", spec.dtype, "--kv-cache-gib", str(spec.kv_cache_gib), "--port", str(port)]
    return ServiceProcess(name, full, port, log_file=logs / f"{name}.log").start()


def teacher_accuracy(run: RunConfig, sampler_url: str) -> float:
    """The teacher's model, given the privileged context, on the held-out prompts with the evaluation's settings."""
    _, eval_rows = load_prompts(run.dataset, run.seed)
    rows = with_teacher_prompts(eval_rows, run.teacher_prompt, "eval")
    verifier = load_callable(run.eval.verifier or "", "eval.verifier")
    request = p.RolloutRequest(prompts=[r.teacher or r.prompt for r in rows], n=run.eval.samples_per_prompt,
                               max_tokens=run.eval_max_tokens, temperature=run.sampling.temperature,
                               top_p=run.sampling.top_p, seed=run.seed)
    rollouts = StudentClient(sampler_url, timeout=3600).rollouts(request).rollouts
    return sum(bool(verifier(rows[r.prompt_index].row, r.text)) for r in rollouts) / len(rollouts)


def start_stack(stack: StackConfig, workdir: Path, console: Console) -> tuple[list[ServiceProcess], str]:
    """Teacher, student and teacher sampler as processes (ready when this returns); and the student's model."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    teacher_model = resolve_model(stack.teacher, workdir / "models", console)
    student_model = resolve_model(stack.student, workdir / "models", console)
    finetune = (stack.run.get("student") or {}).get("finetune", "lora")
    no_lora = ["--no-lora"] if stack.student.engine == "vllm" and finetune == "full" else []
    sampler_no_lora = ["--no-lora"] if stack.teacher.engine == "vllm" else []
    procs = [
        start("teacher", ["teacher", "serve", "--model", teacher_model], stack.teacher, logs),
        start("student", ["student", "serve", "--model", student_model, "--checkpoint-root", str(workdir / "checkpoints"),
                          *no_lora], stack.student, logs),
        start("teacher-sampler", ["student", "serve", "--model", teacher_model, "--checkpoint-root",
                                  str(workdir / "sampler-checkpoints"), *sampler_no_lora], stack.teacher, logs),
    ]
    try:
        with console.status(f"starting teacher, student and teacher sampler (logs: {logs})"):
            for proc in procs:
                proc.wait_ready(stack.startup_timeout_s)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs, student_model


def arm_config(stack: StackConfig, arm: str, urls: dict[str, str], student_model: str, workdir: Path,
               args: argparse.Namespace) -> RunConfig:
    """The stack's run with this arm's objective, the study's services and folders; all else as configured."""
    overrides: dict = {"student": {"model": student_model}, "teacher_urls": [urls["teacher"]], "student_url": urls["student"],
                       "teacher_sampler_url": urls["teacher-sampler"], "checkpoint_root": str(workdir / "checkpoints"),
                       "output_dir": str(workdir / arm), "name": f"efficiency-{arm}", "objective": arm, "resume": False}
    if args.steps:
        overrides["steps"] = args.steps
    if args.eval_every:
        overrides["eval"] = {"every": args.eval_every}
    return build_config(deep_merge(stack.run, overrides))


def run_arm(run: RunConfig, reuse: bool, console: Console) -> list[Point]:
    from opd.trainer.loop import Trainer

    console.print(f"[bold]{run.objective}[/bold]: {run.steps} steps, evaluation every {run.eval.every}")
    done = read_records(Path(run.output_dir) / "metrics.jsonl")
    if not (reuse and any(r["kind"] == "eval" and r["step"] == run.steps for r in done)):
        Trainer(run, progress=True).run()
        done = read_records(Path(run.output_dir) / "metrics.jsonl")
    points = curve(done)
    for pt in points:
        console.print(f"  step {pt.step:>3}  accuracy {pt.accuracy:.3f}  teacher KL {pt.teacher_kl:.3f}  "
                      f"({pt.seconds:.0f} s, {pt.tokens:,} tokens of training)")
    return points


def report(results: dict[str, list[Point]], teacher: float, workdir: Path, plot_to: Path | None, console: Console,
           command: str | None = None) -> None:
    text = table(results, teacher)
    figure = plot(results, teacher, workdir / "accuracy.png")
    (workdir / "results.md").write_text(text + "\n")
    (workdir / "results.json").write_text(json.dumps(
        {"teacher_accuracy": teacher, "arms": {a: [pt.__dict__ for pt in c] for a, c in results.items()},
         "command": command or " ".join(sys.argv)}, indent=1))
    if plot_to:
        plot_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, plot_to)
    console.print(text)
    console.print(f"plot: {figure}   results: {workdir / 'results.md'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "services" / "configs" / "skill.yaml", help="an `opd up` stack file")
    parser.add_argument("--arms", default="opd,rl,sft")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default: the config's run.steps)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: the config's run.eval.every")
    parser.add_argument("--workdir", type=Path, default=Path("runs/efficiency"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a stack field: run.sampling.max_tokens=12")
    parser.add_argument("--plot-to", type=Path, default=None, help="also copy the plot here")
    parser.add_argument("--reuse", action="store_true", help="take an arm's finished run from the workdir instead of rerunning it")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild the table and plot from the workdir's finished runs (no service started)")
    args = parser.parse_args()

    console = Console()
    workdir = args.workdir.resolve()
    if args.report:
        saved = json.loads((workdir / "results.json").read_text())
        results = {arm: curve(read_records(workdir / arm / "metrics.jsonl")) for arm in saved["arms"]}
        report(results, saved["teacher_accuracy"], workdir, args.plot_to, console, saved["command"])
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the services on SIGTERM too
    stack = load_stack(args.config, args.sets)
    if stack.teachers is not None:
        parser.error(f"{args.config}: the study compares its arms against one teacher (a stack's `teacher:`), and this "
                     f"stack has several ({', '.join(stack.teachers)}); run `opd up` on it, or give a one-teacher stack")
    procs, student_model = start_stack(stack, workdir, console)
    try:
        urls = {proc.name: proc.url for proc in procs}
        runs = {arm: arm_config(stack, arm, urls, student_model, workdir, args) for arm in args.arms.split(",")}
        with console.status("the teacher's held-out accuracy"):
            teacher = teacher_accuracy(next(iter(runs.values())), urls["teacher-sampler"])
        console.print(f"teacher (with the context) held-out accuracy {teacher:.3f}")
        results = {arm: run_arm(run, args.reuse, console) for arm, run in runs.items()}
    finally:
        for proc in reversed(procs):
            proc.stop()
    report(results, teacher, workdir, args.plot_to, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
