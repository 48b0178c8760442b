"""`make test-compose`: the compose files, run for real with a container engine on this host.

    python docker/compose_test.py        # root (or a user of a running engine); about half an hour

1) Builds the CPU image from docker/Dockerfile with compose v2 (the base image
   from Debian's packages, docker/base_image.sh, unless OPD_BASE_IMAGE names one).
2) Prepares, on the stack's volume, SmolLM2-135M-Instruct as teacher A, a
   20-layer cut of it as teacher B, a 12-layer cut as the student (one
   tokenizer), and teacher A with its vocabulary permuted: another tokenizer
   (other ids), the same function (services/common/vocab_variants.py).
3) Starts teacher, student and trainer (docker-compose.yml + the CPU and
   host-network overrides) and waits for their healthchecks.
4) POST /runs a two-step run: it completes, every step records the teacher
   KL, and the policy versions and the trainer checkpoint are on the volume.
5) Sets TEACHER_MODEL to teacher B and brings the stack up again: only the
   teacher is recreated (the trainer container and its settings stay), and a
   second run completes against the new teacher.
6) Sets TEACHER_MODEL to the permuted teacher: the same run config completes,
   the trainer aligning the two tokenizers on bytes (the run's status says
   `alignment` bytes), and nothing in the trainer changed.
7) Always tears down: containers, volume and the images it built, and the
   engine when it started one (docker/engine.py). Prints the wall time of each
   phase and the image size.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "docker"), str(ROOT)]

from engine import EngineError, compose_command, docker_engine, torch_wheel_server  # noqa: E402

from opd.common import protocol as p  # noqa: E402
from opd.common.client import SyncClient  # noqa: E402

FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.host.yml"]
PROJECT = "opd-compose-test"
IMAGE = "opd-compose-test"  # tagged :cpu by docker-compose.cpu.yml
BASE_TAG = "opd-compose-test-base:bookworm"
MODELS = "/data/models"
SMOLLM2 = "smollm2-135m-instruct"
RUN_TIMEOUT_S = 1500
TERMINAL = {"completed", "stopped", "failed"}


class StackFailure(AssertionError):
    """The stack did not behave as the compose files promise."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The compose project under test: its command, environment and ports."""

    def __init__(self, engine_env: dict[str, str], base_image: str, find_links: str) -> None:
        self.env = {**os.environ, **engine_env}
        self.compose = [*compose_command(self.env), "--project-name", PROJECT, "--project-directory", str(ROOT)]
        for name in FILES:
            self.compose += ["-f", str(ROOT / name)]
        self.ports = {name: str(free_port()) for name in ("TEACHER_PORT", "STUDENT_PORT", "TRAINER_PORT")}
        self.env.update(self.ports, OPD_IMAGE=IMAGE, OPD_BASE_IMAGE=base_image, OPD_PIP_FIND_LINKS=find_links,
                        OPD_API_KEY=secrets.token_hex(16), TEACHER_MODEL=f"{MODELS}/teacher-a",
                        STUDENT_MODEL=f"{MODELS}/student", MAX_MODEL_LEN="512", KV_CACHE_GIB="1")

    def run(self, *args: str, capture: bool = False, nice: bool = False) -> str:
        cmd = [*(["nice", "-n", "19"] if nice else []), *self.compose, *args]
        done = subprocess.run(cmd, env=self.env, text=True, stdout=subprocess.PIPE if capture else None)
        if done.returncode != 0:
            raise StackFailure(f"`{shlex.join(cmd[-len(args):])}` failed with exit code {done.returncode}")
        return done.stdout or ""

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], env=self.env, text=True, check=True, capture_output=True).stdout.strip()

    def container(self, service: str) -> str:
        return self.run("ps", "--quiet", service, capture=True).strip()

    def client(self, service: str) -> SyncClient:
        port = self.ports[f"{service.upper()}_PORT"]
        return SyncClient(f"http://127.0.0.1:{port}", api_key=self.env["OPD_API_KEY"], retries=2)

    def up(self, **env: str) -> None:
        self.env.update(env)
        self.run("up", "--detach", "--no-build", "--wait", "--wait-timeout", "1200")


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n=== {name}", flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - start
        print(f"=== {name}: {timings[name]:.0f}s", flush=True)


def prepare_models(stack: Stack) -> None:
    """One container writes all four model folders onto the volume."""
    steps = [
        ["opd", "models", "prepare", SMOLLM2, f"{MODELS}/teacher-a"],
        ["opd", "models", "prepare", SMOLLM2, f"{MODELS}/teacher-b", "--drop-layers", "12-21"],
        ["opd", "models", "prepare", SMOLLM2, f"{MODELS}/student", "--drop-layers", "6-23"],
        ["python", "-c", "from pathlib import Path; from opd.common.vocab_variants import permuted_model; "
                         f"permuted_model(Path('{MODELS}/teacher-a'), Path('{MODELS}/teacher-permuted'))"],
    ]
    script = " && ".join(shlex.join(s) for s in steps)
    stack.run("run", "--rm", "--no-deps", "--volume", f"{ROOT / 'tests'}:/opt/opd-tests/tests:ro",
              "--env", "PYTHONPATH=/opt/opd-tests", "teacher", "sh", "-c", script)


