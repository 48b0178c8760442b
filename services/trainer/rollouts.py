"""Samples from the student service, scored by the teacher service.

    samples = sample(remote, prompts_P, n=4, max_tokens=64, temperature=1.0, top_p=1.0, seed=7, version=3)
    score(remote, samples)            # fills teacher_logprobs_T in place

Choices:
1) The teacher scores exactly the student's completion token ids, never
   re-rendered text: after the student's own prompt ids, or after the
   teacher's own prompt when the run gives it a privileged context (context.py).
2) Rollouts must come from the policy version the trainer last loaded; a
   student (any replica) that answers with another version (it restarted, or
   someone else loaded weights) raises `StaleRollouts`, and the caller
   reloads and samples again: off-policy samples are never trained on.
   With student replicas each samples its block of the prompts (remote.py);
   the samples come back in prompt order, indexed over the whole request.
3) Each sample is scored by its row's teacher (`Sample.teacher`); the
   teachers are asked at once, one thread each, and each teacher's requests
   are cut to its own advertised limits (sequences and tokens per request),
   in order. A teacher's outage holds only its own samples: what another
   teacher scored is kept, and never scored again.
4) A sample longer than the teacher scores (`max_sequence_len`: a vLLM
   teacher takes at most max_model_len - 1 tokens, and a student completion
   that stops at `length` may fill max_model_len) loses its last tokens
   before scoring: the tokens kept are still on-policy samples. The count is
   reported as `trimmed_tokens`. Lengths, for this and for cutting requests,
   are what the teacher scores: its own prompt + the completion. A prompt
   the teacher renders (a privileged context) is measured by that teacher's
   /render before its samples are cut (remote.py choice 7); without a
   teacher prompt, the student's prompt ids are the teacher's and no
   /render is asked.
5) Two teacher KLs: `teacher_kl`, the mean over the sampled tokens, and
   `teacher_kl_per_completion`, the mean over completions of each one's sum
   over its tokens: the KL of a whole reply, which the objective minimises.
   When replies shrink the first can rise while the second falls; the ratio
   of the two is `mean_length`.
6) A teacher of another tokenizer (remote.py choice 3, `alignment` bytes)
   scores its own ids for the completion's bytes after its own rendering of
   the prompt; its logprobs of the chunks both tokenizations share are
   credited to the student's tokens (aligned.py, alignment.py), so the rest
   of the trainer sees one teacher value per sampled token, as on ids.
7) With `top_k` (the run's `loss.distill` is a top-k loss; training steps
   only, not evaluations) the teacher also returns its top-k at every
   completion token, kept as `teacher_topk_ids` / `teacher_topk_logprobs`;
   a row of another length or with repeated ids raises `ScoreMismatch`.
   Without it the request is exactly what it always was. A teacher of
   another tokenizer returns a row per id it scored, in its own ids: they
   are kept in the student's ids, one row per student token, -1 for an
   entry with no student counterpart, and every entry -1 where the sample
   was scored in chunks of several tokens (aligned.py choice 4).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opd.common import protocol as p
from opd.common.errors import InvalidInput, OPDError
from opd.trainer import aligned
from opd.trainer.config import DEFAULT_TEACHER
from opd.trainer.context import score_sequence
from opd.trainer.data import PromptRow
from opd.trainer.remote import Remote, ScoreLimits


class StaleRollouts(OPDError):
    """The student sampled with another policy version than the trainer loaded."""

    status_code = 409

    def __init__(self, got: int, expected: int, student: str = "the student") -> None:
        super().__init__(f"{student} sampled with policy version {got}, the trainer expects {expected}")
        self.got, self.expected = got, expected


class ScoreMismatch(OPDError):
    status_code = 502


@dataclass
class Sample:
    group: int  # index of its prompt within the request: samples of one group share a prompt
    prompt_ids: list[int]
    token_ids: list[int]
    sampling_logprobs: list[float]
    text: str
    finish_reason: str
    row: dict[str, Any] = field(repr=False)
    teacher_logprobs: list[float] | None = None
    trimmed: int = 0  # tokens cut off the end to fit the teacher's maximum length
    teacher_prompt: p.Prompt | None = field(default=None, repr=False)  # None: the student's prompt ids
    teacher: str = DEFAULT_TEACHER  # the name of the teacher that scores it
    teacher_ids: list[int] | None = field(default=None, repr=False)  # a teacher of another tokenizer: its ids (6)
    chunks: list[Any] | None = field(default=None, repr=False)  # and the chunks both tokenizations share
    teacher_topk_ids: list[list[int]] | None = field(default=None, repr=False)  # per token the teacher's top-k ids
    teacher_topk_logprobs: list[list[float]] | None = field(default=None, repr=False)  # and their logprobs (top_k asked)

    @property
    def rkl(self) -> list[float]:
        """Per-token reverse KL, log p_student - log p_teacher, at the sampled tokens."""
        assert self.teacher_logprobs is not None
        return [s - t for s, t in zip(self.sampling_logprobs, self.teacher_logprobs, strict=True)]


def sample(
    remote: Remote, prompts: list[PromptRow], *, n: int, max_tokens: int, temperature: float, top_p: float,
    seed: int, version: int,
) -> list[Sample]:
    request = p.RolloutRequest(
        prompts=[row.prompt for row in prompts], n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    shares = remote.rollouts(request)
    for share in shares:
        if share.response.policy_version != version:
            raise StaleRollouts(share.response.policy_version, version, f"the {remote.student_name(share.url)}")
    out = []
    for share in shares:  # in prompt order: the shares are consecutive blocks
        for r in sorted(share.response.rollouts, key=lambda r: r.prompt_index):  # stable: keeps each group's order
            if len(r.logprobs) != len(r.token_ids):
                raise ScoreMismatch(f"the student returned {len(r.token_ids)} tokens but {len(r.logprobs)} logprobs")
            if r.token_ids:
                index = share.first + r.prompt_index
                row = prompts[index]
                out.append(Sample(index, r.prompt_token_ids, r.token_ids, r.logprobs, r.text, r.finish_reason,
                                  row.row, teacher_prompt=row.teacher, teacher=row.teacher_name))
    return out


def score(remote: Remote, samples: list[Sample], top_k: int = 0) -> None:
    """teacher log p of every sampled token, each sample by its own teacher, the teachers at once; the samples
    are kept whatever happens to a teacher. With `top_k`, also the teacher's top-k at every token (7)."""
    by_teacher: dict[str, list[Sample]] = {}
    for s in samples:
        if s.teacher_logprobs is None:  # scored before an interruption: never scored twice
            by_teacher.setdefault(s.teacher, []).append(s)
    if by_teacher:
        remote.each([lambda name=name, todo=todo: score_with(remote, name, todo, top_k) for name, todo in by_teacher.items()])


