"""`opd up`: the whole stack on one machine, one distillation run, then a clean stop.

1. Models are prepared (`opd models prepare`) or taken from their paths.
2. Every port is checked first: a taken port stops start-up with its name.
3. Teacher and student (or student replicas, `student-1`, `student-2`, ...,
   and several teachers, `teacher-<name>`: one process each) start together, then the trainer; each as a process
   group of its own, its output kept in `<workdir>/logs/<service>.log` and its
   warnings and errors echoed to the terminal with a `[service]` prefix. From
   then on a supervisor (supervisor.py) restarts a service that crashes.
4. The student answers a few held-out prompts (the "before" samples), the run
   is submitted to the trainer (POST /runs), and its metrics are printed step
   by step under a progress bar (follow.py: also through trainer restarts).
5. The same prompts again ("after"), side by side with "before"; where the
   plot, the metrics and the checkpoints are.
6. Whatever happens (success, failure, Ctrl-C, SIGTERM), every process group
   is stopped and every port is free again; the last lines say how many steps
   were done, how often each service restarted, and the last checkpoint.
   Ctrl-C (interrupts.py): the first lets the trainer stop and checkpoint, the
   second stops everything at once.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from opd.common.client import StudentClient
from opd.common.errors import InvalidInput, OPDError, ServiceError
from opd.common.process import ServiceProcess, StartupFailed, port_free, signals_deferred
from opd.trainer.config import deep_merge
from opd.trainer.rollouts import load_callable
from opd.up.config import EngineService, StackConfig, students_entry, teachers_entry, without_students
from opd.up.devices import check as check_devices
from opd.up.devices import host_gpu_count, visible_devices
from opd.up.follow import Outcome, RunFollower
from opd.up.interrupts import Interrupts
from opd.up.report import end_summary, samples_table
from opd.up.supervisor import Supervisor, stop_all

# The shipped stack files name their data from the repository (services/data/...): the folder services/
# is the package opd, found at PACKAGE_DIR from an editable install and a normal one alike.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_FOLDER = "services"
DEFAULT_PROMPTS = PACKAGE_DIR / "data" / "prompts.jsonl"
ECHO_MARKERS = ("ERROR", "Error", "Traceback", "CRITICAL", "WARNING opd", "Exception")


class PrefixedEcho:
    """A text sink for a child's output: echoes only the lines worth a person's attention."""

    def __init__(self, console: Console, verbose: bool) -> None:
        self.console, self.verbose = console, verbose

    def write(self, line: str) -> None:
        if self.verbose or any(m in line for m in ECHO_MARKERS):
            self.console.out(line.rstrip("\n"), highlight=False)


def resolve_model(spec: EngineService, models_dir: Path, console: Console) -> str:
    source = spec.model
    if source.path is not None:
        path = Path(source.path).expanduser()
        looks_local = path.is_absolute() or source.path.startswith((".", "~")) or source.path.count("/") > 1
        if looks_local and not (path / "config.json").is_file():
            raise StartupFailed(f"model folder {source.path} does not exist or has no config.json: "
                                "prepare it with `opd models prepare`, or fix the path")
        return str(path) if looks_local else source.path
    from opd.common.models import prepare

    name = source.prepare + (f"-l{source.layers}" if source.layers else "")
    name += f"-drop{source.drop_layers.replace(',', '_')}" if source.drop_layers else ""
    name += f"-perm{source.permute_vocab}" if source.permute_vocab is not None else ""
    name += f"-merges{source.drop_merges}" if source.drop_merges is not None else ""
    with status(console, f"preparing {name} (once)"):
        return str(prepare(source.prepare, models_dir / name, layers=source.layers, drop_layers=source.drop_layers,
                           permute_vocab=source.permute_vocab, drop_merges=source.drop_merges))


@contextmanager
def status(console: Console, text: str) -> Iterator[None]:
    """`console.status`, whose spinner starts and stops whole. A Ctrl-C raises wherever the main thread is
    (interrupts.py); landing inside rich's start (its refresh thread, the console's live display), it left
    a spinner half started that nothing stopped. Here it is handled once the spinner runs, and stops it."""
    spinner = console.status(text)
    try:
        with signals_deferred():
            spinner.__enter__()
        yield
    finally:
        with signals_deferred():
            spinner.__exit__(None, None, None)


class Stack:
    def __init__(self, config: StackConfig, console: Console, verbose: bool = False) -> None:
        self.config, self.console = config, console
        self.workdir = Path(config.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.checkpoints = self.workdir / "checkpoints"
        self.api_key = secrets.token_urlsafe(16)  # the local stack is not left open on its ports
        self.echo = PrefixedEcho(console, verbose)
        self.procs: list[ServiceProcess] = []
        self.supervisor: Supervisor | None = None
        self.run_output: Path | None = None
        self.steps = 0
        self.placements = {p.name: p for p in config.placements()}

    def check_devices(self) -> None:
        """The stack's devices against the GPUs this host has (the stack file's own checks ran as it loaded)."""
        if any(p.devices for p in self.placements.values()):
            check_devices(list(self.placements.values()), host_gpu_count())

    def _process(self, name: str, args: list[str], port: int) -> ServiceProcess:
        place = self.placements[name]
        proc = ServiceProcess(  # ServiceProcess prefixes each line with [name]
            name, [*args, *place.args, "--host", self.config.host, "--port", str(port)], port, host=self.config.host,
            log_file=self.logs / f"{name}.log", env={"OPD_API_KEY": self.api_key, **place.env(visible_devices())},
            echo=self.echo,
        )
        self.procs.append(proc)
        return proc

    def check_ports(self) -> None:
        c = self.config
        students = [(name, port) for name, port in zip(c.student.names, c.student.ports, strict=True)]
        teachers = [(name, spec.port) for name, spec in c.teacher_specs.items()]
        for name, port in (*teachers, *students, ("trainer", c.trainer.port)):
            if not port_free(c.host, port):
                field = f"teachers.{name.removeprefix('teacher-')}" if c.teachers is not None and name in dict(teachers) \
                    else name.split("-")[0]
                raise StartupFailed(
                    f"port {port} ({name}) on {c.host} is taken: stop what uses it, or pick another with "
                    f"--set {field}.port=N"
                )

    def start(self, teacher_models: dict[str, str], student_model: str) -> None:
        """`teacher_models`: each teacher process's model by its name (config.teacher_specs)."""
        c = self.config
        self.logs.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        student_extra = ["--checkpoint-root", str(self.checkpoints), "--lora-mode", c.student.lora_mode, *self._lora_flag()]
        services = [(spec, name, spec.port, teacher_models[name], []) for name, spec in c.teacher_specs.items()]
        services += [(c.student, name, port, student_model, student_extra)  # replicas share the checkpoint root
                     for name, port in zip(c.student.names, c.student.ports, strict=True)]
        for spec, name, port, model, extra in services:
            args = [name.split("-")[0], "serve", "--model", model, "--engine", spec.engine, "--dtype", spec.dtype,
                    "--kv-cache-gib", str(spec.kv_cache_gib), *extra]
            self._process(name, args, port).start()
        teachers = "the teacher" if c.teachers is None else f"{len(c.teachers)} teachers"
        with status(self.console, f"loading {teachers} and the student (logs: {self.logs})"):
            for proc in self.procs:
                proc.wait_ready(c.startup_timeout_s, api_key=self.api_key)
        trainer = self._process("trainer", ["trainer", "serve", "--nproc", str(c.trainer.processes)], c.trainer.port).start()
        with status(self.console, "starting the trainer"):
            trainer.wait_ready(c.startup_timeout_s, api_key=self.api_key)
        for proc in self.procs:
            self.console.print(f"[green]ready[/green] {proc.name} at {proc.url}")

    def _lora_flag(self) -> list[str]:
        """A full fine-tuning run never serves an adapter, and a vLLM engine without LoRA samples faster."""
        finetune = (self.config.run.get("student") or {}).get("finetune", "lora")
        return ["--no-lora"] if finetune == "full" and self.config.student.engine == "vllm" else []

    def url(self, name: str) -> str:
        return next(p.url for p in self.procs if p.name == name)

    def student_urls(self) -> list[str]:
        return [self.url(name) for name in self.config.student.names]

    def supervise(self) -> Supervisor:
        self.supervisor = Supervisor(self.procs, self.config.restart, report=self.console.print, api_key=self.api_key,
                                     startup_timeout_s=self.config.startup_timeout_s).start()
        return self.supervisor

    def stop(self, quick: bool, hurry: Callable[[], bool]) -> None:
        """Every service, every process group; `quick`: SIGKILL after 1 s, not after stop_grace_s."""
        if self.supervisor is not None:
            self.supervisor.close()
        stop_all(self.procs, 1.0 if quick else self.config.stop_grace_s, hurry)
        busy = [p.port for p in self.procs if not port_free(p.host, p.port)]
        if busy:
            self.console.print(f"[yellow]ports still held after stop: {busy}[/yellow]")
        if self.run_output is not None:
            restarts = self.supervisor.restarts() if self.supervisor else {p.name: 0 for p in self.procs}
            for line in end_summary(self.run_output, self.steps, restarts):
                self.console.print(line, soft_wrap=True)

    def run_config(self, student_model: str) -> dict[str, Any]:
        filled = {
            "student": {"model": student_model},
            **students_entry(self.student_urls()),
            "api_key": self.api_key,
            "checkpoint_root": str(self.checkpoints),
            "output_dir": str(self.workdir / "run"),
        }
        if self.config.teachers is None:
            filled["teacher_urls"] = [self.url("teacher")]
        else:  # each teacher's URL, beside what run.teachers.<name> says of it (a teacher_prompt, say)
            filled |= teachers_entry({name: self.url(f"teacher-{name}") for name in self.config.teachers})
        run = deep_merge(without_students(self.config.run), filled)
        dataset = run.setdefault("dataset", {})
        dataset.setdefault("path", str(DEFAULT_PROMPTS))
        for key in ("path", "eval_path"):
            if dataset.get(key):
                dataset[key] = data_path(dataset[key])
        return run


