"""The student's request handlers: rollouts and weight swaps, checked and counted.

Choices:
1) Everything that can be wrong with a request (limits, vocabulary, length,
   a checkpoint's path and contents) is found before the engine sees it, so a
   bad request never disturbs the rollouts of good ones or the serving version.
2) Versions only move forward: a swap to a version at or below the current
   one is a 409, checked before and again after waiting for the lock (two
   swaps may race). A swap to exactly what is serving (same version, kind
   and path) succeeds without loading anything: a client that lost the
   answer to a swap that went through (a timeout) may send it again.
3) A rollout request runs under the read side of `VersionLock` and reports
   the version it ran under; a swap runs under the write side. A request
   whose client goes away is cancelled (the route watches the connection),
   which stops its engine work and counts it as "cancelled".
4) Usage counts each prompt's tokens once (not once per sample).
5) max_tokens is bounded by OPD_STUDENT_MAX_TOKENS and, with each prompt, by
   the model's length (422 naming the bound); a request that leaves it out
   gets the protocol's default of 128, or the bound where that is lower.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from opd.common import protocol as p
from opd.common.engine_watch import EngineDied
from opd.common.errors import Conflict, InvalidInput, InvalidRequest, OPDError, PayloadTooLarge
from opd.common.settings import StudentSettings
from opd.common.tokenizer import render_prompt
from opd.student import checkpoints
from opd.student.engine import RolloutEngine, Sample, Sampling
from opd.student.versions import VersionLock

log = logging.getLogger("opd.student")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BrokenPolicy(OPDError):
    """The serving weights gave a non-finite logprob: the version is broken, not the request (500)."""

    status_code = 500


def first_non_finite(samples_P: list[list[Sample]]) -> tuple[int, int, int, float] | None:
    """(prompt, sample, token, value) of the first logprob that is NaN or infinite, if any."""
    for i, group in enumerate(samples_P):
        for j, sample in enumerate(group):
            for k, value in enumerate(sample.logprobs):
                if not math.isfinite(value):
                    return i, j, k, value
    return None


class Throughput:
    """Generated tokens per second over the last `window` seconds."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, tokens: int) -> None:
        self.events.append((time.monotonic(), tokens))

    def rate(self) -> float:
        now = time.monotonic()
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()
        return sum(t for _, t in self.events) / self.window


class StudentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("opd_student_requests", "Requests to /rollouts by outcome", ["outcome"], registry=registry)
        self.rollouts = Counter("opd_student_rollouts", "Rollouts sampled", registry=registry)
        self.tokens = Counter("opd_student_generated_tokens", "Tokens generated", registry=registry)
        self.throughput = Throughput()
        Gauge(
            "opd_student_tokens_per_second", "Generated tokens per second over the last 30 s", registry=registry
        ).set_function(self.throughput.rate)
        self.latency = Histogram(
            "opd_student_rollout_latency_seconds", "Latency of /rollouts", registry=registry, buckets=LATENCY_BUCKETS
        )
        self.swaps = Counter("opd_student_swaps", "Weight swaps by kind and outcome", ["kind", "outcome"], registry=registry)
        self.swap_seconds = Histogram(
            "opd_student_swap_seconds", "Time to load a new policy version (after in-flight rollouts finished)",
            ["kind"], registry=registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.version = Gauge("opd_student_policy_version", "Policy version now serving", registry=registry)
        self.swaps_waiting = Gauge("opd_student_swaps_waiting", "Weight swaps waiting for the rollouts in flight",
                                   registry=registry)


class StudentService:
    def __init__(self, engine: RolloutEngine, settings: StudentSettings, metrics: StudentMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.root = Path(settings.checkpoint_root)
        self.base = checkpoints.BaseModel.from_folder(settings.model)
        self.lock = VersionLock()
        metrics.swaps_waiting.set_function(lambda: self.lock.writers_waiting)
        self.version = 0
        self.kind: str = "base"
        self.path: str | None = None

    def info(self) -> p.ServiceInfo:
        return p.ServiceInfo(
            service="student",
            model=self.engine.model_name,
            engine=self.engine.name,
            vocab_size=self.engine.vocab_size,
            tokenizer_fingerprint=self.engine.fingerprint,
            max_model_len=self.engine.max_model_len,
            policy_version=self.version,
            limits={
                "max_prompts": self.settings.max_prompts,
                "max_rollouts": self.settings.max_rollouts,
                "max_tokens": self.max_tokens,
                "max_lora_rank": self.settings.max_lora_rank if self.settings.enable_lora else 0,
                "lora_merged": int(self.settings.enable_lora and self.settings.merge_lora),
                "max_pending": self.settings.max_pending,
            },
        )

    @property
    def max_tokens(self) -> int:
        """The largest max_tokens any request may ask for: the limit, and one prompt token short of the model's length."""
        return max(1, min(self.settings.max_tokens, self.engine.max_model_len - 1))

    @property
    def default_max_tokens(self) -> int:
        """What a request that leaves max_tokens out gets: the protocol's default, within `max_tokens`."""
        return min(p.RolloutRequest.model_fields["max_tokens"].default, self.max_tokens)

    # ------------------------------------------------------------ rollouts
    def with_defaults(self, request: p.RolloutRequest) -> p.RolloutRequest:
        if "max_tokens" in request.model_fields_set:
            return request
        return request.model_copy(update={"max_tokens": self.default_max_tokens})

    def to_prompts(self, request: p.RolloutRequest) -> list[list[int]]:
        count, limit = len(request.prompts), self.settings.max_prompts
        if count > limit:
            raise PayloadTooLarge(f"{count} prompts in one request; the limit is {limit}: split the request")
        if count * request.n > self.settings.max_rollouts:
            raise PayloadTooLarge(
                f"{count} prompts x n={request.n} = {count * request.n} rollouts; the limit is "
                f"{self.settings.max_rollouts}: split the request or lower n"
            )
        if request.max_tokens > self.settings.max_tokens:
            raise InvalidInput(
                f"max_tokens {request.max_tokens} is over this student's limit of {self.settings.max_tokens} "
                "(OPD_STUDENT_MAX_TOKENS): lower it"
            )
        prompts = [render_prompt(self.engine.tokenizer, prompt) for prompt in request.prompts]
        for i, ids in enumerate(prompts):
            self._check_prompt(i, ids, request.max_tokens)
        return prompts

    def _check_prompt(self, i: int, ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise InvalidInput(f"prompts[{i}] renders to no tokens: give a non-empty prompt")
        bad = max(ids)
        if bad >= self.engine.vocab_size:
            raise InvalidInput(
                f"prompts[{i}] holds token id {bad}, outside the student's vocabulary of {self.engine.vocab_size} ids: "
                "were these ids made by another tokenizer? compare /info's tokenizer_fingerprint"
            )
        if len(ids) + max_tokens > self.engine.max_model_len:
            raise InvalidInput(
                f"prompts[{i}] has {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} is over "
                f"the student's maximum length of {self.engine.max_model_len}; shorten the prompt or lower max_tokens"
            )

    async def rollouts(self, request: p.RolloutRequest) -> p.RolloutResponse:
        request = self.with_defaults(request)
        try:
            prompts = self.to_prompts(request)
            if not self.engine.healthy():
                raise EngineDied("the student's engine died: the student is exiting so that its supervisor restarts it")
        except Exception:
            self.metrics.requests.labels("rejected").inc()
            raise
        began = time.perf_counter()
        try:
            async with self.lock.read():
                version = self.version
                samples = await self.engine.sample(prompts, Sampling.from_request(request))
        except asyncio.CancelledError:  # the client went away: the engine has stopped its work
            self.metrics.requests.labels("cancelled").inc()
            raise
        self._check_finite(samples, version)
        rollouts = [
            self._rollout(i, prompt, s) for i, (prompt, group) in enumerate(zip(prompts, samples, strict=True)) for s in group
        ]
        generated = sum(len(r.token_ids) for r in rollouts)
        self.metrics.requests.labels("ok").inc()
        self.metrics.rollouts.inc(len(rollouts))
        self.metrics.tokens.inc(generated)
        self.metrics.throughput.add(generated)
        self.metrics.latency.observe(time.perf_counter() - began)
        usage = p.Usage(sequences=len(rollouts), input_tokens=sum(map(len, prompts)), generated_tokens=generated)
        return p.RolloutResponse(model=self.engine.model_name, policy_version=version, rollouts=rollouts, usage=usage)

    def _check_finite(self, samples_P: list[list[Sample]], version: int) -> None:
        bad = first_non_finite(samples_P)
        if bad is None:
            return
        self.metrics.requests.labels("failed").inc()
        i, j, k, value = bad
        serving = f"{self.kind} checkpoint {self.path}" if self.path else "the base model"
        raise BrokenPolicy(
            f"policy version {version} ({serving}) gave logprob {value} to token {k} of prompts[{i}] sample {j}: "
            "the served weights are broken (non-finite logprobs); load another version (POST /weights) or restart"
        )

    @staticmethod
    def _rollout(index: int, prompt: list[int], sample: Sample) -> p.Rollout:
        return p.Rollout(
            prompt_index=index, prompt_token_ids=prompt, token_ids=sample.token_ids,
            logprobs=sample.logprobs, finish_reason=sample.finish_reason, text=sample.text,
        )

    # ------------------------------------------------------------- weights
    def _check_version(self, version: int) -> None:
        if version <= self.version:
            raise Conflict(f"version {version} is not newer than the serving version {self.version}: versions only move forward")

    def _checked_folder(self, request: p.WeightsRequest) -> Path:
        """The checkpoint's folder, after every check that can be made without loading it."""
        if request.kind == "lora" and not self.settings.enable_lora:
            raise InvalidRequest("this student runs without LoRA (OPD_STUDENT_ENABLE_LORA=false): send a full checkpoint")
        folder = checkpoints.resolve(self.root, request.path)
        if request.kind == "full":
            checkpoints.check_full(folder, self.root, self.base)
        else:
            checkpoints.check_lora(folder, self.root, self.base, self.settings.max_lora_rank,
                                   patterns=self.engine.lora_patterns)
        return folder

    def _serving(self, request: p.WeightsRequest) -> bool:
        return (request.version, request.kind, request.path) == (self.version, self.kind, self.path)

    def _already(self, request: p.WeightsRequest) -> p.WeightsResponse:
        log.info("policy version %d (%s %s) is already serving", self.version, self.kind, self.path)
        return p.WeightsResponse(policy_version=self.version, kind=request.kind, path=request.path, seconds=0.0)

    async def load_weights(self, request: p.WeightsRequest) -> p.WeightsResponse:
        if self._serving(request):
            return self._already(request)
        try:
            self._check_version(request.version)
            folder = self._checked_folder(request)
        except Exception:
            self.metrics.swaps.labels(request.kind, "rejected").inc()
            raise
        waited = time.perf_counter()
        async with self.lock.write():
            if self._serving(request):  # the same swap, sent again while the first one loaded
                return self._already(request)
            self._check_version(request.version)
            began = time.perf_counter()
            await self._load(request, folder)
            seconds = time.perf_counter() - began
            self.version, self.kind, self.path = request.version, request.kind, request.path
        self.metrics.swaps.labels(request.kind, "ok").inc()
        self.metrics.swap_seconds.labels(request.kind).observe(seconds)
        self.metrics.version.set(self.version)
        log.info("policy version %d (%s %s) loaded in %.3fs after %.3fs waiting for rollouts",
                 self.version, self.kind, self.path, seconds, began - waited)
        return p.WeightsResponse(policy_version=self.version, kind=request.kind, path=request.path, seconds=seconds)

    async def _load(self, request: p.WeightsRequest, folder: Path) -> None:
        try:
            if request.kind == "full":
                await self.engine.load_full(folder)
            else:
                await self.engine.load_lora(folder, request.version)
        except OPDError:
            self.metrics.swaps.labels(request.kind, "failed").inc()
            raise
        except Exception as exc:
            self.metrics.swaps.labels(request.kind, "failed").inc()
            if self.engine.healthy():
                raise InvalidInput(
                    f"loading {request.path!r} failed ({type(exc).__name__}: {exc}); version {self.version} keeps serving"
                ) from exc
            raise EngineDied(f"the student's engine died while loading {request.path!r} ({type(exc).__name__}: {exc}): "
                             "the student is exiting so that its supervisor restarts it") from exc