def run_config(name: str) -> dict:
    """A short run; service URLs, the student's model, the dataset and the folders come from the trainer's environment."""
    return {
        "name": name,
        "student": {"finetune": "lora", "lora": {"rank": 8, "alpha": 16}, "torch_threads": 1},
        "dataset": {"eval_size": 4},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_tokens": 16},
        "steps": 2,
        "eval": {"every": 0},
        "save_every": 1,
    }


def train(stack: Stack, name: str) -> p.RunStatus:
    trainer = stack.client("trainer")
    created = trainer.request("POST", "/runs", run_config(name), p.RunCreated)
    print(f"run {created.id} started", flush=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen = -1
    while time.monotonic() < deadline:
        status = trainer.request("GET", f"/runs/{created.id}", model=p.RunStatus)
        if status.step != seen:
            seen = status.step
            print(f"  {status.state} step {status.step}/{status.steps} {status.latest or ''}", flush=True)
        if status.state in TERMINAL:
            return status
        time.sleep(5)
    raise StackFailure(f"run {created.id} did not finish in {RUN_TIMEOUT_S}s")


def check_completed(stack: Stack, status: p.RunStatus) -> None:
    if status.state != "completed":
        raise StackFailure(f"run {status.id} ended {status.state}: {status.error}")
    records = stack.client("trainer").request("GET", f"/runs/{status.id}/metrics", model=p.RunMetrics).records
    kls = [r.get("teacher_kl") for r in records if r.get("kind") == "train"]
    if len(kls) != status.steps or not all(isinstance(k, float) and k == k for k in kls):
        raise StackFailure(f"run {status.id}: teacher KL per step {kls}, expected {status.steps} numbers")
    listing = stack.run("exec", "-T", "trainer", "sh", "-c",
                        f"ls /data/checkpoints/{status.name} {status.output_dir}/checkpoints", capture=True)
    if "v0000" not in listing or "step-0000" not in listing:
        raise StackFailure(f"run {status.id}: no policy version or trainer checkpoint on the volume:\n{listing}")
    print(f"run {status.id} completed: teacher KL {', '.join(f'{k:.3f}' for k in kls)}; on the volume:\n{listing}")


def swap_teacher(stack: Stack, model: str) -> None:
    """TEACHER_MODEL changes, the trainer stays: compose recreates only the teacher."""
    trainer_before = stack.container("trainer")
    stack.up(TEACHER_MODEL=model)
    if stack.container("trainer") != trainer_before:
        raise StackFailure("changing TEACHER_MODEL recreated the trainer")
    served = stack.client("teacher").info().model
    if served != model:
        raise StackFailure(f"the teacher serves {served}, not {model}")


def scenario(stack: Stack, timings: dict[str, float]) -> str:
    with phase("build the image", timings):
        stack.run("build", "--progress=plain", "teacher", nice=True)
    size = int(stack.docker("image", "inspect", "--format", "{{.Size}}", f"{IMAGE}:cpu"))
    with phase("prepare models on the volume", timings):
        prepare_models(stack)
    with phase("start the stack (healthy)", timings):
        stack.up()
    with phase("run with teacher A", timings):
        check_completed(stack, train(stack, "compose-a"))
    with phase("swap to teacher B, same tokenizer", timings):
        swap_teacher(stack, f"{MODELS}/teacher-b")
        check_completed(stack, train(stack, "compose-b"))
    with phase("swap to a teacher of another tokenizer", timings):
        swap_teacher(stack, f"{MODELS}/teacher-permuted")
        status = train(stack, "compose-c")
        check_completed(stack, status)
        if status.alignment != {"default": "bytes"}:
            raise StackFailure(f"run {status.id}: the teacher's alignment is {status.alignment}, expected bytes")
        print(f"run {status.id} aligned the teacher's tokenizer on bytes")
    return f"{size / 1e9:.2f} GB"


def base_image(env: dict[str, str]) -> tuple[str, bool]:
    """OPD_BASE_IMAGE, or one built from Debian's packages (then removed at the end)."""
    if os.environ.get("OPD_BASE_IMAGE"):
        return os.environ["OPD_BASE_IMAGE"], False
    subprocess.run([str(ROOT / "docker" / "base_image.sh"), BASE_TAG], env={**os.environ, **env}, check=True)
    return BASE_TAG, True


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear down on a kill as on Ctrl-C
    timings: dict[str, float] = {}
    start = time.monotonic()
    size = "?"
    try:
        with docker_engine() as engine_env, torch_wheel_server() as find_links:
            with phase("base image", timings):
                base, built_base = base_image(engine_env)
            stack = Stack(engine_env, base, find_links)
            try:
                size = scenario(stack, timings)
            except StackFailure:
                with contextlib.suppress(StackFailure):
                    stack.run("logs", "--tail", "40")
                raise
            finally:
                with phase("tear down", timings):
                    with contextlib.suppress(StackFailure):
                        stack.run("down", "--volumes", "--rmi", "all", "--remove-orphans")
                    if built_base:
                        with contextlib.suppress(subprocess.CalledProcessError):
                            stack.docker("image", "rm", base)
    except (StackFailure, EngineError, subprocess.CalledProcessError) as exc:
        print(f"\ntest-compose FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        total = time.monotonic() - start
        print("\n" + "\n".join(f"{name:<40} {s:7.0f}s" for name, s in timings.items()))
        print(f"{'wall time':<40} {total:7.0f}s   image {IMAGE}:cpu {size}")
    print("test-compose passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
