"""The efficiency study: opd, sft and rl on the shipped skill task, one trainer, one budget, several seeds.

    python benchmarks/efficiency.py --seeds 0,1,2      # services/configs/skill.yaml with the study's settings (STUDY), all four arms (make study)
    python benchmarks/efficiency.py --arms opd,rl-form --steps 8 --set run.sampling.max_tokens=12
    python benchmarks/efficiency.py --report --workdir runs/efficiency     # the tables and plot of a finished study again
    python benchmarks/efficiency.py --demo-settings --arms opd,opd-forward,opd-reverse,opd-mix --seeds 0,1,2 --eval-every 2
                                                     # the distillation losses on the demo's settings (issue 41)

Arms: `opd` (per-token reverse KL to the teacher), `sft` (the teacher's
samples), `rl-form` (RL rewarded by the verifier: the form) and `rl-<measure>`
(RL rewarded by one of the task's `eval.measures`: `rl-correct` for the right
answer in the right form). The distillation losses (loss.distill) are arms of
opd too: `opd` is the sampled-token estimate, `opd-forward` and `opd-reverse`
the bucketed KL over the teacher's top `--top-k` (topk_forward, topk_reverse),
`opd-mix` topk_forward weighted `--topk-weight` beside the sampled estimate.

1) Models are prepared as `opd up` prepares them; the teacher service, the
   student service and a teacher sampler (a student service serving the
   teacher's model) start once and serve every arm and seed.
2) The teacher's held-out figures, per seed: the teacher sampler answers the
   held-out prompts given the privileged context, with the evaluation's
   settings (samples per prompt, max tokens, temperature, the seed), judged by
   the verifier (the form) and each of `eval.measures`.
3) Each arm is one trainer run in this process, from the same student
   weights, with the same prompts, seeds, batch shape and optimizer; only
   `objective` (and for rl its reward) differs (services/trainer/objectives.py).
4) Held-out accuracy, the measures and teacher KL every `--eval-every` steps;
   then per seed the table of costs to the target, over seeds the table of
   mean and range, and the plot of the mean curves (services/tasks/study.py),
   written to the workdir and printed.
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
from opd.common.protocol import MAX_TOP_K  # noqa: E402
from opd.common.client import StudentClient  # noqa: E402
from opd.common.errors import InvalidInput  # noqa: E402
from opd.common.process import ServiceProcess, free_port  # noqa: E402
from opd.tasks.study import Point, costs_table, curve, evaluations_table, mean_curve, plot, seeds_table, table  # noqa: E402
from opd.trainer.config import RunConfig, build_config, deep_merge  # noqa: E402
from opd.trainer.context import with_teacher_prompts  # noqa: E402
from opd.trainer.data import load_prompts  # noqa: E402
from opd.trainer.metrics import read_records  # noqa: E402
from opd.trainer.rollouts import load_callable  # noqa: E402
from opd.up.config import EngineService, StackConfig, load_stack  # noqa: E402
from opd.up.runner import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKILL = ROOT / "services" / "configs" / "skill.yaml"
# The study's own settings on the skill stack: what the demo ran until it was cut to minutes (issue 36), so
# `make study` measures what it always measured; `--set` still overrides them.
STUDY = ["run.steps=12", "run.sampling.prompts_per_step=8", "run.optimizer.lr=5e-4", "run.eval.every=4",
         "run.eval.samples_per_prompt=4", "run.save_every=4"]


def start(name: str, args: list[str], spec: EngineService, logs: Path) -> ServiceProcess:
    port = free_port()
    full = [*args, "--engine", spec.engine, "--dtype", spec.dtype, "--kv-cache-gib", str(spec.kv_cache_gib), "--port", str(port)]
    return ServiceProcess(name, full, port, log_file=logs / f"{name}.log").start()


def teacher_figures(run: RunConfig, sampler_url: str) -> dict[str, float]:
    """The teacher's model, given the privileged context, on the held-out prompts with the evaluation's settings:
    {"accuracy": the verifier's mean, measure: its mean for each of eval.measures}."""
    _, eval_rows = load_prompts(run.dataset, run.seed)
    rows = with_teacher_prompts(eval_rows, run.teacher_prompt, "eval")
    judges = {"accuracy": load_callable(run.eval.verifier or "", "eval.verifier")}
    judges |= {name: load_callable(spec, f"eval.measures.{name}") for name, spec in run.eval.measures.items()}
    request = p.RolloutRequest(prompts=[r.teacher or r.prompt for r in rows], n=run.eval.samples_per_prompt,
                               max_tokens=run.eval_max_tokens, temperature=run.sampling.temperature,
                               top_p=run.sampling.top_p, seed=run.seed)
    rollouts = StudentClient(sampler_url, timeout=3600).rollouts(request).rollouts
    return {name: sum(bool(judge(rows[r.prompt_index].row, r.text)) for r in rollouts) / len(rollouts)
            for name, judge in judges.items()}


# The opd arms of the distillation losses: loss.distill, and whether the loss is mixed with the sampled estimate.
DISTILL_ARMS = {"opd-forward": ("topk_forward", False), "opd-reverse": ("topk_reverse", False), "opd-mix": ("topk_forward", True)}


def arm_objective(arm: str, run: dict, top_k: int = 8, topk_weight: float = 0.5) -> dict:
    """The run fields an arm sets: its objective, for rl the reward, for a distillation loss its loss fields.
    ValueError names the arms there are."""
    measures = (run.get("eval") or {}).get("measures") or {}
    if arm in ("opd", "sft"):
        return {"objective": arm}
    if arm in DISTILL_ARMS:
        distill, mixed = DISTILL_ARMS[arm]
        return {"objective": "opd", "loss": {"distill": distill, "top_k": top_k, "topk_weight": topk_weight if mixed else 1.0}}
    if arm == "rl-form":
        return {"objective": "rl", "reward_fn": None}
    if arm.startswith("rl-") and arm[3:] in measures:
        return {"objective": "rl", "reward_fn": measures[arm[3:]]}
    known = ", ".join(["opd", *DISTILL_ARMS, "sft", "rl-form", *(f"rl-{m}" for m in measures)])
    raise ValueError(f"unknown arm {arm!r}: this stack's arms are {known} (rl-<name> for each of run.eval.measures)")


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
    ready(procs, stack.startup_timeout_s, console, f"teacher, student and teacher sampler (logs: {logs})")
    return procs, student_model


def ready(procs: list[ServiceProcess], timeout: float, console: Console, what: str) -> None:
    """Waits until every process serves; if one does not, stops them all."""
    try:
        with console.status(f"starting {what}"):
            for proc in procs:
                proc.wait_ready(timeout)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise


def arm_config(stack: StackConfig, arm: str, seed: int, urls: dict[str, str], student_model: str, workdir: Path,
               args: argparse.Namespace) -> RunConfig:
    """The stack's run with this arm's objective and seed, the study's services and folders; all else as configured."""
    overrides: dict = {"student": {"model": student_model}, "teacher_urls": [urls["teacher"]], "student_url": urls["student"],
                       "teacher_sampler_url": urls["teacher-sampler"], "checkpoint_root": str(workdir / "checkpoints"),
                       "output_dir": str(workdir / f"seed{seed}" / arm), "name": f"efficiency-{arm}-seed{seed}",
                       "seed": seed, "resume": False, **arm_objective(arm, stack.run, args.top_k, args.topk_weight)}
    if args.steps:
        overrides["steps"] = args.steps
    if args.eval_every:
        overrides["eval"] = {"every": args.eval_every}
    return build_config(deep_merge(stack.run, overrides))


def run_arm(run: RunConfig, reuse: bool, console: Console) -> list[Point]:
    from opd.trainer.loop import Trainer

    console.print(f"[bold]{Path(run.output_dir).name}[/bold] (seed {run.seed}): {run.steps} steps, evaluation every "
                  f"{run.eval.every}")
    done = read_records(Path(run.output_dir) / "metrics.jsonl")
    if not (reuse and any(r["kind"] == "eval" and r["step"] == run.steps for r in done)):
        Trainer(run, progress=True).run()
        done = read_records(Path(run.output_dir) / "metrics.jsonl")
    points = curve(done)
    for pt in points:
        measures = "".join(f"  {name} {value:.3f}" for name, value in pt.measures.items())
        completion = "" if pt.teacher_kl_per_completion is None else f", {pt.teacher_kl_per_completion:.3f}/completion"
        console.print(f"  step {pt.step:>3}  accuracy {pt.accuracy:.3f}{measures}  teacher KL {pt.teacher_kl:.3f}/token"
                      f"{completion}  ({pt.seconds:.0f} s, {pt.tokens:,} tokens of training)")
    return points


def report(runs: dict[int, dict[str, list[Point]]], teachers: dict[int, dict[str, float]], workdir: Path,
           plot_to: Path | None, console: Console, command: str | None = None) -> None:
    """Per seed the table of costs to the target; over seeds the table of means and ranges; the plot of the mean curves."""
    measures = [m for m in next(iter(teachers.values())) if m != "accuracy"]
    parts = [f"### seed {seed}\n\n{table(curves, teachers[seed]['accuracy'])}" for seed, curves in runs.items()]
    arms = list(dict.fromkeys(arm for curves in runs.values() for arm in curves))
    means = {arm: mean_curve([curves[arm] for curves in runs.values() if arm in curves]) for arm in arms}
    parts.append(f"### all seeds\n\n{seeds_table(runs, teachers, measures)}")
    parts.append(f"### costs\n\n{costs_table(runs, teachers)}")
    parts.append(f"### every evaluation\n\n{evaluations_table(means)}")
    text = "\n\n".join(parts)
    teacher_mean = {k: sum(t[k] for t in teachers.values()) / len(teachers) for k in next(iter(teachers.values()))}
    figure = plot(means, teacher_mean, workdir / "accuracy.png")
    (workdir / "results.md").write_text(text + "\n")
    (workdir / "results.json").write_text(json.dumps(
        {"teacher": {str(s): t for s, t in teachers.items()},
         "runs": {str(s): {a: [pt.__dict__ for pt in c] for a, c in curves.items()} for s, curves in runs.items()},
         "command": command or " ".join(sys.argv)}, indent=1))
    if plot_to:
        plot_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, plot_to)
    console.print(text)
    console.print(f"plot (the mean over seeds): {figure}   results: {workdir / 'results.md'}")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=SKILL,
                        help="an `opd up` stack file (the skill stack's run gets the study's settings, STUDY)")
    parser.add_argument("--arms", default="opd,sft,rl-form,rl-correct",
                        help="opd, opd-forward, opd-reverse, opd-mix (the distillation losses), sft, rl-form (rewarded by "
                        "the verifier), rl-<measure> (by one of run.eval.measures)")
    parser.add_argument("--top-k", type=int, default=8, help="the teacher's top-k of the opd-forward/-reverse/-mix arms")
    parser.add_argument("--topk-weight", type=float, default=0.5, help="the top-k loss's weight in the opd-mix arm")
    parser.add_argument("--demo-settings", action="store_true",
                        help="the skill stack as `make demo` runs it, without the study's longer settings (STUDY)")
    parser.add_argument("--seeds", type=seed_list, default=None, help="run every arm once per seed (default: the config's run.seed)")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default: the config's run.steps)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: the config's run.eval.every")
    parser.add_argument("--workdir", type=Path, default=Path("runs/efficiency"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a stack field: run.sampling.max_tokens=12")
    parser.add_argument("--plot-to", type=Path, default=None, help="also copy the plot here")
    parser.add_argument("--reuse", action="store_true", help="take an arm's finished run from the workdir instead of rerunning it")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild the tables and plot from the workdir's finished runs (no service started)")
    args = parser.parse_args()

    console = Console()
    workdir = args.workdir.resolve()
    if args.report:
        saved = json.loads((workdir / "results.json").read_text())
        runs = {int(s): {arm: curve(read_records(workdir / f"seed{s}" / arm / "metrics.jsonl")) for arm in arms}
                for s, arms in saved["runs"].items()}
        report(runs, {int(s): t for s, t in saved["teacher"].items()}, workdir, args.plot_to, console, saved["command"])
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the services on SIGTERM too
    try:
        study = args.config.resolve() == SKILL and not args.demo_settings
        stack = load_stack(args.config, [*(STUDY if study else []), *args.sets])
    except InvalidInput as exc:
        parser.error(str(exc))
    if stack.teachers is not None:
        parser.error(f"{args.config}: the study compares its arms against one teacher (a stack's `teacher:`), and this "
                     f"stack has several ({', '.join(stack.teachers)}); run `opd up` on it, or give a one-teacher stack")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not 1 <= args.top_k <= MAX_TOP_K or not 0 <= args.topk_weight <= 1:
        parser.error(f"--top-k {args.top_k} --topk-weight {args.topk_weight}: give a top-k from 1 to {MAX_TOP_K} (the "
                     "protocol's limit) and a weight from 0 to 1")
    try:
        for arm in arms:
            arm_objective(arm, stack.run)
    except ValueError as exc:
        parser.error(f"--arms: {exc}")
    seeds = args.seeds or [int(stack.run.get("seed", 0))]
    procs, student_model = start_stack(stack, workdir, console)
    runs: dict[int, dict[str, list[Point]]] = {}
    teachers: dict[int, dict[str, float]] = {}
    try:
        urls = {proc.name: proc.url for proc in procs}
        for seed in seeds:
            configs = {arm: arm_config(stack, arm, seed, urls, student_model, workdir, args) for arm in arms}
            with console.status(f"seed {seed}: the teacher's held-out figures"):
                teachers[seed] = teacher_figures(next(iter(configs.values())), urls["teacher-sampler"])
            console.print(f"[bold]seed {seed}[/bold]: teacher (with the context) held-out "
                          + ", ".join(f"{k} {v:.3f}" for k, v in teachers[seed].items()))
            runs[seed] = {arm: run_arm(run, args.reuse, console) for arm, run in configs.items()}
    finally:
        for proc in reversed(procs):
            proc.stop()
    report(runs, teachers, workdir, args.plot_to, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