def data_path(path: str) -> str:
    """A relative dataset path as given when it exists from the working directory, else from opd's source tree.

    The shipped stack files name their data relative to the repository (`services/data/...`), so `opd up`
    runs them from anywhere, the package installed or not."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists() or given.parts[:1] != (SOURCE_FOLDER,):
        return path
    shipped = PACKAGE_DIR.joinpath(*given.parts[1:])
    return str(shipped) if shipped.exists() else path


def held_out_rows(run: dict[str, Any], count: int) -> list[dict]:
    """The last `count` rows of the held-out JSONL file, every field kept (a reference `answer`, say)."""
    path = Path(run["dataset"].get("eval_path") or run["dataset"]["path"])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.suffix == ".jsonl" else []
    return rows[-count:] if count else []


def as_prompt(row: dict) -> dict:
    return {"messages": row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]}


def judges(run: dict[str, Any]) -> dict[str, Callable[[dict, str], Any]]:
    """The run's verifier (shown as 'verifier') and its named measures, to mark the samples shown; one that
    only the trainer can import is left out."""
    evaluation = run.get("eval", {})
    specs = {"verifier": evaluation["verifier"]} if evaluation.get("verifier") else {}
    specs |= evaluation.get("measures", {})
    out = {}
    for name, spec in specs.items():
        try:
            out[name] = load_callable(spec, name)
        except InvalidInput:
            continue
    return out


def sample(student: StudentClient, prompts: list[dict], max_tokens: int, console: Console) -> list[str] | None:
    """The student's answers to `prompts`, or None (said why) when it does not answer: they are only shown."""
    if not prompts:
        return []
    try:
        response = student.rollouts({"prompts": prompts, "n": 1, "max_tokens": max_tokens, "temperature": 0.3, "seed": 0})
    except ServiceError as exc:
        console.print(f"[yellow]no samples to show: the student did not answer ({exc})[/yellow]", soft_wrap=True)
        return None
    return [r.text for r in response.rollouts]


