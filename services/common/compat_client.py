"""Teacher clients that score through a stock vLLM or SGLang server's own protocol.

    from opd.common.compat_client import teacher_client
    teacher = teacher_client("openai", "http://127.0.0.1:8000")   # `vllm serve`-style server
    teacher.logprobs([{"token_ids": ids, "start": n}]).results[0].logprobs

Choices:
1) The same `logprobs(sequences, top_k, temperature)` as TeacherClient, with
   the same LogprobsResponse, so the trainer swaps protocols by configuration
   (`teacher_protocol: opd | openai | sglang`) and nothing else changes.
2) openai: one POST /v1/completions per call, every sequence a token-id
   prompt, `echo` + `max_tokens` 0 + `prompt_logprobs` k + `return_token_ids`
   (vLLM then samples one token internally and skips detokenizing the
   prompt). The model id comes from GET /v1/models, once.
3) sglang: one POST /generate batch, `logprob_start_len` start-1 per item and
   `max_new_tokens` 0; the scores are `meta_info.input_token_logprobs[1:]`.
4) The answer must hold exactly the ids that were sent, position by position;
   anything else raises ServiceError (a teacher that re-tokenized, truncated
   or misaligned would otherwise poison the training signal silently).
5) Temperature 1 only: stock servers return logprobs of the raw logits.
6) Stock servers publish no tokenizer fingerprint: `tokenize(text)` returns
   the server's token ids for a text, so the trainer compares tokenizers on
   a probe text instead.
"""

from __future__ import annotations

from typing import Any, Literal

from opd.common import openai_protocol as o
from opd.common import protocol as p
from opd.common import sglang_protocol as s
from opd.common.client import AsyncClient, AsyncTeacherClient, SyncClient, TeacherClient, _as
from opd.common.errors import InvalidRequest, ServiceError

TeacherProtocol = Literal["opd", "openai", "sglang"]
Job = tuple[list[int], int]  # token ids, first scored position


def as_jobs(sequences: list[p.ScoreSequence | dict], temperature: float) -> list[Job]:
    if temperature != 1.0:
        raise InvalidRequest(f"temperature {temperature}: a stock vLLM or SGLang server scores at temperature 1 only")
    jobs = []
    for seq in (_as(p.ScoreSequence, x) for x in sequences):
        if seq.token_ids is not None:
            jobs.append((list(seq.token_ids), int(seq.start or 1)))
        elif seq.prompt is not None and seq.prompt.token_ids is not None and seq.completion:
            jobs.append((list(seq.prompt.token_ids) + list(seq.completion), len(seq.prompt.token_ids)))
        else:
            raise InvalidRequest(
                "a stock server is sent token ids: give 'token_ids' + 'start', or a token-id prompt + completion"
            )
    return jobs


def _mismatch(url: str, i: int, what: str) -> ServiceError:
    return ServiceError(502, f"sequence {i}: {what}: the teacher did not score the token ids it was sent", url)


# ------------------------------------------------------------------ openai
def openai_body(model: str, jobs: list[Job], top_k: int) -> dict[str, Any]:
    return {"model": model, "prompt": [ids for ids, _ in jobs], "max_tokens": 0, "echo": True,
            "prompt_logprobs": top_k, "return_token_ids": True}


def openai_results(answer: o.CompletionResponse, jobs: list[Job], top_k: int, url: str) -> list[p.SequenceLogprobs]:
    if len(answer.choices) != len(jobs):
        raise _mismatch(url, 0, f"{len(answer.choices)} choices for {len(jobs)} prompts")
    results = []
    for i, (choice, (ids, start)) in enumerate(zip(sorted(answer.choices, key=lambda c: c.index), jobs, strict=True)):
        rows = choice.prompt_logprobs or []
        if choice.prompt_token_ids not in (None, ids) or len(rows) != len(ids):
            raise _mismatch(url, i, f"{len(rows)} prompt positions for {len(ids)} tokens")
        logprobs, top = [], []
        for j in range(start, len(ids)):
            row = rows[j] or {}
            if ids[j] not in row:
                raise _mismatch(url, i, f"no logprob for token {ids[j]} at position {j}")
            logprobs.append(row[ids[j]].logprob)
            best = sorted(row.items(), key=lambda kv: -kv[1].logprob)[:top_k]
            top.append([p.TopLogprob(token_id=t, logprob=lp.logprob) for t, lp in best])
        results.append(p.SequenceLogprobs(token_ids=ids, start=start, logprobs=logprobs, top_logprobs=top if top_k else None))
    return results


