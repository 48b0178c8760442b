"""The teacher's vLLM engine in-process (one AsyncLLM for the module): the
prefix-cache paths of shared prompts against the hf engine, and its limits.

vLLM's CPU build caches whole blocks of 128 tokens and writes no logprob row
for a cached token, so these sequences are long enough for a cache hit to
reach past `start`. Tolerance as in test_http.py: VLLM_ATOL per logprob.
"""

from __future__ import annotations

import random

import pytest
import pytest_asyncio
import torch

from opd.common.errors import InvalidInput
from opd.common.settings import TeacherSettings
from opd.teacher.engine import HFScoringEngine, ScoreJob

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
VLLM_ATOL = 2e-3
BLOCK = 128  # vLLM-CPU's cache block


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(teacher_settings: TeacherSettings):
    from opd.teacher.vllm_engine import VLLMScoringEngine

    eng = VLLMScoringEngine(teacher_settings.model_copy(update={"engine": "vllm"}))
    yield eng
    await eng.close()


def shared_completions(seed: int, prompt_len: int = BLOCK + 20, shared: int = 2 * BLOCK + 40, group: int = 3) -> list[ScoreJob]:
    """One prompt's completions that share their first `shared` tokens: whole cache blocks past `start`.
    The prompt outlasts the first cache block: a sequence scored from before it skips the cache at once."""
    rng = random.Random(seed)
    prompt = [rng.randrange(512) for _ in range(prompt_len)]
    common = [rng.randrange(512) for _ in range(shared)]
    return [ScoreJob(prompt + common + [rng.randrange(512) for _ in range(8)], prompt_len) for _ in range(group)]


def assert_like_hf(outputs, jobs: list[ScoreJob], hf_engine: HFScoringEngine, top_k: int) -> None:
    for out, ref in zip(outputs, hf_engine.score_sync(jobs, top_k=top_k), strict=True):
        assert len(out.logprobs) == len(ref.logprobs)
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(ref.logprobs), atol=VLLM_ATOL)
        if top_k:
            got = torch.tensor([[lp for _, lp in pos] for pos in out.top_logprobs])
            assert torch.allclose(got, torch.tensor([[lp for _, lp in pos] for pos in ref.top_logprobs]), atol=VLLM_ATOL)


async def test_a_cache_hit_into_the_scored_span_is_rescored(engine, hf_engine: HFScoringEngine) -> None:
    """The first completion fills the cache; the others hit 384 cached tokens, past `start` = 148:
    those rows were never computed, so both are scored again without the cache, and match hf.
    Scored from before the first cache block (start 20), they skip the cache at once: none is rescored."""
    jobs = shared_completions(seed=1)
    before = engine.rescored
    outputs = await engine.score(jobs, top_k=2)
    assert_like_hf(outputs, jobs, hf_engine, top_k=2)
    assert engine.rescored - before == len(jobs) - 1
    early = shared_completions(seed=3, prompt_len=20)
    before = engine.rescored
    assert_like_hf(await engine.score(early, top_k=2), early, hf_engine, top_k=2)
    assert engine.rescored == before


async def test_a_row_for_another_token_is_rescored(engine, hf_engine: HFScoringEngine, monkeypatch) -> None:
    """What a preemption can leave: the reported cache hit stays below `start` (it was counted at the
    first scheduling) while a longer hit left a scored row unwritten. Forced here on the real engine's
    cached reads: the hit reported as 0 and one scored row left holding another token."""
    generate = engine.llm.generate
    stale = []

    async def preempted(prompt, params, **kwargs):
        async for out in generate(prompt, params, **kwargs):
            if out.finished and not params.skip_reading_prefix_cache:
                flat, row = out.prompt_logprobs, len(prompt["prompt_token_ids"]) - 3
                at = flat.start_indices[row]
                flat.token_ids[at], flat.logprobs[at] = (flat.token_ids[at] + 1) % 512, 0.0
                out.num_cached_tokens = 0
                stale.append(row)
            yield out

    monkeypatch.setattr(engine.llm, "generate", preempted)
    jobs = shared_completions(seed=2, shared=40)  # no whole block past start: only the check can tell
    before = engine.rescored
    outputs = await engine.score(jobs, top_k=0)
    assert_like_hf(outputs, jobs, hf_engine, top_k=0)
    assert len(stale) == len(jobs) and engine.rescored - before == len(jobs)


async def test_length_limit_is_vllms_and_its_refusals_are_bad_requests(engine) -> None:
    """vLLM generates one token after the prompt, so it scores at most max_model_len - 1 tokens;
    a longer sequence that reaches it is the request's fault (422), not the engine's (500)."""
    assert engine.max_model_len == 512 and engine.max_sequence_len == 511
    ok = await engine.score([ScoreJob([7] * 511, 500)])
    assert len(ok[0].logprobs) == 11
    with pytest.raises(InvalidInput) as err:
        await engine.score([ScoreJob([7] * 512, 500)])
    assert err.value.status_code == 422 and "maximum model length of 512" in str(err.value)


async def test_the_kv_cache_is_kv_cache_gib_fractions_included(engine, teacher_settings: TeacherSettings) -> None:
    """tests/conftest.py gives every engine a quarter GiB (OPD_TEACHER_KV_CACHE_GIB=0.25): vLLM gets it in bytes,
    not rounded to a whole GiB as its legacy VLLM_CPU_KVCACHE_SPACE would have it."""
    assert teacher_settings.kv_cache_gib == 0.25
    assert engine.llm.vllm_config.cache_config.kv_cache_memory_bytes == 2**28
