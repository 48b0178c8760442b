"""The teacher's vLLM engine: AsyncLLM prompt logprobs, one prefill per sequence.

Choices:
1) Every sequence is its own request with `prompt_logprobs`, so concurrent
   HTTP requests share batches through vLLM's continuous batching.
2) One token is generated (vLLM needs max_tokens >= 1) and thrown away.
3) `detokenize=False` and flat logprobs: candidates are never turned into
   text and the result arrives as flat arrays, not per-token dicts.
4) Shared prompts are prefilled once. In on-policy distillation every prompt
   comes back with G completions; vLLM by default skips its prefix cache for
   prompt-logprob requests, so each would prefill the prompt again. Here the
   first sequence of each prompt group runs first, then the rest read the
   cached prompt blocks and compute logits only past them. vLLM writes no
   logprob row for a cached token (its buffer rows stay uninitialised), so a
   sequence is scored again without the cache when its reported cache hit
   reaches into the scored span (completions that share their first tokens
   across a whole cache block: 128 tokens on the CPU build, typically 16 on
   GPUs), when the hit is not reported, or when any returned row names
   another token than the one scored: after a preemption vLLM may serve a
   longer cache hit than the one it reported at first scheduling. A sequence
   scored from before the first cache unit (prompt scoring from position 1,
   as the vLLM- and SGLang-compatible endpoints ask) skips the cache at once:
   any hit would reach into its scored span.
5) vLLM computes prompt logprobs from the unscaled logits, so this engine
   scores at temperature 1 only; the hf engine scores at any temperature.
6) vLLM generates one token after the prompt, so a sequence holds at most
   max_model_len - 1 tokens (`max_sequence_len`); whatever vLLM still refuses
   as a bad request is a 422 with its message, never a 500.
7) If the engine dies, `healthy()` turns false: the service answers 503 and
   exits (services/common/engine_watch.py).
8) Logprobs are normalised in float64 and rounded once to float32, as the hf
   engine's (services/common/hf.py choice 3): vLLM's own log_softmax sums
   the float32 normaliser in the vocabulary's order, so a teacher with its
   vocabulary permuted scored up to 1.1e-5 apart from the plain one. vLLM
   computes logprobs in the worker processes it spawns; opd's vLLM plugin
   (vllm_plugin.py) replaces its `Sampler.compute_logprobs` there, in the
   processes started while this engine is built (OPD_FLOAT64_LOGPROBS=1 in
   their environment) and nowhere else. 256 positions' logits are in
   float64 at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from opd.common.errors import InvalidInput, InvalidRequest
from opd.common.settings import TeacherSettings
from opd.common.vllm_args import build_async_llm
from opd.teacher.engine import ScoreJob, ScoreOutput, ScoringEngine
from opd.teacher.vllm_plugin import ENV


@contextmanager
def float64_normaliser() -> Iterator[None]:
    """While the engine is built, its spawned processes inherit OPD_FLOAT64_LOGPROBS=1 (8)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


class VLLMScoringEngine(ScoringEngine):
    name = "vllm"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        from opd.common.protocol import MAX_TOP_K

        with float64_normaliser():
            self.llm = build_async_llm(settings, max_logprobs=MAX_TOP_K)
        config = self.llm.model_config
        self.vocab_size = min(config.get_vocab_size(), len(self.tokenizer))
        self.max_model_len = config.max_model_len
        self.max_sequence_len = self.max_model_len - 1  # room for the token vLLM generates
        self.rescored = 0  # sequences scored again without the prefix cache
        cache = self.llm.vllm_config.cache_config
        # The finest token boundary a prefix-cache hit lands on.
        self.cache_unit = getattr(cache, "hash_block_size", None) or cache.block_size or 16
        self._ids = itertools.count()

    def supports_temperature(self, temperature: float) -> bool:
        return temperature == 1.0

    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def score(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]:
        if not self.supports_temperature(temperature):
            raise InvalidRequest("the vllm engine scores at temperature 1.0 only; use the hf engine for other temperatures")
        groups: dict[tuple[int, ...], list[int]] = {}
        uncached = []
        for i, job in enumerate(jobs):
            if job.start < self.cache_unit:
                uncached.append(i)
            else:
                groups.setdefault(tuple(job.token_ids[: job.start]), []).append(i)
        outputs: list[ScoreOutput | None] = [None] * len(jobs)
        first = [(g[0], True) for g in groups.values()] + [(i, False) for i in uncached]
        for wave in (first, [(i, True) for g in groups.values() for i in g[1:]]):
            scored = await asyncio.gather(*(self._score_one(jobs[i], top_k, ranks, use_cache) for i, use_cache in wave))
            for (i, _), out in zip(wave, scored, strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    async def _score_one(self, job: ScoreJob, top_k: int, ranks: bool = False, use_cache: bool = True) -> ScoreOutput:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=top_k, detokenize=False, flat_logprobs=True,
            skip_reading_prefix_cache=not use_cache,
        )
        final = await self._generate(job.token_ids, params)
        if use_cache and not self.rows_written(final, job):
            self.rescored += 1
            return await self._score_one(job, top_k, ranks, use_cache=False)
        flat = final.prompt_logprobs
        logprobs: list[float] = []
        top: list[list[tuple[int, float]]] | None = [] if top_k else None
        rank: list[int] | None = [] if ranks else None
        # Position j holds log p(token_j | tokens_<j): its first entry is the
        # actual token, the next top_k entries are the best alternatives by rank.
        for j in range(job.start, len(job.token_ids)):
            lo, hi = flat.start_indices[j], flat.end_indices[j]
            logprobs.append(float(flat.logprobs[lo]))
            if rank is not None:
                rank.append(int(flat.ranks[lo]))
            if top is not None:
                top.append([(int(flat.token_ids[i]), float(flat.logprobs[i])) for i in range(lo + 1, hi)][:top_k])
        return ScoreOutput(logprobs, top, rank)

    async def _generate(self, token_ids: list[int], params):
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        final = None
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=token_ids), params, request_id=f"score-{next(self._ids)}"
            ):
                final = out
        except VLLMClientError as exc:  # vLLM's own request validation: the request's fault
            raise InvalidInput(f"the teacher's vLLM engine refused the sequence: {exc}") from exc
        assert final is not None and final.prompt_logprobs is not None
        return final

    @staticmethod
    def rows_written(final, job: ScoreJob) -> bool:
        """Whether every scored row was computed: row j (the logprob of token j) exists only past the
        cache hit, and its first entry is the token it scores."""
        cached = final.num_cached_tokens
        if cached is None or cached >= job.start:
            return False
        flat = final.prompt_logprobs
        return all(flat.token_ids[flat.start_indices[j]] == job.token_ids[j] for j in range(job.start, len(job.token_ids)))

    async def close(self) -> None:
        # Drop the last reference while the interpreter is whole: AsyncLLM's finaliser fails at exit otherwise.
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
