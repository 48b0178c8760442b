"""`opd trainer serve` (the trainer service) and `opd train CONFIG.yaml` (a run in the foreground).

`opd train` resumes from the checkpoint in the config's output_dir when there
is one (unless `--set resume=false`), shows a progress bar with ETA, and ends
with the path of the teacher-KL plot and the held-out teacher KL (per
completion and per token) at the first evaluation and the last. The first
Ctrl-C ends the run after the current step, with a checkpoint; a second one
ends it at once. Exit status: 0 completed, 1 failed, 2 invalid config, 130
stopped.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from opd.common import cli_options as o


def quiet_logging(level: str) -> None:
    """Our log lines at `level`; one line per HTTP request only when debugging."""
    import logging

    from opd.common.server import configure_logging

    configure_logging(level)
    if level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)

app = typer.Typer(help="The trainer: on-policy distillation runs.", no_args_is_help=True)
NPROC_HELP = ("Trainer processes on this machine: above 1 the student is sharded with FSDP2 under torchrun "
              "(env OPD_TRAINER_NPROC); several nodes: start `torchrun ... -m opd trainer serve` yourself.")


@app.command()
def serve(
    host: o.Host = None,
    port: o.Port = None,
    max_runs: Annotated[int | None, typer.Option(help="Runs at once (409 above).")] = None,
    runs_dir: Annotated[str | None, typer.Option(help="Where runs without an output_dir write.")] = None,
    nproc: Annotated[int | None, typer.Option(help=NPROC_HELP)] = None,
) -> None:
    """Serve POST /runs, GET /runs/{id}, GET /runs/{id}/metrics, POST /runs/{id}/stop (and /health, /ready, /metrics)."""
    from pydantic import ValidationError

    from opd.common.server import serve as run
    from opd.common.settings import TrainerSettings
    from opd.trainer import distributed, ranks
    from opd.trainer.app import build_app

    given = {"host": host, "port": port, "max_runs": max_runs, "runs_dir": runs_dir, "nproc": nproc}
    try:
        settings = TrainerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    quiet_logging(settings.log_level)
    distributed.relaunch(settings.nproc)
    group = distributed.init()
    if group is not None and group.world > 1 and settings.max_runs > 1:
        raise typer.BadParameter(f"max_runs {settings.max_runs}: a trainer on {group.world} processes trains one run at a time")
    if group is not None and not group.leader:  # a worker: rank 0 serves HTTP and sends the work
        ranks.follow(group)
        return
    if settings.log_level.lower() != "debug":  # the runs' calls to teacher and student: one line each otherwise
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        run(build_app(settings), settings.host, settings.port, settings.log_level)
    finally:
        distributed.shutdown()


def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.field=value (repeatable).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    nproc: Annotated[int, typer.Option(min=1, help=NPROC_HELP)] = 1,
) -> None:
    """Run on-policy distillation in the foreground (resumes from output_dir's checkpoint)."""
    from opd.common.errors import OPDError
    from opd.trainer import distributed, ranks
    from opd.trainer.config import load_config
    from opd.trainer.loop import Trainer
    from opd.trainer.metrics import read_records
    from opd.trainer.summary import held_out_before_after

    quiet_logging(log_level)
    try:
        run_config = load_config(config, set_ or [])
    except OPDError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    distributed.relaunch(nproc)
    group = distributed.init()
    if group is not None and not group.leader:
        ranks.follow(group)
        return
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        if stop.is_set():  # the second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        typer.echo("stopping after this step (Ctrl-C again to stop at once)", err=True)
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    # Under torchrun the launcher passes Ctrl-C (SIGINT) or SIGTERM on to the ranks: rank 0 stops the run cleanly.
    previous_term = signal.signal(signal.SIGTERM, interrupt) if group is not None else None
    try:
        outcome = Trainer(run_config, stop=stop, progress=progress and (group is None or group.leader)).run()
    except OPDError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        distributed.shutdown()
    out = Path(run_config.output_dir)
    typer.echo(f"{outcome}: metrics {out / 'metrics.jsonl'}, plot {out / 'teacher_kl.png'}")
    for line in held_out_before_after(read_records(out / "metrics.jsonl")):
        typer.echo(line)
    if outcome != "completed":
        raise typer.Exit(130)


@app.command()
def demo(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")] = Path("services/configs/smollm2.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.field=value (repeatable).")] = None,
    models: Annotated[Path, typer.Option(help="Where the teacher model is prepared (the student goes to student.model).")] = Path("models"),
    engine: Annotated[str, typer.Option(help="Engine of the teacher and student services: vllm or hf.")] = "vllm",
    plot_to: Annotated[Path | None, typer.Option(help="Also copy the teacher-KL plot here.")] = None,
) -> None:
    """The documented SmolLM2 run: prepare the models, start teacher and student, train, stop them."""
    from opd.common.errors import OPDError
    from opd.trainer.config import load_config
    from opd.trainer.demo import run_demo

    quiet_logging("info")
    try:
        outcome = run_demo(load_config(config, set_ or []), models, engine, plot_to)
    except OPDError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(outcome)
