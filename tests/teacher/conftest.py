"""Teacher fixtures: sample sequences to score."""

from __future__ import annotations

import random

import pytest

from opd.teacher.engine import HFScoringEngine, ScoreJob


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
