"""The trainer's view of the teacher and student services: calls that wait.

Choices:
1) The clients retry connection errors, timeouts and 502/503/504 with
   backoff; on top of that, a call that still fails with such an error (or
   another 5xx but 500) WAITS: it logs that it is waiting (the run's status
   says which call: `waiting_for`), sleeps with backoff and tries again, up
   to `services.max_wait_s` in all, then raises `ServiceDown`. A 4xx is a
   bug in the request and fails at once; so does a 500, a service that is up
   and says it failed (a student whose weights give non-finite logprobs, an
   engine that died loading a version), which waiting does not mend.
2) The caller keeps whatever it already has (a step's rollouts) and repeats
   only the call that failed, so nothing is resampled, skipped or counted twice.
3) At start every teacher replica and every student replica are asked for
   `/info`; the student replicas' tokenizer fingerprints and the trainable
   student's must agree, and so must a teacher's replicas among themselves.
   A teacher whose fingerprint is the student's scores the student's token
   ids (`alignment` "ids"); any other is aligned on bytes ("bytes",
   alignment.py, rollouts.py choice 6), with its tokenizer loaded from
   `teacher_tokenizer` (`teachers.<name>.tokenizer`) or the model its /info
   names, and checked against its fingerprint. A stock vLLM or SGLang
   teacher (`teacher_protocol` openai or sglang) has no fingerprint: it
   tokenizes a probe text exactly as the student does ("ids"), or as the
   tokenizer the run names for it ("bytes").
4) The same `/info` answers give the limits: scoring requests are cut to the
   smallest `max_sequences` and `max_request_tokens` over the teacher
   replicas (`ScoreLimits`), and a run whose requests a student replica
   would refuse (its share of `prompts_per_step` or of the held-out prompts,
   `max_tokens`) is refused at start, naming the setting, instead of failing
   at its first step.
5) Student replicas (`student_urls`; a compose service's name that resolves
   to several addresses counts as one replica per address): a rollout
   request's prompts are split across them in contiguous blocks, as even as
   possible, each block seeded `seed + first*n` (the engines seed rollout j
   of prompt i `seed + i*n + j`), so the replicas sample what one student
   would. The replicas are called at once, one thread each, and each call
   waits out its own replica's outage: what the others returned is kept.
   Weights go to every replica the same way. A lone student is "the
   student" in messages; a replica is named by its URL.
6) Several teachers (`teachers`): each is a `Teacher` with its own clients
   (its protocol, its API key), its own replicas' limits and its own name in
   messages (`teacher math (opd)`; a lone teacher stays `teacher (opd)`).
   Scoring calls to different teachers run at once (rollouts.py), each
   waiting out its own teacher's outage. Every replica of every teacher is
   checked against the student's tokenizer.
7) A teacher prompt the teacher renders (text or messages: context.py) is
   measured by that teacher's `POST /render` (rollouts.py choice 4): each
   distinct prompt once, in requests of at most its `max_sequences`; the
   lengths are kept per teacher (`RenderedLengths`, keyed by a digest of the
   prompt's JSON, the latest 100,000), so rows seen again in later epochs
   cost no request. Replicas are assumed to share the chat template.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from opd.common import protocol as p
from opd.common.client import StudentClient, replica_urls
from opd.common.compat_client import teacher_client
from opd.common.errors import OPDError, ServiceError, TokenizerMismatch
from opd.trainer.config import ConfigError, RunConfig, TeacherConfig
from opd.trainer.data import PromptRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("opd.trainer")
T = TypeVar("T")
# Words, digits, punctuation, whitespace runs and non-Latin scripts: tokenizers that differ split it differently.
PROBE = "opd probe: The quick brown fox, 1234567890 times!\n\tÜber café naïve 東京 Москва 🙂 <think> end."


@dataclass(frozen=True)
class ScoreLimits:
    """What one teacher /logprobs request may hold; the defaults stand for a teacher that does not say."""

    max_sequences: int = 128
    max_request_tokens: int = 262_144
    max_sequence_len: int | None = None  # the longest sequence it scores; None: unknown

    @classmethod
    def of(cls, teachers: list[p.ServiceInfo]) -> ScoreLimits:
        """The smallest limits over the replicas: any of them may get any request."""
        least = lambda key, default: min(t.limits.get(key, default) for t in teachers)  # noqa: E731
        # A stock SGLang teacher says no length (max_model_len 0): unknown, nothing is cut.
        lengths = [t.limits.get("max_sequence_len") or t.max_model_len for t in teachers]
        return cls(
            max_sequences=least("max_sequences", cls.max_sequences),
            max_request_tokens=least("max_request_tokens", cls.max_request_tokens),
            max_sequence_len=min((n for n in lengths if n), default=None),
        )


class RenderedLengths:
    """How many ids each prompt renders to under one teacher (7): the latest `size` prompts, by a digest of their JSON."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._lengths: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(prompt: p.Prompt) -> bytes:
        return hashlib.blake2b(prompt.model_dump_json(exclude_none=True).encode(), digest_size=16).digest()

    def get(self, key: bytes) -> int | None:
        with self._lock:
            n = self._lengths.get(key)
            if n is not None:
                self._lengths.move_to_end(key)
            return n

    def put(self, key: bytes, n: int) -> None:
        with self._lock:
            self._lengths[key] = n
            self._lengths.move_to_end(key)
            while len(self._lengths) > self.size:
                self._lengths.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lengths)