# ------------------------------------------------------------------ sglang
def sglang_body(jobs: list[Job], top_k: int) -> dict[str, Any]:
    return {"input_ids": [ids for ids, _ in jobs], "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True, "logprob_start_len": [start - 1 for _, start in jobs], "top_logprobs_num": top_k}


def sglang_results(answer: list[s.GenerateOutput], jobs: list[Job], top_k: int, url: str) -> list[p.SequenceLogprobs]:
    if len(answer) != len(jobs):
        raise _mismatch(url, 0, f"{len(answer)} answers for {len(jobs)} inputs")
    results = []
    for i, (out, (ids, start)) in enumerate(zip(answer, jobs, strict=True)):
        entries = (out.meta_info.input_token_logprobs or [])[1:]
        if [t for _, t, _ in entries] != ids[start:] or any(lp is None for lp, _, _ in entries):
            raise _mismatch(url, i, f"{len(entries)} logprobs for the {len(ids) - start} tokens from position {start}")
        top = None
        if top_k:
            rows = (out.meta_info.input_top_logprobs or [])[1:]
            if len(rows) != len(entries):
                raise _mismatch(url, i, f"{len(rows)} top-logprob rows for {len(entries)} tokens")
            top = [[p.TopLogprob(token_id=t, logprob=lp) for lp, t, _ in (row or []) if lp is not None] for row in rows]
        results.append(p.SequenceLogprobs(token_ids=ids, start=start, logprobs=[lp for lp, _, _ in entries], top_logprobs=top))
    return results


def _response(model: str, jobs: list[Job], results: list[p.SequenceLogprobs]) -> p.LogprobsResponse:
    scored = sum(len(r.logprobs) for r in results)
    usage = p.Usage(sequences=len(jobs), input_tokens=sum(len(ids) for ids, _ in jobs), scored_tokens=scored)
    return p.LogprobsResponse(model=model, results=results, usage=usage)


def _info(model: str, engine: str, max_model_len: int | None) -> p.ServiceInfo:
    # vLLM generates one token after an echoed prompt even at max_tokens 0: a sequence holds max_model_len - 1.
    limits = {"max_sequence_len": max_model_len - 1} if max_model_len else {}
    return p.ServiceInfo(service="teacher", model=model, engine=engine, vocab_size=0, tokenizer_fingerprint="",
                         max_model_len=max_model_len or 0, limits=limits)


def _models(listed: o.ModelList, url: str) -> o.ModelCard:
    if not listed.data:
        raise ServiceError(502, "GET /v1/models lists no model", url)
    return listed.data[0]


def _probe_ids(ids: list[int] | None, url: str) -> list[int]:
    if not ids:
        raise ServiceError(502, "the server returned no token ids for the probe text", url)
    return ids


PROBE_OPENAI = {"max_tokens": 0, "echo": True, "return_token_ids": True}
PROBE_SGLANG = {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0}


class OpenAITeacherClient(SyncClient):
    """A vLLM OpenAI-compatible server as the teacher: POST /v1/completions with prompt_logprobs."""

    def __init__(self, *args: Any, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = model

    def model(self) -> str:
        if self._model is None:
            self._model = _models(self.request("GET", "/v1/models", model=o.ModelList), self.urls[0]).id
        return self._model

    def logprobs(self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0) -> p.LogprobsResponse:
        jobs = as_jobs(sequences, temperature)
        answer = self.request("POST", "/v1/completions", openai_body(self.model(), jobs, top_k), o.CompletionResponse)
        return _response(answer.model, jobs, openai_results(answer, jobs, top_k, self.urls[0]))

    def info(self) -> p.ServiceInfo:
        card = _models(self.request("GET", "/v1/models", model=o.ModelList), self.urls[0])
        return _info(card.id, "openai-compatible", card.max_model_len)

    def tokenize(self, text: str) -> list[int]:
        body = {"model": self.model(), "prompt": text, **PROBE_OPENAI}
        answer = self.request("POST", "/v1/completions", body, o.CompletionResponse)
        return _probe_ids(answer.choices[0].prompt_token_ids if answer.choices else None, self.urls[0])


class AsyncOpenAITeacherClient(AsyncClient):
    def __init__(self, *args: Any, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = model

    async def model(self) -> str:
        if self._model is None:
            self._model = _models(await self.request("GET", "/v1/models", model=o.ModelList), self.urls[0]).id
        return self._model

    async def logprobs(
        self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0
    ) -> p.LogprobsResponse:
        jobs = as_jobs(sequences, temperature)
        body = openai_body(await self.model(), jobs, top_k)
        answer = await self.request("POST", "/v1/completions", body, o.CompletionResponse)
        return _response(answer.model, jobs, openai_results(answer, jobs, top_k, self.urls[0]))


class SGLangTeacherClient(SyncClient):
    """An SGLang server as the teacher: POST /generate with return_logprob and max_new_tokens 0."""

    def logprobs(self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0) -> p.LogprobsResponse:
        jobs = as_jobs(sequences, temperature)
        raw = self.request("POST", "/generate", sglang_body(jobs, top_k))
        answer = [s.GenerateOutput.model_validate(x) for x in raw]
        return _response("sglang", jobs, sglang_results(answer, jobs, top_k, self.urls[0]))

    def info(self) -> p.ServiceInfo:
        return _info(self.urls[0], "sglang-compatible", None)

    def tokenize(self, text: str) -> list[int]:
        raw = self.request("POST", "/generate", {"text": text, **PROBE_SGLANG})
        entries = s.GenerateOutput.model_validate(raw).meta_info.input_token_logprobs or []
        return _probe_ids([t for _, t, _ in entries], self.urls[0])


class AsyncSGLangTeacherClient(AsyncClient):
    async def logprobs(
        self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0
    ) -> p.LogprobsResponse:
        jobs = as_jobs(sequences, temperature)
        raw = await self.request("POST", "/generate", sglang_body(jobs, top_k))
        answer = [s.GenerateOutput.model_validate(x) for x in raw]
        return _response("sglang", jobs, sglang_results(answer, jobs, top_k, self.urls[0]))


CLIENTS: dict[str, tuple[type, type]] = {
    "opd": (TeacherClient, AsyncTeacherClient),
    "openai": (OpenAITeacherClient, AsyncOpenAITeacherClient),
    "sglang": (SGLangTeacherClient, AsyncSGLangTeacherClient),
}


def teacher_client(protocol: TeacherProtocol, urls: str | list[str], **kwargs: Any) -> Any:
    """A sync teacher client speaking `protocol`: opd's /logprobs, vLLM's /v1/completions or SGLang's /generate."""
    return CLIENTS[protocol][0](urls, **kwargs)


def async_teacher_client(protocol: TeacherProtocol, urls: str | list[str], **kwargs: Any) -> Any:
    return CLIENTS[protocol][1](urls, **kwargs)
