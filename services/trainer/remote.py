"""The trainer's view of the teacher and student services: calls that wait.

Choices:
1) The clients retry connection errors, timeouts and 502/503/504 with
   backoff; on top of that, a call that still fails with such an error (or
   any 5xx) WAITS: it logs that it is waiting, sleeps with backoff and tries
   again, up to `services.max_wait_s` in all, then raises `ServiceDown`. A
   4xx is a bug in the request and fails at once.
2) The caller keeps whatever it already has (a step's rollouts) and repeats
   only the call that failed, so nothing is resampled, skipped or counted twice.
3) At start every teacher replica and the student are asked for `/info`;
   their tokenizer fingerprints, and the trainable student's own, must agree.
   A stock vLLM or SGLang teacher (`teacher_protocol` openai or sglang) has
   no fingerprint: it must tokenize a probe text exactly as the student does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from services.common import protocol as p
from services.common.client import StudentClient
from services.common.compat_client import teacher_client
from services.common.errors import OPDError, ServiceError, TokenizerMismatch
from services.trainer.config import RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("opd.trainer")
T = TypeVar("T")
# Words, digits, punctuation, whitespace runs and non-Latin scripts: tokenizers that differ split it differently.
PROBE = "opd probe: The quick brown fox, 1234567890 times!\n\tÜber café naïve 東京 Москва 🙂 <think> end."


class ServiceDown(OPDError):
    """A service stayed unreachable (or answered 5xx) for longer than the run may wait."""

    status_code = 503


class RunStopped(OPDError):
    """The run was asked to stop while it waited."""

    status_code = 409


class Remote:
    def __init__(self, config: RunConfig, stop: threading.Event | None = None) -> None:
        s = config.services
        kwargs = dict(api_key=config.api_key, timeout=s.request_timeout_s, retries=s.retries, max_backoff=s.max_backoff_s)
        self.config = config
        # A scaled compose service resolves to one address per replica: spread over all.
        protocol = config.teacher_protocol
        self.teacher = teacher_client(protocol, list(config.teacher_urls), expand_dns=True, **kwargs)
        self.student = StudentClient(config.student_url, **kwargs)
        self.replicas = [teacher_client(protocol, url, **kwargs) for url in config.teacher_urls]
        self.stop = stop or threading.Event()
        self.waited_s = 0.0

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), waiting through outages of up to max_wait_s; `what` names the call in logs and errors."""
        began = time.monotonic()
        delay = 1.0
        while True:
            try:
                return fn()
            except ServiceError as exc:
                if exc.status_code < 500:
                    raise
                waited = time.monotonic() - began
                limit = self.config.services.max_wait_s
                if waited >= limit:
                    raise ServiceDown(
                        f"{what}: gave up after waiting {waited:.0f}s (services.max_wait_s={limit:.0f}); last error: {exc}. "
                        "Start the service again and resume the run (it continues from its last checkpoint)"
                    ) from exc
                log.warning("%s: service unavailable (%s); waiting (%.0fs of %.0fs)", what, exc.message[:200], waited, limit)
                pause = min(delay, max(0.1, limit - waited))
                if self.stop.wait(pause):
                    raise RunStopped(f"{what}: the run was stopped while waiting for the service") from exc
                self.waited_s += pause
                delay = min(delay * 2, self.config.services.max_backoff_s)

    # ------------------------------------------------------------ the calls
    def rollouts(self, request: p.RolloutRequest) -> p.RolloutResponse:
        return self.call("student /rollouts", lambda: self.student.rollouts(request))

    def score(self, sequences: list[p.ScoreSequence]) -> p.LogprobsResponse:
        return self.call(f"teacher ({self.config.teacher_protocol})", lambda: self.teacher.logprobs(sequences))

    def load_weights(self, request: p.WeightsRequest) -> p.WeightsResponse:
        try:
            return self.call("student /weights", lambda: self.student.load_weights(request))
        except ServiceError as exc:
            if exc.status_code in (400, 404, 422):
                raise ServiceError(
                    exc.status_code,
                    f"{exc.message} (the trainer wrote {request.path} under checkpoint_root={self.config.checkpoint_root}: "
                    "is that the student service's --checkpoint-root?)",
                ) from exc
            raise

    def student_info(self) -> p.ServiceInfo:
        return self.call("student /info", self.student.info)

    def check_tokenizers(self, tokenizer: PreTrainedTokenizerBase) -> tuple[list[p.ServiceInfo], p.ServiceInfo]:
        """Every teacher replica, the student service and the trainable student (`tokenizer`) share one tokenizer."""
        from services.common.tokenizer import tokenizer_fingerprint

        student = self.student_info()
        teachers = []
        for url, client in zip(self.config.teacher_urls, self.replicas, strict=True):
            info = self.call(f"teacher {url} info", client.info)
            teachers.append(info)
            if self.config.teacher_protocol != "opd":
                self.check_probe(url, client, tokenizer)
            elif info.tokenizer_fingerprint != student.tokenizer_fingerprint:
                raise TokenizerMismatch(
                    f"the teacher {info.model} (at {url}, tokenizer {info.tokenizer_fingerprint}) and the student "
                    f"{student.model} (at {self.config.student_url}, tokenizer {student.tokenizer_fingerprint}) use "
                    "different tokenizers, so the teacher cannot score the student's token ids: distill between "
                    "models that share a tokenizer (compare GET /info tokenizer_fingerprint)"
                )
        trainer_fingerprint = tokenizer_fingerprint(tokenizer)
        if trainer_fingerprint != student.tokenizer_fingerprint:
            raise TokenizerMismatch(
                f"the trainer's student {self.config.student.model} (tokenizer {trainer_fingerprint}) and the student "
                f"service's {student.model} (tokenizer {student.tokenizer_fingerprint}) differ: set student.model to "
                "the model the student service serves"
            )
        return teachers, student

    def check_probe(self, url: str, client, tokenizer: PreTrainedTokenizerBase) -> None:
        """A stock server has no tokenizer fingerprint: it must tokenize PROBE as the student does."""
        theirs = self.call(f"teacher {url} tokenize", lambda: client.tokenize(PROBE))
        ours = list(tokenizer.encode(PROBE, add_special_tokens=True))
        if theirs != ours:
            raise TokenizerMismatch(
                f"the teacher at {url} ({self.config.teacher_protocol} protocol) tokenizes a probe text into "
                f"{len(theirs)} tokens {theirs[:8]}..., the student {self.config.student.model} into {len(ours)} "
                f"{ours[:8]}...: the teacher cannot score the student's token ids; distill between models that "
                "share a tokenizer"
            )
