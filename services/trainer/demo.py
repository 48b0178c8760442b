"""`opd trainer demo`: the documented SmolLM2 run, start to finish, in one command.

Prepares SmolLM2-135M-Instruct (the teacher, 30 layers) and its first 12
layers (the student), starts the teacher and student services (vLLM by
default) on the ports of the config's URLs, with the student's checkpoint
root and dtype set to the config's, runs the training in the foreground with a
progress bar, stops both services, prints the held-out teacher KL (per
completion and per token) at the first evaluation and the last, and copies
the plot where asked.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from opd.common.process import ServiceProcess
from opd.trainer.config import RunConfig
from opd.trainer.metrics import read_records
from opd.trainer.summary import held_out_before_after


def port_of(url: str) -> int:
    parsed = urlparse(url)
    if parsed.port is None:
        raise ValueError(f"{url} names no port: give the service URLs with their ports")
    return parsed.port


def start(name: str, args: list[str], url: str, log_dir: Path, console: Console) -> ServiceProcess:
    port = port_of(url)
    proc = ServiceProcess(name, [*args, "--host", urlparse(url).hostname or "127.0.0.1", "--port", str(port)], port,
                          log_file=log_dir / f"{name}.log")
    console.print(f"starting the {name} on port {port}; log: {proc.log_file}")
    return proc.start()


def run_demo(config: RunConfig, models: Path, engine: str, plot_to: Path | None) -> str:
    from opd.common.models import prepare
    from opd.trainer.loop import Trainer

    console = Console()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with console.status("preparing SmolLM2-135M-Instruct and its 12-layer student (once)"):
        teacher_model = prepare("smollm2-135m-instruct", models / "smollm2")
        prepare("smollm2-135m-instruct", Path(config.student.model), layers=12)
    Path(config.checkpoint_root).mkdir(parents=True, exist_ok=True)
    teacher = start("teacher", ["teacher", "serve", "--model", str(teacher_model), "--engine", engine],
                    config.teacher_urls[0], out, console)
    # The student serves in the trainer's dtype, so its sampling logprobs are the ones the trainer computes.
    student = start("student", ["student", "serve", "--model", config.student.model, "--engine", engine,
                                "--dtype", config.student.dtype, "--checkpoint-root", config.checkpoint_root],
                    config.student_replicas[0], out, console)
    try:
        with console.status("waiting for the teacher and the student to load"):
            teacher.wait_ready(timeout=900, api_key=config.api_key)
            student.wait_ready(timeout=900, api_key=config.api_key)
        outcome = Trainer(config, progress=True).run()
    finally:
        teacher.stop()
        student.stop()
    for line in held_out_before_after(read_records(out / "metrics.jsonl")):
        console.print(line, soft_wrap=True)
    if plot_to is not None:
        plot_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "teacher_kl.png", plot_to)
        console.print(f"plot copied to {plot_to}")
    return outcome
