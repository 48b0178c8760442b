"""The hf engine against a direct transformers forward, one sequence at a time."""

from __future__ import annotations

import torch

from opd.common.settings import TeacherSettings
from opd.teacher.engine import HFScoringEngine, ScoreJob

# Batched (padded) and single-sequence forwards differ only by float32 rounding.
ATOL = 1e-5


def direct(engine: HFScoringEngine, job: ScoreJob, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_j | x_<j) for j >= start, from an unpadded single-sequence forward."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([job.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return torch.stack([logp[j - 1, job.token_ids[j]] for j in range(job.start, len(job.token_ids))])


def test_matches_direct_forward(hf_engine: HFScoringEngine, jobs: list[ScoreJob]) -> None:
    outputs = hf_engine.score_sync(jobs)
    for job, out in zip(jobs, outputs, strict=True):
        assert len(out.logprobs) == len(job.token_ids) - job.start
        assert torch.allclose(torch.tensor(out.logprobs), direct(hf_engine, job), atol=ATOL)
        assert all(lp <= 0 for lp in out.logprobs)


def test_top_k_and_temperature(hf_engine: HFScoringEngine, jobs: list[ScoreJob]) -> None:
    job = jobs[0]
    out = hf_engine.score_sync([job], top_k=5, temperature=0.7)[0]
    assert torch.allclose(torch.tensor(out.logprobs), direct(hf_engine, job, 0.7), atol=ATOL)
    with torch.no_grad():
        logits = hf_engine.model(torch.tensor([job.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    assert out.top_logprobs is not None
    for j, top in zip(range(job.start, len(job.token_ids)), out.top_logprobs, strict=True):
        values, indices = logp[j - 1].topk(5)
        assert [t for t, _ in top] == indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=ATOL)
        # The scored token can never beat the best alternative.
        assert out.logprobs[j - job.start] <= top[0][1] + ATOL


def test_micro_batch_budget_does_not_change_results(teacher_settings: TeacherSettings, hf_engine, jobs) -> None:
    small = HFScoringEngine(teacher_settings.model_copy(update={"micro_batch_tokens": 100}))
    for a, b in zip(small.score_sync(jobs), hf_engine.score_sync(jobs), strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL)


async def test_a_long_request_does_not_hold_back_a_short_one(teacher_settings) -> None:
    """Each micro-batch is a turn: a one-sequence request asked for during a many-batch request ends long before it."""
    import asyncio
    import random
    import threading
    import time

    engine = HFScoringEngine(teacher_settings.model_copy(update={"micro_batch_tokens": 256}))
    rng = random.Random(3)
    many = [ScoreJob([rng.randrange(512) for _ in range(250)], 1) for _ in range(96)]  # one sequence per micro-batch
    scoring = threading.Event()  # set by the long request's first micro-batch
    score_batch = engine._score_batch

    def watched(*args):
        scoring.set()
        return score_batch(*args)

    engine._score_batch = watched
    began = time.monotonic()
    long = asyncio.create_task(engine.score(many))
    assert await asyncio.to_thread(scoring.wait, 60), "the long request never began scoring"
    short = await engine.score([ScoreJob([5, 6, 7], 1)])
    short_done = time.monotonic()
    assert not long.done(), "the long request ended before the short one: it held the engine"
    assert len(await long) == 96 and len(short[0].logprobs) == 2
    assert short_done - began < 0.5 * (time.monotonic() - began)
    await engine.close()
