"""The teacher's request handler: checks a /logprobs request against the
model and the deployment limits, renders prompts, scores, and counts; /render
answers the ids a prompt renders to, as /logprobs renders it.

The vLLM- and SGLang-compatible endpoints (openai_compat.py, sglang_compat.py)
build their jobs their own way and score through the same `score`, so every
endpoint shares the limits, the engine's batching and the counters.

Everything that can be wrong with a request is found here, before the engine
sees it, so a bad request never disturbs the batches of good ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from opd.common import protocol as p
from opd.common.errors import InvalidInput, PayloadTooLarge
from opd.common.settings import TeacherSettings
from opd.common.tokenizer import render_prompt
from opd.teacher.engine import ScoreJob, ScoreOutput, ScoringEngine


class TeacherMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "opd_teacher_requests", "Scoring requests (every endpoint) by outcome", ["outcome"], registry=registry
        )
        self.endpoints = Counter(
            "opd_teacher_endpoint_requests", "Scoring requests by endpoint", ["endpoint"], registry=registry
        )
        self.sequences = Counter("opd_teacher_sequences", "Sequences scored", registry=registry)
        self.tokens = Counter("opd_teacher_scored_tokens", "Tokens scored", registry=registry)
        self.latency = Histogram(
            "opd_teacher_latency_seconds", "Latency of scoring requests", registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.rescored = Gauge(
            "opd_teacher_rescored_sequences", "Sequences scored again without the prefix cache (vllm engine)", registry=registry
        )


class TeacherService:
    def __init__(self, engine: ScoringEngine, settings: TeacherSettings, metrics: TeacherMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        metrics.rescored.set_function(lambda: getattr(engine, "rescored", 0))

    def info(self) -> p.ServiceInfo:
        return p.ServiceInfo(
            service="teacher",
            model=self.engine.model_name,
            engine=self.engine.name,
            vocab_size=self.engine.vocab_size,
            tokenizer_fingerprint=self.engine.fingerprint,
            max_model_len=self.engine.max_model_len,
            limits={
                "max_sequences": self.settings.max_sequences,
                "max_request_tokens": self.settings.max_request_tokens,
                "max_top_k": p.MAX_TOP_K,
                "max_pending": self.settings.max_pending,
                "max_sequence_len": self.engine.max_sequence_len,
            },
        )

    def to_jobs(self, request: p.LogprobsRequest) -> list[ScoreJob]:
        self._check_count(len(request.sequences))
        if not self.engine.supports_temperature(request.temperature):
            raise InvalidInput(
                f"the {self.engine.name} engine cannot score at temperature {request.temperature}: "
                "send temperature 1.0, or run the teacher with --engine hf"
            )
        jobs = []
        for i, seq in enumerate(request.sequences):
            if seq.token_ids is not None:
                jobs.append(ScoreJob(list(seq.token_ids), int(seq.start or 1)))
                continue
            assert seq.prompt is not None and seq.completion is not None
            prompt_ids = render_prompt(self.engine.tokenizer, seq.prompt)
            if not prompt_ids:
                raise InvalidInput(f"sequences[{i}].prompt renders to no tokens: give a non-empty prompt")
            jobs.append(ScoreJob(prompt_ids + list(seq.completion), len(prompt_ids)))
        self.check_jobs(jobs)
        return jobs

    def render(self, request: p.RenderRequest) -> p.RenderResponse:
        """The ids each prompt renders to, as /logprobs puts them before a completion (the trainer measures its
        sequences with them)."""
        self._check_count(len(request.prompts), "prompts")
        out = []
        for i, prompt in enumerate(request.prompts):
            ids = render_prompt(self.engine.tokenizer, prompt)
            if not ids:
                raise InvalidInput(f"prompts[{i}] renders to no tokens: give a non-empty prompt")
            self._check_vocab(f"prompts[{i}]", ids)
            out.append(ids)
        return p.RenderResponse(model=self.engine.model_name, token_ids=out)

    def _check_count(self, n: int, label: str = "sequences") -> None:
        if n > self.settings.max_sequences:
            raise PayloadTooLarge(f"{n} {label} in one request; the limit is {self.settings.max_sequences}: split the request")

    def check_jobs(self, jobs: list[ScoreJob], label: str = "sequences") -> None:
        """The deployment's limits and the model's: count, tokens per request, length, vocabulary."""
        self._check_count(len(jobs), label)
        total = 0
        for i, job in enumerate(jobs):
            self._check_ids(f"{label}[{i}]", job.token_ids)
            total += len(job.token_ids)
            if total > self.settings.max_request_tokens:
                raise PayloadTooLarge(
                    f"the request holds more than {self.settings.max_request_tokens} tokens: split it into smaller requests"
                )

    def _check_ids(self, where: str, ids: list[int]) -> None:
        limit = self.engine.max_sequence_len
        if len(ids) > limit:
            why = "" if limit == self.engine.max_model_len else (
                f" (max_model_len {self.engine.max_model_len}, less the token the {self.engine.name} engine generates)"
            )
            raise InvalidInput(
                f"{where} has {len(ids)} tokens; the teacher's maximum length is {limit}{why}: shorten it"
            )
        self._check_vocab(where, ids)

    def _check_vocab(self, where: str, ids: list[int]) -> None:
        bad = max(ids)
        if bad >= self.engine.vocab_size:
            raise InvalidInput(
                f"{where} holds token id {bad}, outside the teacher's vocabulary of {self.engine.vocab_size} "
                "ids: were these ids made by another tokenizer? compare /info's tokenizer_fingerprint"
            )

    async def score(
        self, make_jobs: Callable[[], list[ScoreJob]], top_k: int = 0, temperature: float = 1.0, ranks: bool = False,
        endpoint: str = "/logprobs",
    ) -> tuple[list[ScoreJob], list[ScoreOutput]]:
        """Builds and checks the jobs, scores them, counts. Every endpoint scores through here.

        A job with nothing to score (start == its length) gets an empty output without reaching the engine.
        """
        began = time.perf_counter()
        self.metrics.endpoints.labels(endpoint).inc()
        try:
            jobs = make_jobs()
        except Exception:
            self.metrics.requests.labels("rejected").inc()
            raise
        todo = [i for i, job in enumerate(jobs) if job.start < len(job.token_ids)]
        try:
            scored = await self.engine.score([jobs[i] for i in todo], top_k=top_k, temperature=temperature, ranks=ranks)
        except asyncio.CancelledError:  # the client went away: the engine has stopped its work
            self.metrics.requests.labels("cancelled").inc()
            raise
        outputs = [ScoreOutput([], [] if top_k else None, [] if ranks else None) for _ in jobs]
        for i, out in zip(todo, scored, strict=True):
            outputs[i] = out
        self.metrics.requests.labels("ok").inc()
        self.metrics.sequences.inc(len(jobs))
        self.metrics.tokens.inc(sum(len(out.logprobs) for out in outputs))
        self.metrics.latency.observe(time.perf_counter() - began)
        return jobs, outputs

    async def logprobs(self, request: p.LogprobsRequest) -> p.LogprobsResponse:
        jobs, outputs = await self.score(lambda: self.to_jobs(request), top_k=request.top_k, temperature=request.temperature)
        results = []
        for job, out in zip(jobs, outputs, strict=True):
            top = None
            if out.top_logprobs is not None:
                top = [[p.TopLogprob(token_id=t, logprob=lp) for t, lp in pos] for pos in out.top_logprobs]
            results.append(p.SequenceLogprobs(token_ids=job.token_ids, start=job.start, logprobs=out.logprobs, top_logprobs=top))
        scored = sum(len(r.logprobs) for r in results)
        usage = p.Usage(sequences=len(jobs), input_tokens=sum(len(j.token_ids) for j in jobs), scored_tokens=scored)
        return p.LogprobsResponse(model=self.engine.model_name, results=results, usage=usage)