def score_with(remote: Remote, teacher: str, todo: list[Sample], top_k: int = 0) -> None:
    """One teacher's samples, in requests cut to its limits."""
    t = remote.teachers[teacher]
    limits = t.limits
    if t.alignment == "bytes":
        for s in todo:
            aligned.prepare(s, t, remote.student_table, remote.student_eot)
            if t.protocol != "opd":  # a stock server is sent token ids: its prompt rendered with its own tokenizer
                s.teacher_prompt = aligned.rendered(t.tokenizer, s.teacher_prompt)
    prompts = prompt_lengths(remote, teacher, todo)
    for s, n in zip(todo, prompts, strict=True):
        if s.teacher_ids is not None:
            aligned.fit(s, limits.max_sequence_len, n)
        else:
            fit(s, limits.max_sequence_len, n)
    for chunk in chunks([n + len(scored_ids(s)) for s, n in zip(todo, prompts, strict=True)], limits):
        score_chunk(remote, [todo[i] for i in chunk], teacher, top_k)


def scored_ids(s: Sample) -> list[int]:
    """The completion ids the teacher scores: its own with another tokenizer (6), else the student's."""
    return s.token_ids if s.teacher_ids is None else s.teacher_ids


def prompt_lengths(remote: Remote, teacher: str, todo: list[Sample]) -> list[int]:
    """The length of the prompt the teacher scores each sample after (4): the student's prompt ids, the teacher
    prompt's ids, or what the teacher renders the teacher prompt to (asked only for those)."""
    out = [len(s.prompt_ids if s.teacher_prompt is None else s.teacher_prompt.token_ids or ()) for s in todo]
    rendered = [i for i, s in enumerate(todo) if s.teacher_prompt is not None and s.teacher_prompt.token_ids is None]
    if rendered:
        lengths = remote.prompt_lengths([todo[i].teacher_prompt for i in rendered], teacher)
        for i, n in zip(rendered, lengths, strict=True):
            out[i] = n
    return out


def fit(s: Sample, max_len: int | None, prompt_len: int | None = None) -> None:
    """Cuts the completion's last tokens so that the teacher's prompt (default: the student's, prompt_ids) +
    completion fit the teacher's maximum length."""
    own = prompt_len is None or s.teacher_prompt is None
    prompt_len = len(s.prompt_ids) if prompt_len is None else prompt_len
    if max_len is None or prompt_len + len(s.token_ids) <= max_len:
        return
    keep = max_len - prompt_len
    if keep < 1:
        what = f"a prompt of {prompt_len} tokens" if own else f"the teacher's prompt, {prompt_len} tokens as it renders,"
        fix = "shorten the prompts" if own else "shorten the teacher prompt (teacher_prompt, the rows' teacher context)"
        raise InvalidInput(
            f"{what} leaves no room for its completion under the teacher's maximum length of {max_len}: {fix}, or "
            "serve the teacher with a longer max_model_len"
        )
    s.trimmed += len(s.token_ids) - keep
    s.token_ids, s.sampling_logprobs, s.finish_reason = s.token_ids[:keep], s.sampling_logprobs[:keep], "length"


