"""The trainer tests' shared set-up for runs against real services.

- `start_service` / `wait_all`: one service process, and waiting for several (printing a failed one's log);
- `started`: a context manager that starts a dict of named services, waits for all and stops all on exit;
- `hf_args`: the command line of a teacher or student service on the hf engine (float32, CPU);
- `base_run` and `build`: the run-config tree every real-service test starts from (conftest's `make_config`
  run), which each test deep-merges its own fields into, then builds with its `a__b=value` overrides.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opd.common.process import ServiceProcess, free_port
from opd.trainer.config import RunConfig, build_config, deep_merge

ENV = {"TOKENIZERS_PARALLELISM": "false"}  # and the KV cache of tests/conftest.py, inherited


def start_service(name: str, args: list[str], log_dir: Path, port: int | None = None) -> ServiceProcess:
    port = port or free_port()
    proc = ServiceProcess(name, [*args, "--port", str(port)], port, log_file=log_dir / f"{name}-{port}.log", env=ENV)
    return proc.start()


def wait_all(*procs: ServiceProcess, timeout: float = 400.0) -> None:
    for proc in procs:
        try:
            proc.wait_ready(timeout=timeout)
        except Exception:
            if proc.log_file and proc.log_file.exists():
                sys.stderr.write(proc.log_file.read_text()[-4000:])
            raise


@contextmanager
def started(log_dir: Path, **specs: tuple[str, list[str]]) -> Iterator[dict[str, ServiceProcess]]:
    """Start every `key=(name, args)` service side by side, wait for all, and give them as {key: process}.

    A test may replace one in the dict (same port); whatever the dict holds on exit is stopped."""
    running: dict[str, ServiceProcess] = {}
    try:
        for key, (name, args) in specs.items():
            running[key] = start_service(name, args, log_dir)
        wait_all(*running.values())
        yield running
    finally:
        for proc in running.values():
            proc.stop()


def hf_args(role: str, model: Path, checkpoint_root: Path | None = None) -> list[str]:
    """`teacher serve` or `student serve` on the hf engine, float32 on the CPU (a student with its checkpoint root)."""
    args = [role, "serve", "--model", str(model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    return args if checkpoint_root is None else [*args, "--checkpoint-root", str(checkpoint_root)]


def base_run(student_model: Path, prompts: Path | str, output_dir: Path, checkpoint_root: Path,
             urls: Mapping[str, Any]) -> dict[str, Any]:
    """A small LoRA run (6 steps, seed 3) on `prompts`; `urls` names the services (teacher_urls or teachers,
    student_url or student_urls). A test deep-merges its own fields over it (`build`)."""
    return {
        "name": "t",
        "student": {"model": str(student_model), "dtype": "float32", "device": "cpu", "torch_threads": 1,
                    "lora": {"rank": 8, "alpha": 16}},
        **urls,
        "dataset": {"path": str(prompts), "eval_size": 16},
        "sampling": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_tokens": 16},
        "optimizer": {"lr": 0.01},
        "steps": 6,
        "eval": {"every": 3},
        "save_every": 3,
        "seed": 3,
        "output_dir": str(output_dir),
        "checkpoint_root": str(checkpoint_root),
        "services": {"max_wait_s": 180, "retries": 2, "max_backoff_s": 2},
    }


def build(base: Mapping[str, Any], fields: Mapping[str, Any] | None = None, /, **overrides: Any) -> RunConfig:
    """`fields` deep-merged over `base`, then each keyword `a__b=value` set as `a.b` (no environment)."""
    tree = deep_merge(base, fields or {})
    return build_config(tree, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()], environ={})
