"""Teacher fixtures: an in-process hf engine on the tiny teacher, and sample sequences."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.common.settings import TeacherSettings
from services.teacher.engine import HFScoringEngine, ScoreJob


@pytest.fixture(scope="session")
def teacher_settings(teacher_model: Path) -> TeacherSettings:
    return TeacherSettings(model=str(teacher_model), engine="hf", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_engine(teacher_settings: TeacherSettings) -> HFScoringEngine:
    return HFScoringEngine(teacher_settings)


@pytest.fixture(scope="session")
def jobs(hf_engine: HFScoringEngine) -> list[ScoreJob]:
    """Sequences of varied lengths and start positions, all in the vocabulary."""
    rng = random.Random(7)
    out = []
    for _ in range(12):
        n = rng.randint(3, 90)
        ids = [rng.randrange(hf_engine.vocab_size) for _ in range(n)]
        out.append(ScoreJob(ids, rng.randint(1, n - 1)))
    return out
