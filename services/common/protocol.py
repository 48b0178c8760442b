"""Wire protocol of the opd services: every request and response body.

One module imported by the servers and by their clients, so both sides agree
by construction. It imports pydantic only (no torch, no vLLM): other pipelines
load it cheaply.

Choices:
1) Requests forbid unknown fields: a misspelt option is a 422, never ignored.
2) Schema-level limits (non-negative ids, top_k <= 20, ...) live here; limits
   that depend on the loaded model (vocabulary, maximum length) or on the
   deployment (sequences per request) are checked by the service and answered
   with a 4xx that names the limit.
3) A prompt is token ids, plain text, or chat messages, exactly one of them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

TokenIds = list[NonNegativeInt]
MAX_TOP_K = 20


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------- prompts
class ChatMessage(Request):
    role: Annotated[str, Field(min_length=1, examples=["user"])]
    content: str


class Prompt(Request):
    """Exactly one of `token_ids`, `text` or `messages`.

    Chat messages are rendered with the serving model's own chat template, with
    the generation prompt added.
    """

    token_ids: TokenIds | None = None
    text: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        given = [k for k in ("token_ids", "text", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a prompt needs exactly one of 'token_ids', 'text' or 'messages'"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if (self.token_ids is not None and not self.token_ids) or self.text == "" or self.messages == []:
            raise ValueError(f"the prompt's '{given[0]}' is empty")
        return self


# --------------------------------------------------------------------- teacher
class ScoreSequence(Request):
    """A sequence to score: either `token_ids` + `start`, or `prompt` + `completion`.

    With `token_ids`, logprobs are returned for positions `start`..end, each
    conditioned on all tokens before it (`start` >= 1: position 0 has no
    context). With `prompt` + `completion`, the prompt is rendered by the
    teacher (token ids, text, or chat messages with its chat template) and
    exactly the completion tokens are scored.
    """

    token_ids: TokenIds | None = None
    start: NonNegativeInt | None = None
    prompt: Prompt | None = None
    completion: TokenIds | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ScoreSequence:
        if self.token_ids is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("give either 'token_ids' (+ 'start') or 'prompt' + 'completion', not both")
            if len(self.token_ids) < 2:
                raise ValueError("'token_ids' needs at least 2 tokens: the first one has no context to score it in")
            start = 1 if self.start is None else self.start
            if not 1 <= start < len(self.token_ids):
                raise ValueError(
                    f"'start' must be between 1 and len(token_ids)-1 = {len(self.token_ids) - 1}; got {start}"
                )
            self.start = start
            return self
        if self.prompt is None or self.completion is None:
            raise ValueError("a sequence needs 'token_ids' (+ optional 'start'), or both 'prompt' and 'completion'")
        if self.start is not None:
            raise ValueError("'start' goes with 'token_ids'; with 'prompt' + 'completion' the completion is scored")
        if not self.completion:
            raise ValueError("'completion' is empty: give the token ids to score")
        return self


class LogprobsRequest(Request):
    sequences: Annotated[list[ScoreSequence], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] = 0
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0


class TopLogprob(Response):
    token_id: int
    logprob: float


class SequenceLogprobs(Response):
    token_ids: list[int]
    start: int
    logprobs: list[float]
    top_logprobs: list[list[TopLogprob]] | None = None


class Usage(Response):
    sequences: int = 0
    input_tokens: int = 0
    scored_tokens: int = 0
    generated_tokens: int = 0


class LogprobsResponse(Response):
    model: str
    results: list[SequenceLogprobs]
    usage: Usage


# --------------------------------------------------------------------- student
class RolloutRequest(Request):
    prompts: Annotated[list[Prompt], Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=64)] = 1
    max_tokens: Annotated[int, Field(ge=1)] = 128
    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: int | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1)]] | None, Field(max_length=16)] = None


class Rollout(Response):
    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    text: str


class RolloutResponse(Response):
    model: str
    policy_version: int
    rollouts: list[Rollout]
    usage: Usage


class WeightsRequest(Request):
    version: Annotated[int, Field(ge=1)]
    kind: Literal["lora", "full"]
    path: Annotated[str, Field(min_length=1, description="relative to the student's checkpoint root")]


class WeightsResponse(Response):
    policy_version: int
    kind: Literal["base", "lora", "full"]
    path: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------- shared
class ServiceInfo(Response):
    service: Literal["teacher", "student", "trainer"]
    model: str
    engine: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_model_len: int
    policy_version: int | None = None
    limits: dict[str, int] = {}


class Health(Response):
    status: Literal["ok", "loading"] = "ok"


class ErrorBody(Response):
    detail: str


# --------------------------------------------------------------------- trainer
# The trainer service's answers. A run's request body is the run config
# itself (services/trainer/config.py: RunConfig), validated field by field.
RunStateName = Literal["starting", "running", "stopping", "completed", "stopped", "failed"]


class RunCreated(Response):
    id: str
    state: RunStateName
    output_dir: str


class RunStatus(Response):
    id: str
    name: str
    state: RunStateName
    step: int
    steps: int
    policy_version: int | None = None
    output_dir: str
    latest: dict[str, float] | None = Field(default=None, description="The latest training step's metrics.")
    latest_eval: dict[str, float] | None = Field(default=None, description="The latest evaluation's metrics.")
    error: str | None = None
    created_at: float
    finished_at: float | None = None


class RunList(Response):
    runs: list[RunStatus]


class RunMetrics(Response):
    id: str
    records: list[dict[str, float | int | str | None]] = Field(
        description='One record per training step ("kind": "train") and per evaluation ("kind": "eval"); '
        "null stands for a number that was not finite (a skipped update's loss)."
    )