@dataclass
class Teacher:
    """One named teacher: a client over its replicas (round robin), a client per replica, and its limits."""

    name: str
    protocol: str
    urls: tuple[str, ...]
    client: Any
    replicas: list[Any]
    what: str  # the teacher in messages and `waiting_for`
    limits: ScoreLimits = field(default_factory=ScoreLimits)
    rendered: RenderedLengths = field(default_factory=RenderedLengths)
    tokenizer_name: str | None = None  # teacher_tokenizer: where its own tokenizer is, when it is not the student's
    alignment: str = "ids"  # "ids": it scores the student's token ids; "bytes": its own, aligned (choice 3)
    tokenizer: Any = None  # with "bytes": its tokenizer, the bytes of each of its ids, and the reverse
    table: Any = None
    by_bytes: dict[bytes, int] = field(default_factory=dict)
    to_student: list[int] = field(default_factory=list)  # each of its ids -> the student's, -1: none (aligned.py 4)


@dataclass(frozen=True)
class Share:
    """One student replica's part of a rollout request: its answer, whose prompt_index counts from `first`."""

    url: str
    first: int  # the index of its first prompt in the whole request
    response: p.RolloutResponse


def blocks(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous blocks of range(count), as even as possible (the first ones larger)."""
    size, extra = divmod(count, parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return list(itertools.pairwise(starts))


class ServiceDown(OPDError):
    """A service stayed unreachable (or answered 5xx) for longer than the run may wait."""

    status_code = 503


class RunStopped(OPDError):
    """The run was asked to stop while it waited."""

    status_code = 409


class Remote:
    def __init__(self, config: RunConfig, stop: threading.Event | None = None) -> None:
        s = config.services
        self.stop = stop or threading.Event()
        kwargs = dict(api_key=config.api_key, timeout=s.request_timeout_s, retries=s.retries, max_backoff=s.max_backoff_s,
                      cancel=self.stop)  # a stop request ends the clients' retry pauses too
        self.config = config
        named = config.teachers is not None
        self.teachers = {name: self._teacher(name, t, named, kwargs) for name, t in config.teacher_set.items()}
        self.default_teacher = config.default_teacher_name
        self.student_urls = [u for url in config.student_replicas for u in replica_urls(url.rstrip("/"))]
        self.students = [StudentClient(url, **kwargs) for url in self.student_urls]
        self.student = self.students[0]
        self.student_table: Any = None  # with a teacher of another tokenizer (choice 3): the student's token bytes
        self.student_eot: set[int] = set()
        self.alignment: dict[str, str] | None = None  # each teacher's, once check_tokenizers has run
        # objective sft: the teacher's model served by a student service, sampling the teacher's completions.
        self.teacher_sampler = StudentClient(config.teacher_sampler_url, **kwargs) if config.teacher_sampler_url else None
        self.waited_s = 0.0  # time during which some call paused for an outage (replicas' pauses at once count once)
        self._lock = threading.Lock()
        self._waiting: dict[object, str] = {}  # call -> what it waits for; replicas' calls wait at once
        self._pausing, self._pauses_began = 0, 0.0

    def close(self) -> None:
        """Closes every client's connections; a client used afterwards opens new ones."""
        clients = [*self.students, *([self.teacher_sampler] if self.teacher_sampler else [])]
        for t in self.teachers.values():
            clients += [t.client, *t.replicas]
        for client in clients:
            client.close()

    @staticmethod
    def _teacher(name: str, config: TeacherConfig, named: bool, kwargs: dict[str, Any]) -> Teacher:
        kwargs = {**kwargs, "api_key": config.api_key or kwargs["api_key"]}
        # A scaled compose service resolves to one address per replica: spread over all.
        client = teacher_client(config.protocol, list(config.urls), expand_dns=True, **kwargs)
        replicas = [teacher_client(config.protocol, url, **kwargs) for url in config.urls]
        what = f"teacher {name} ({config.protocol})" if named else f"teacher ({config.protocol})"
        return Teacher(name, config.protocol, config.urls, client, replicas, what, tokenizer_name=config.tokenizer)

    @property
    def teacher(self) -> Any:
        """The default teacher's client (round robin over its replicas)."""
        return self.teachers[self.default_teacher].client

    @property
    def replicas(self) -> list[Any]:
        """A client per replica of the default teacher."""
        return self.teachers[self.default_teacher].replicas

    @property
    def teacher_bytes(self) -> int:
        """Bytes of the teachers' response bodies read so far (scores, top-k, renders): the wire cost of scoring."""
        return sum(t.client.received_bytes for t in self.teachers.values())

    @property
    def score_limits(self) -> ScoreLimits:
        return self.teachers[self.default_teacher].limits

    @property
    def waiting_for(self) -> str | None:
        """The calls now waiting out an outage (reported in the run's status), or None."""
        with self._lock:
            return "; ".join(self._waiting.values()) or None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), waiting through outages of up to max_wait_s; `what` names the call in logs and errors."""
        key = object()
        try:
            return self._wait_out(what, fn, key)
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def _wait_out(self, what: str, fn: Callable[[], T], key: object) -> T:
        began = time.monotonic()
        delay = 1.0
        while True:
            try:
                return fn()
            except ServiceError as exc:
                if exc.status_code <= 500:
                    raise
                waited = time.monotonic() - began
                limit = self.config.services.max_wait_s
                if waited >= limit:
                    raise ServiceDown(
                        f"{what}: gave up after waiting {waited:.0f}s (services.max_wait_s={limit:.0f}); last error: {exc}. "
                        "Start the service again and resume the run (it continues from its last checkpoint)"
                    ) from exc
                log.warning("%s: service unavailable (%s); waiting (%.0fs of %.0fs)", what, exc.message[:200], waited, limit)
                with self._lock:
                    self._waiting[key] = what
                if self._pause(min(delay, max(0.1, limit - waited))):
                    raise RunStopped(f"{what}: the run was stopped while waiting for the service") from exc
                delay = min(delay * 2, self.config.services.max_backoff_s)

    def _pause(self, seconds: float) -> bool:
        """Sleeps unless the run is stopped (then True); counts the time in waited_s once, however many pause."""
        with self._lock:
            if not self._pausing:
                self._pauses_began = time.monotonic()
            self._pausing += 1
        try:
            return self.stop.wait(seconds)
        finally:
            with self._lock:
                self._pausing -= 1
                if not self._pausing:
                    self.waited_s += time.monotonic() - self._pauses_began

    def each(self, calls: list[Callable[[], T]]) -> list[T]:
        """Every call at once, one thread each (a single one in this thread); their results in order.
        All run to their end before the first error, if any, is raised."""
        if len(calls) == 1:
            return [calls[0]()]
        with ThreadPoolExecutor(len(calls), thread_name_prefix="opd-replica") as pool:
            futures = [pool.submit(fn) for fn in calls]
        return [f.result() for f in futures]

    def student_name(self, url: str) -> str:
        return "student" if len(self.students) == 1 else f"student at {url}"

    # ------------------------------------------------------------ the calls
    def rollouts(self, request: p.RolloutRequest) -> list[Share]:
        """The request's prompts split across the student replicas (5), sampled at once; a replica with no
        prompt (fewer prompts than replicas) is not asked."""
        parts = []
        for (first, end), url, client in zip(blocks(len(request.prompts), len(self.students)), self.student_urls,
                                             self.students, strict=True):
            if end > first:
                seed = None if request.seed is None else request.seed + first * request.n
                part = request.model_copy(update={"prompts": request.prompts[first:end], "seed": seed})
                parts.append((url, first, client, part))

        def ask(url: str, first: int, client: StudentClient, part: p.RolloutRequest) -> Callable[[], Share]:
            return lambda: Share(url, first, self.call(f"{self.student_name(url)} /rollouts", lambda: client.rollouts(part)))

        return self.each([ask(*part) for part in parts])

    def teacher_rollouts(self, request: p.RolloutRequest) -> p.RolloutResponse:
        assert self.teacher_sampler is not None, "objective sft needs teacher_sampler_url"
        sampler = self.teacher_sampler
        return self.call("teacher sampler /rollouts", lambda: sampler.rollouts(request))

    def score(self, sequences: list[p.ScoreSequence], teacher: str | None = None, top_k: int = 0) -> p.LogprobsResponse:
        """The teacher's (default: the default teacher's) scores of the sequences, waiting out its outages; with
        `top_k`, also its top-k at every scored token."""
        t = self.teachers[teacher or self.default_teacher]
        if top_k:
            return self.call(t.what, lambda: t.client.logprobs(sequences, top_k=top_k))
        return self.call(t.what, lambda: t.client.logprobs(sequences))

    def prompt_lengths(self, prompts: list[p.Prompt], teacher: str | None = None) -> list[int]:
        """How many ids each prompt renders to under the teacher (7): the cached lengths, the others from its
        /render, each distinct prompt once."""
        t = self.teachers[teacher or self.default_teacher]
        keys = [t.rendered.key(x) for x in prompts]
        found = {k: n for k in set(keys) if (n := t.rendered.get(k)) is not None}
        todo = list({k: x for k, x in zip(keys, prompts) if k not in found}.items())
        if todo and t.protocol != "opd":
            raise ConfigError(f"{t.what}: a stock server scores token ids only, it cannot render a teacher prompt")
        size = t.limits.max_sequences
        for part in (todo[i:i + size] for i in range(0, len(todo), size)):
            answer = self.call(f"{t.what} /render", lambda part=part: self._render(t, [x for _, x in part]))
            for (k, _), ids in zip(part, answer.token_ids, strict=True):
                found[k] = len(ids)
                t.rendered.put(k, len(ids))
        return [found[k] for k in keys]

    def _render(self, t: Teacher, prompts: list[p.Prompt]) -> p.RenderResponse:
        try:
            return t.client.render(prompts)
        except ServiceError as exc:
            if exc.status_code == 404:  # an opd teacher older than /render
                raise ServiceError(404, f"{t.what} has no POST /render ({exc}): serve the teacher with this "
                                        "version of opd, which measures teacher prompts with it") from exc
            raise

    def load_weights(self, request: p.WeightsRequest) -> list[p.WeightsResponse]:
        """Every student replica loads the version, at once; their answers in the order of student_urls."""
        return self.each([self._loader(url, client, request) for url, client in zip(self.student_urls, self.students)])

    def _loader(self, url: str, client: StudentClient, request: p.WeightsRequest) -> Callable[[], p.WeightsResponse]:
        def load() -> p.WeightsResponse:
            try:
                return self.call(f"{self.student_name(url)} /weights", lambda: client.load_weights(request))
            except ServiceError as exc:
                if exc.status_code in (400, 404, 422):
                    raise ServiceError(
                        exc.status_code,
                        f"{exc.message} (the trainer wrote {request.path} under checkpoint_root="
                        f"{self.config.checkpoint_root}: is that the --checkpoint-root of the student at {url}?)",
                    ) from exc
                raise

        return load

    def student_infos(self) -> list[p.ServiceInfo]:
        """Every student replica's /info, in the order of student_urls."""
        return self.each([lambda url=url, client=client: self.call(f"{self.student_name(url)} /info", client.info)
                          for url, client in zip(self.student_urls, self.students)])

    def check_tokenizers(
        self, tokenizer: PreTrainedTokenizerBase,
    ) -> tuple[dict[str, list[p.ServiceInfo]], list[p.ServiceInfo]]:
        """Every replica of every teacher, every student replica and the trainable student (`tokenizer`) share one
        tokenizer. Returns each teacher's replicas' /info (by teacher name) and the student replicas' /info."""
        from opd.common.tokenizer import tokenizer_fingerprint

        students = self.student_infos()
        student = students[0]
        for url, info in zip(self.student_urls[1:], students[1:]):
            if info.tokenizer_fingerprint != student.tokenizer_fingerprint:
                raise TokenizerMismatch(
                    f"the student replica at {url} serves {info.model} (tokenizer {info.tokenizer_fingerprint}), the "
                    f"one at {self.student_urls[0]} {student.model} (tokenizer {student.tokenizer_fingerprint}): every "
                    "student replica must serve the same model (compare GET /info tokenizer_fingerprint)"
                )
        teachers = {name: self.check_teacher(t, student, tokenizer) for name, t in self.teachers.items()}
        self.alignment = {name: t.alignment for name, t in self.teachers.items()}
        if any(t.alignment == "bytes" for t in self.teachers.values()):
            from opd.trainer.aligned import student_ids
            from opd.trainer.alignment import byte_table

            self.student_table = byte_table(tokenizer)
            self.student_eot = {tokenizer.eos_token_id} - {None}
            for t in self.teachers.values():
                if t.alignment == "bytes":  # its top-k in student ids, for a top-k loss
                    t.to_student = student_ids(t, tokenizer, self.student_table)
        if self.teacher_sampler is not None:
            sampler = self.call("teacher sampler /info", self.teacher_sampler.info)
            if sampler.tokenizer_fingerprint != student.tokenizer_fingerprint:
                raise TokenizerMismatch(
                    f"the teacher sampler {sampler.model} (at {self.config.teacher_sampler_url}) and the student "
                    f"{student.model} use different tokenizers: the student cannot train on the sampler's token ids"
                )
        trainer_fingerprint = tokenizer_fingerprint(tokenizer)
        if trainer_fingerprint != student.tokenizer_fingerprint:
            raise TokenizerMismatch(
                f"the trainer's student {self.config.student.model} (tokenizer {trainer_fingerprint}) and the student "
                f"service's {student.model} (tokenizer {student.tokenizer_fingerprint}) differ: set student.model to "
                "the model the student service serves"
            )
        return teachers, students

    def check_teacher(self, t: Teacher, student: p.ServiceInfo, tokenizer: PreTrainedTokenizerBase) -> list[p.ServiceInfo]:
        """Each replica of one teacher: one tokenizer among them, the student's or one the trainer can load (3);
        sets the teacher's `alignment`. Their /info."""
        infos: list[p.ServiceInfo] = []
        named = f"teacher {t.name}" if self.config.teachers is not None else "teacher"
        for url, client in zip(t.urls, t.replicas, strict=True):
            info = self.call(f"{named} {url} /info", client.info)
            if t.protocol != "opd":
                if t.tokenizer_name is None:
                    self.check_probe(url, client, tokenizer, t)
                else:
                    self.check_probe(url, client, self.teacher_tokenizer(t, named, None), t)
            elif infos and info.tokenizer_fingerprint != infos[0].tokenizer_fingerprint:
                raise TokenizerMismatch(
                    f"the {named} replica at {url} serves {info.model} (tokenizer {info.tokenizer_fingerprint}), "
                    f"another tokenizer than the replica listed before it ({infos[0].model}, tokenizer "
                    f"{infos[0].tokenizer_fingerprint}; the student {student.model} has {student.tokenizer_fingerprint}): "
                    "every replica of a teacher must serve the same model (compare GET /info tokenizer_fingerprint)"
                )
            infos.append(info)
        if t.protocol == "opd" and infos[0].tokenizer_fingerprint != student.tokenizer_fingerprint:
            self.teacher_tokenizer(t, named, infos[0])
        elif t.protocol != "opd" and t.tokenizer_name is not None:
            self.teacher_tokenizer(t, named, None)
        log.info("%s scores %s", named, "the student's token ids" if t.alignment == "ids" else
                 f"its own tokenization, aligned on bytes ({t.tokenizer.name_or_path})")
        return infos

    def teacher_tokenizer(self, t: Teacher, named: str, info: p.ServiceInfo | None) -> PreTrainedTokenizerBase:
        """The teacher's own tokenizer (3): loaded once, checked against its fingerprint; the teacher is aligned on bytes."""
        from opd.common.tokenizer import load_tokenizer, tokenizer_fingerprint
        from opd.trainer.alignment import byte_table

        if t.tokenizer is not None:
            return t.tokenizer
        where = t.tokenizer_name or (info.model if info is not None else None)
        field = "teacher_tokenizer" if self.config.teachers is None else f"teachers.{t.name}.tokenizer"
        try:
            tok = load_tokenizer(where)
        except Exception as exc:
            raise TokenizerMismatch(
                f"the {named} {info.model if info else ''} uses another tokenizer than the student "
                f"{self.config.student.model}, and the trainer cannot load it from {where!r} ({type(exc).__name__}: "
                f"{exc}): set {field} to a folder or hub id of the teacher's tokenizer") from exc
        if info is not None and tokenizer_fingerprint(tok) != info.tokenizer_fingerprint:
            raise TokenizerMismatch(
                f"the tokenizer at {where!r} (fingerprint {tokenizer_fingerprint(tok)}) is not the one the {named} "
                f"{info.model} serves ({info.tokenizer_fingerprint}): set {field} to the teacher's own tokenizer")
        try:
            table = byte_table(tok)
        except ValueError as exc:
            raise TokenizerMismatch(f"the {named}'s tokenizer at {where!r} cannot be aligned on bytes: {exc}") from exc
        from opd.trainer.aligned import token_ids_by_bytes

        t.tokenizer, t.table, t.alignment, t.by_bytes = tok, table, "bytes", token_ids_by_bytes(tok, table)
        return tok

    def check_probe(self, url: str, client, tokenizer: PreTrainedTokenizerBase, t: Teacher | None = None) -> None:
        """A stock server has no tokenizer fingerprint: it must tokenize PROBE as the student does."""
        t = t or self.teachers[self.default_teacher]
        named = f"teacher {t.name}" if self.config.teachers is not None else "teacher"
        theirs = self.call(f"{named} {url} tokenize", lambda: client.tokenize(PROBE))
        ours = list(tokenizer.encode(PROBE, add_special_tokens=True))
        if theirs != ours:
            raise TokenizerMismatch(
                f"the {named} at {url} ({t.protocol} protocol) tokenizes a probe text into "
                f"{len(theirs)} tokens {theirs[:8]}..., the student {self.config.student.model} into {len(ours)} "
                f"{ours[:8]}...: the teacher cannot score the student's token ids; name the teacher's own tokenizer "
                "(teacher_tokenizer, or teachers.<name>.tokenizer) and the trainer aligns the two on bytes"
            )

    def check_stock_teacher(self, rows: list[PromptRow]) -> None:
        """A stock server is sent token ids only: it cannot render a privileged-context prompt (teacher_prompt)."""
        for name, t in self.teachers.items():
            if t.protocol == "opd" or not any(row.teacher is not None and row.teacher_name == name for row in rows):
                continue
            if t.alignment == "bytes":  # the trainer renders its prompts with the teacher's own tokenizer
                continue
            if self.config.teachers is None:
                raise ConfigError(
                    f"teacher_protocol {t.protocol}: a stock server scores token ids only, so it cannot "
                    "render the teacher's own prompt (teacher_prompt, or rows with teacher context or teacher messages): "
                    "serve the teacher with opd's teacher service (teacher_protocol opd), or drop the teacher prompt"
                )
            raise ConfigError(
                f"teachers.{name}.protocol {t.protocol}: a stock server scores token ids only, so it cannot render the "
                f"teacher's own prompt (teachers.{name}.teacher_prompt, or its rows' teacher context or teacher "
                f"messages): serve teacher {name} with opd's teacher service (protocol opd), or drop its teacher prompt"
            )

    def check_limits(self, teachers: dict[str, list[p.ServiceInfo]] | list[p.ServiceInfo], students: list[p.ServiceInfo],
                     eval_prompts: int) -> None:
        """Takes each teacher's scoring limits (a list: the default teacher's replicas); refuses a run whose rollout
        requests a student replica would refuse: each gets at most its share of a request's prompts (the first
        block, the largest), against the smallest limits over the replicas."""
        by_name = teachers if isinstance(teachers, dict) else {self.default_teacher: teachers}
        for name, infos in by_name.items():
            self.teachers[name].limits = ScoreLimits.of(infos)
        c = self.config
        least = lambda key: min((s.limits[key] for s in students if key in s.limits), default=None)  # noqa: E731
        max_prompts, max_rollouts = least("max_prompts"), least("max_rollouts")
        max_model_len = min(s.max_model_len for s in students)
        share = lambda prompts: blocks(prompts, len(students))[0][1]  # noqa: E731
        requests = [("sampling.prompts_per_step", c.sampling.prompts_per_step, c.sampling.samples_per_prompt,
                     c.sampling.max_tokens, "sampling.max_tokens")]
        if c.eval.every > 0:
            requests.append(("the held-out prompts (dataset.eval_size, eval_path)", eval_prompts,
                             c.eval.samples_per_prompt, c.eval_max_tokens, "eval.max_tokens"))
        problems = []
        for field, total, n, max_tokens, tokens_field in requests:
            prompts = share(total)
            held = f"{prompts} prompts" + (f" (of {total}, split over {len(students)} replicas)" if prompts < total else "")
            if max_prompts is not None and prompts > max_prompts:
                problems.append(f"{field}: {held} in one rollout request; "
                                f"the student takes at most {max_prompts} (max_prompts)")
            if max_rollouts is not None and prompts * n > max_rollouts:
                problems.append(f"{field}: {held} x {n} samples = {prompts * n} rollouts in one request; "
                                f"the student takes at most {max_rollouts} (max_rollouts)")
            if max_tokens >= max_model_len:
                problems.append(f"{tokens_field}: {max_tokens} tokens leave no room for a prompt under the student's "
                                f"maximum length of {max_model_len}")
        if problems:
            raise ConfigError(
                f"the student at {', '.join(self.student_urls)} would refuse this run's requests: {'; '.join(problems)}. "
                "Lower these settings, or raise the student's limits (OPD_STUDENT_MAX_PROMPTS, OPD_STUDENT_MAX_ROLLOUTS)"
            )
