"""Trainer fixtures: real vLLM teacher and student services on the tiny models,
shared by every trainer test, a prompt file, and a run-config factory.

The two services start side by side (about 30-60 s on two cores) once per
session. Tests that need the student on its base weights get them: every run
publishes its own starting weights first (loop.py).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opd.common.process import ServiceProcess, free_port
from opd.trainer.config import RunConfig, build_config
from tests.utils.tiny_models import WORDS

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


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


def teacher_args(model: Path) -> list[str]:
    return ["teacher", "serve", "--model", str(model), "--engine", "vllm", "--dtype", "float32"]


@pytest.fixture(scope="session")
def service_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def services(teacher_model: Path, student_model: Path, checkpoint_root: Path, service_logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    """A vLLM teacher and a vLLM student, started together; a test may replace one (same port) in the dict."""
    running = {
        "teacher": start_service("teacher", teacher_args(teacher_model), service_logs),
        "student": start_service("student", ["student", "serve", "--model", str(student_model), "--engine", "vllm",
                                             "--dtype", "float32", "--checkpoint-root", str(checkpoint_root)], service_logs),
    }
    try:
        wait_all(*running.values())
        yield running
    finally:
        for proc in running.values():
            proc.stop()


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 short prompts over the tiny tokenizer's words (the first 16 held out for evaluation)."""
    rng = random.Random(11)
    lines = sorted({" ".join(rng.choices(WORDS, k=rng.randint(2, 5))).capitalize() for _ in range(400)})[:200]
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "{line}"}}\n' for line in lines))
    return path


@pytest.fixture
def make_config(
    services: dict[str, ServiceProcess], student_model: Path, prompts_file: Path, checkpoint_root: Path, tmp_path: Path
) -> Callable[..., RunConfig]:
    """A small LoRA run against the shared services; keyword `a__b=value` overrides `a.b`."""

    def make(**overrides) -> RunConfig:
        data = {
            "name": "t",
            "student": {"model": str(student_model), "dtype": "float32", "device": "cpu", "torch_threads": 1,
                        "lora": {"rank": 8, "alpha": 16}},
            "teacher_urls": [services["teacher"].url],
            "student_url": services["student"].url,
            "dataset": {"path": str(prompts_file), "eval_size": 16},
            "sampling": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_tokens": 16},
            "optimizer": {"lr": 0.01},
            "steps": 6,
            "eval": {"every": 3},
            "save_every": 3,
            "seed": 3,
            "output_dir": str(tmp_path / "run"),
            "checkpoint_root": str(checkpoint_root),
            "services": {"max_wait_s": 180, "retries": 2, "max_backoff_s": 2},
        }
        sets = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
        return build_config(data, sets, environ={})

    return make
