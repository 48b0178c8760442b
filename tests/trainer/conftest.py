"""Trainer fixtures: real vLLM teacher and student services on the tiny models,
shared by every trainer test, a prompt file, and a run-config factory.

The two services start side by side (about 30-60 s on two cores) once per
session. Tests that need the student on its base weights get them: every run
publishes its own starting weights first (loop.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opd.common.process import ServiceProcess
from opd.trainer.config import RunConfig
from tests.trainer.runs import base_run, build, started
from tests.utils.tiny_models import WORDS


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
    student = ["student", "serve", "--model", str(student_model), "--engine", "vllm", "--dtype", "float32",
               "--checkpoint-root", str(checkpoint_root)]
    with started(service_logs, teacher=("teacher", teacher_args(teacher_model)), student=("student", student)) as running:
        yield running


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
        urls = {"teacher_urls": [services["teacher"].url], "student_url": services["student"].url}
        return build(base_run(student_model, prompts_file, tmp_path / "run", checkpoint_root, urls), **overrides)

    return make