def run_up(config: StackConfig, verbose: bool = False) -> int:
    console = Console()
    stack = Stack(config, console, verbose)
    with Interrupts() as interrupts:
        quick = False
        try:
            code, quick = distill(stack, interrupts)
            return code
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping every service at once[/yellow]")
            quick = True
            return interrupts.exit_code
        except OPDError as exc:
            failure = stack.supervisor.failure if stack.supervisor else None
            console.print(f"[red]{failure or exc}[/red]", soft_wrap=True)
            return 1
        finally:
            quick = quick or interrupts.hurry
            interrupts.cleaning, interrupts.hurry = True, False  # from here a signal only hurries the clean-up
            stack.stop(quick, lambda: interrupts.hurry)
            console.print("all services stopped")


def distill(stack: Stack, interrupts: Interrupts) -> tuple[int, bool]:
    """Prepares, starts, runs and reports; returns (exit code, whether to stop the stack without a grace period)."""
    config, console = stack.config, stack.console
    stack.check_ports()
    stack.check_devices()
    models_dir = stack.workdir / "models"
    teacher_models = {name: resolve_model(spec, models_dir, console) for name, spec in config.teacher_specs.items()}
    student_model = resolve_model(config.student, models_dir, console)
    stack.start(teacher_models, student_model)
    supervisor = stack.supervise()
    run = stack.run_config(student_model)
    student = StudentClient(stack.student_urls()[0], api_key=stack.api_key)  # the samples shown: one replica's
    rows = held_out_rows(run, config.samples_to_show)
    prompts = [as_prompt(row) for row in rows]
    max_tokens = int(run.get("sampling", {}).get("max_tokens", 64))
    before = sample(student, prompts, max_tokens, console)
    follower = RunFollower(stack.url("trainer"), stack.api_key, run, supervisor, interrupts, console, config.stop_grace_s)
    follower.submit()
    stack.run_output, stack.steps = Path(str(follower.output_dir)), int(run.get("steps", 100))
    began = time.monotonic()
    outcome = follower.follow()
    after = sample(student, prompts, max_tokens, console) if outcome.state == "completed" else None
    if prompts and before is not None and after is not None:
        console.print(samples_table(rows, before, after, judges(run)))
    return report(stack, outcome, time.monotonic() - began, interrupts), outcome.state == "interrupted"


def report(stack: Stack, outcome: Outcome, seconds: float, interrupts: Interrupts) -> int:
    console, out = stack.console, stack.run_output or stack.workdir / "run"
    step = outcome.status["step"] if outcome.status else 0
    console.print(f"state: {outcome.state} after {step} steps in {seconds:.0f}s")
    console.print(f"plot:        {out / 'teacher_kl.png'}")
    console.print(f"metrics:     {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tensorboard'})")
    console.print(f"checkpoints: {stack.checkpoints}  (trainer state: {out})")
    console.print(f"logs:        {stack.logs}")
    if outcome.reason == "interrupted":
        return interrupts.exit_code
    if outcome.reason is not None:
        console.print(f"[red]{outcome.reason}[/red]", soft_wrap=True)
        return 1
    if outcome.state != "completed":
        error = (outcome.status or {}).get("error") or "see the trainer log"
        console.print(f"[red]the run ended {outcome.state}: {error}[/red]", soft_wrap=True)
        return 1
    return 0
