"""The teacher as a vLLM OpenAI-compatible server, for scoring: POST /v1/completions, GET /v1/models.

A CompletionRequest becomes score jobs on the TeacherService (the same
limits, engine batching and counters as /logprobs), and the scores come back
in vLLM's response shape (services/common/openai_protocol.py).

Choices:
1) Prompt scores: `prompt_logprobs` k, or `echo` with `logprobs` k (vLLM then
   takes k for the prompt too), scores every prompt position from 1 on;
   position 0 has no context and is null, as in vLLM.
2) `max_tokens` 1 appends a placeholder position and reads the teacher's
   greedy next token off its top alternative; causal attention leaves the
   earlier positions' scores untouched. The teacher never samples.
3) A `prompt_logprobs` entry lists the actual token first (with its rank in
   the vocabulary), then the top k alternatives; an alternative that is the
   actual token appears once. `decoded_token` is the single token decoded.
4) The legacy `logprobs` block keys alternatives by token text and keeps the
   first `logprobs` + 1 entries of each position, like vLLM; logprobs are
   clamped at -9999 (JSON has no -inf).
"""

from __future__ import annotations

from collections.abc import Callable

from opd.common import openai_protocol as o
from opd.common.errors import InvalidInput, InvalidRequest, NotFound
from opd.teacher.engine import ScoreJob, ScoreOutput
from opd.teacher.serving import TeacherService

SCORING_ONLY = (
    "this teacher scores and does not generate: send max_tokens 0 (or 1) with prompt_logprobs, "
    "or echo with logprobs (the teacher's own POST /logprobs scores token ids from a start position)"
)
PLACEHOLDER = 0  # any in-vocabulary id: only the distribution before it is read


def clamp(logprob: float) -> float:
    return max(logprob, -9999.0)


class OpenAICompletions:
    def __init__(self, service: TeacherService) -> None:
        self.service = service
        self.tokenizer = service.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.service.engine.model_name

    def models(self) -> o.ModelList:
        engine = self.service.engine
        return o.ModelList(data=[o.ModelCard(id=self.model_id, root=engine.model_name, max_model_len=engine.max_model_len)])

    def check(self, request: o.CompletionRequest) -> None:
        """The scoring subset of the protocol; anything else is a 4xx that says what is supported."""
        if request.model is not None and request.model != self.model_id:
            raise NotFound(f"the model '{request.model}' is not served here: GET /v1/models lists '{self.model_id}'")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # vLLM's default
        if max_tokens > 1:
            raise InvalidRequest(f"max_tokens {max_tokens}: {SCORING_ONLY}")
        for name, bad in (("stream", request.stream), ("use_beam_search", request.use_beam_search),
                          ("suffix", request.suffix is not None), ("n", request.n != 1)):
            if bad:
                raise InvalidRequest(f"'{name}' is not supported: {SCORING_ONLY}")

    async def complete(self, request: o.CompletionRequest) -> o.CompletionResponse:
        self.check(request)
        k_prompt = request.prompt_logprobs
        if k_prompt is None and request.echo:
            k_prompt = request.logprobs  # vLLM scores the echoed prompt at the `logprobs` width
        next_token = request.max_tokens == 1
        top_k = max(k_prompt or 0, request.logprobs or 0, 1 if next_token else 0)
        prompts = request.prompts()

        def make_jobs() -> list[ScoreJob]:
            jobs = []
            for i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids = self.tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
                else:
                    ids = list(prompt)
                if not ids:
                    raise InvalidInput(f"prompt[{i}] encodes to no tokens: give a non-empty prompt")
                start = 1 if k_prompt is not None else len(ids)
                jobs.append(ScoreJob(ids + [PLACEHOLDER] * next_token, start))
            self.service.check_jobs(jobs, label="prompt")
            return jobs

        jobs, outputs = await self.service.score(make_jobs, top_k=top_k, ranks=True, endpoint="/v1/completions")
        decode = Decoder(self.tokenizer)
        choices = []
        for i, (prompt, job, out) in enumerate(zip(prompts, jobs, outputs, strict=True)):
            ids = job.token_ids[: len(job.token_ids) - next_token]
            choices.append(self.choice(i, prompt, ids, out, request, k_prompt, next_token, decode))
        prompt_tokens = sum(len(job.token_ids) - next_token for job in jobs)
        generated = next_token * len(jobs)
        usage = o.CompletionUsage(
            prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
        )
        return o.CompletionResponse(model=self.model_id, choices=choices, usage=usage)

    def choice(
        self, index: int, prompt: str | list[int], ids: list[int], out: ScoreOutput, request: o.CompletionRequest,
        k_prompt: int | None, next_token: bool, decode: Decoder,
    ) -> o.CompletionChoice:
        prompt_lps: o.PromptLogprobs | None = None
        if k_prompt is not None:
            prompt_lps = [None] + [
                position(ids[j], out.logprobs[j - 1], out.ranks[j - 1] if out.ranks else None,
                         out.top_logprobs[j - 1][:k_prompt] if out.top_logprobs else [], decode)
                for j in range(1, len(ids))
            ]
        generated: list[int] = []
        generated_lps: list[dict[int, o.Logprob] | None] = []
        if next_token:
            assert out.top_logprobs
            top = out.top_logprobs[-1]
            best, best_lp = top[0]
            generated, generated_lps = [best], [position(best, best_lp, 1, top[: request.logprobs or 0], decode)]
        text = decode.text(generated)
        if request.echo and not request.return_token_ids:  # vLLM echoes no prompt text when it returns the ids
            text = (prompt if isinstance(prompt, str) else decode.text(ids)) + text
        legacy = None
        if request.logprobs is not None:
            tokens = (ids if request.echo else []) + generated
            per_token = ((prompt_lps or [None] * len(ids)) if request.echo else []) + generated_lps
            legacy = legacy_logprobs(tokens, per_token, request.logprobs, decode, bool(request.return_tokens_as_token_ids))
        return o.CompletionChoice(
            index=index, text=text, logprobs=legacy, finish_reason="length", prompt_logprobs=prompt_lps,
            prompt_token_ids=ids if request.return_token_ids else None,
            token_ids=generated if request.return_token_ids else None,
        )


def position(
    token: int, logprob: float, rank: int | None, top: list[tuple[int, float]], decode: Decoder
) -> dict[int, o.Logprob]:
    """One position's entry: the actual token first, then the alternatives by rank."""
    entry = {token: o.Logprob(logprob=clamp(logprob), rank=rank, decoded_token=decode.token(token))}
    for r, (alt, lp) in enumerate(top, start=1):
        entry.setdefault(alt, o.Logprob(logprob=clamp(lp), rank=r, decoded_token=decode.token(alt)))
    return entry


def legacy_logprobs(
    tokens: list[int], per_token: list[dict[int, o.Logprob] | None], n: int, decode: Decoder, as_ids: bool
) -> o.CompletionLogProbs:
    """OpenAI's `logprobs` block: per token its text, logprob and the top `n` (+ itself) by text."""
    name: Callable[[int], str] = (lambda t: f"token_id:{t}") if as_ids else decode.token
    out = o.CompletionLogProbs()
    offset = 0
    for token, entry in zip(tokens, per_token, strict=True):
        text = name(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry[token].logprob)
        out.top_logprobs.append({name(t): lp.logprob for i, (t, lp) in enumerate(entry.items()) if i <= n})
    return out


class Decoder:
    """Token text, each id decoded once per request."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""
