"""vLLM's OpenAI-compatible completions protocol: the scoring subset the teacher answers.

Shapes follow vLLM's `vllm/entrypoints/openai/completion/protocol.py`
(CompletionRequest, CompletionResponse, CompletionLogProbs, Logprob) and the
ModelList of `GET /v1/models`, so a pipeline written against a vLLM server
(the official `openai` package with `extra_body={"prompt_logprobs": k}`,
ms-swift's GKD teacher server, ...) can point at the teacher unchanged. The
teacher's routes and the trainer's adapter for stock vLLM servers
(services/common/compat_client.py) both use these models.

Choices:
1) Scoring only: `max_tokens` 0 or 1, `n` 1, no streaming, no beam search, no
   suffix. The service refuses anything else with a 400 that points at
   `/logprobs`. One token (max_tokens 1) is the teacher's greedy next token.
2) Sampling fields that cannot change prompt scores (temperature, top_p,
   seed, stop, penalties, ...) are accepted and have no effect, as in vLLM,
   whose prompt logprobs come from the raw logits.
3) Unknown fields are a 422 naming the field (vLLM ignores them with a
   warning): a misspelt option is never silently dropped. Types are strict
   (StrictRequest): `"1"` for a number or `1` for a flag is a 422 too.
4) `logprobs` and `prompt_logprobs` go up to MAX_TOP_K (vLLM's default
   `--max-logprobs` is the same 20); -1 (the whole vocabulary) is refused.
5) Responses ignore unknown fields, so the adapter also parses a stock vLLM's
   answers, which carry more fields than listed here.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from opd.common.protocol import MAX_TOP_K, Count, Response, StrictRequest, TokenIds

TopN = Annotated[Count, Field(ge=0, le=MAX_TOP_K)]


class CompletionRequest(StrictRequest):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (a batch)."""

    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: TopN | None = Field(default=None, description="Top alternatives per returned token (and prompt token with echo).")
    prompt_logprobs: TopN | None = Field(default=None, description="Top alternatives per prompt position, by token id.")
    max_tokens: Annotated[Count, Field(ge=0)] | None = Field(
        default=16, description="0 or 1: the teacher scores, it does not generate."
    )
    n: Annotated[Count, Field(ge=1)] = 1
    stream: bool = False
    suffix: str | None = None
    use_beam_search: bool = False
    add_special_tokens: bool = Field(default=True, description="Add the tokenizer's special tokens (BOS) to text prompts.")
    return_token_ids: bool | None = Field(default=None, description="Add prompt_token_ids and token_ids to each choice.")
    return_tokens_as_token_ids: bool | None = Field(default=None, description="'token_id:N' strings instead of token text.")
    # Accepted for compatibility; they cannot change prompt scores.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    request_id: str | None = None
    priority: int = 0

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts:
            raise ValueError("'prompt' is empty: give a text, token ids, or a list of them")
        for i, one in enumerate(prompts):
            if not one:
                raise ValueError(f"prompt[{i}] is empty" if len(prompts) > 1 else "'prompt' is empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class Logprob(Response):
    """One entry of `prompt_logprobs[j]`, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionLogProbs(Response):
    """OpenAI's legacy logprobs: per returned token, keyed by token text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class CompletionUsage(Response):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0


class CompletionResponse(Response):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ModelCard(Response):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "opd"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(Response):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)