def chunks(lengths: list[int], limits: ScoreLimits) -> list[list[int]]:
    """Consecutive indices grouped so that no group holds more sequences or tokens than a request may."""
    out: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if not out or len(out[-1]) == limits.max_sequences or tokens + n > limits.max_request_tokens:
            out.append([])
            tokens = 0
        out[-1].append(i)
        tokens += n
    return out


def score_chunk(remote: Remote, chunk: list[Sample], teacher: str | None = None, top_k: int = 0) -> None:
    sequences = [score_sequence(s.prompt_ids, scored_ids(s), s.teacher_prompt) for s in chunk]
    response = remote.score(sequences, teacher, top_k=top_k) if top_k else remote.score(sequences, teacher)
    for s, result in zip(chunk, response.results, strict=True):
        if len(result.logprobs) != len(scored_ids(s)):
            raise ScoreMismatch(f"the teacher scored {len(result.logprobs)} tokens of a {len(scored_ids(s))}-token completion")
        s.teacher_logprobs = result.logprobs if s.teacher_ids is None else aligned.credited(s, result.logprobs)
        if top_k:
            to_student = None if s.teacher_ids is None else remote.teachers[teacher or remote.default_teacher].to_student
            keep_topk(s, result, top_k, to_student)


def keep_topk(s: Sample, result: p.SequenceLogprobs, top_k: int, to_student: Sequence[int] | None = None) -> None:
    """The teacher's top-k of every completion token (7): exactly `top_k` distinct ids per token, or ScoreMismatch.
    A teacher of another tokenizer's (`to_student`: its ids -> the student's, aligned.student_ids): in student ids."""
    rows = result.top_logprobs or []
    if len(rows) != len(scored_ids(s)):
        raise ScoreMismatch(f"the teacher returned {len(rows)} top-k rows for a {len(scored_ids(s))}-token completion "
                            f"(top_k {top_k} asked)")
    for j, row in enumerate(rows):
        if len(row) != top_k or len({t.token_id for t in row}) != top_k:
            raise ScoreMismatch(f"the teacher returned {len(row)} top-k entries ({len({t.token_id for t in row})} "
                                f"distinct ids) at completion token {j}; top_k {top_k} was asked")
    ids, logprobs = [[t.token_id for t in row] for row in rows], [[t.logprob for t in row] for row in rows]
    if s.teacher_ids is not None:
        assert to_student, "a teacher of another tokenizer maps its top-k with its to_student table (check_tokenizers)"
        ids, logprobs = aligned.student_topk(s, ids, logprobs, to_student, top_k)
    s.teacher_topk_ids, s.teacher_topk_logprobs = ids, logprobs


def teacher_kl(samples: list[Sample]) -> float:
    """Mean per-token reverse KL to the teacher over the samples' tokens (0 without tokens)."""
    return sum(sum(s.rkl) for s in samples) / max(1, sum(len(s.token_ids) for s in samples))


def teacher_kl_per_completion(samples: list[Sample]) -> float:
    """Mean over the samples of each one's reverse KL summed over its tokens (0 without samples)."""
    return sum(sum(s.rkl) for s in samples) / max(1, len(samples))


def kl_summary(samples: list[Sample], teachers: Sequence[str] = ()) -> dict[str, float]:
    """Teacher reverse KL (when scored) per token and per completion, the sample estimate of the sampler's entropy,
    lengths. With `teachers` (a run of several), also `teacher_kl/<name>` and `teacher_kl_per_completion/<name>`
    over each teacher's samples that it has."""
    tokens = sum(len(s.token_ids) for s in samples)
    if tokens == 0:
        return {"teacher_kl": 0.0, "teacher_kl_per_completion": 0.0, "entropy": 0.0, "tokens": 0, "sequences": 0}
    out = {
        # -E[log p(x)] over the sampler's own samples estimates its entropy per token.
        "entropy": -sum(sum(s.sampling_logprobs) for s in samples) / tokens,
        "tokens": tokens,
        "sequences": len(samples),
        "mean_length": tokens / len(samples),
        "stop_fraction": sum(s.finish_reason == "stop" for s in samples) / len(samples),
        "trimmed_tokens": sum(s.trimmed for s in samples),
        **aligned.summary(samples),
    }
    if all(s.teacher_logprobs is not None for s in samples):  # the rl and sft arms ask no teacher while training
        per_teacher = {}
        for name in teachers:
            if mine := [s for s in samples if s.teacher == name]:
                per_teacher[f"teacher_kl/{name}"] = teacher_kl(mine)
                per_teacher[f"teacher_kl_per_completion/{name}"] = teacher_kl_per_completion(mine)
        out = {"teacher_kl": teacher_kl(samples), "teacher_kl_per_completion": teacher_kl_per_completion(samples),
               **per_teacher, **out}
    return out


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"{what} {spec!r} cannot be loaded ({exc}): is the module importable from here?") from exc
    if not callable(fn):
        raise InvalidInput(f"{what} {spec!r} is not a function")
    return fn
