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
4) Numbers are strict: a token id, a count or a seed is a JSON integer (not
   `true`, not `1.0`, not `"1"`); a temperature or top_p is a JSON number.
5) Sampling temperatures below `MIN_TEMPERATURE` (0 included) mean greedy
   decoding; the student then reports, for each chosen token, the model's own
   logprob at temperature 1 (what vLLM reports for greedy requests too). That
   is the student's log p of its answer, fit for the reverse KL against the
   teacher, but not a sampling probability (greedy picks with probability 1):
   train at a temperature >= MIN_TEMPERATURE. Between 0 and MIN_TEMPERATURE
   sampling would divide logits into overflow (vLLM itself raises such
   temperatures to 0.01), so the floor keeps every admitted value finite.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TokenId = Annotated[int, Field(strict=True, ge=0)]
TokenIds = list[TokenId]
Count = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]
MAX_TOP_K = 20
MIN_TEMPERATURE = 0.01
MAX_SEED = 2**62  # rollout seeds are seed + i*n + j, and the engines take 64-bit seeds


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictRequest(Request):
    """Every field strict (the vLLM- and SGLang-compatible requests): a number is a JSON number, a flag a
    JSON boolean, so `"1"` or `1` for a flag is refused as the OpenAPI document says, not guessed at."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def one_of(*forms: list[str]) -> dict:
    """JSON schema for "exactly one of these sets of fields" (the validators below say it in words).

    A field sent as null counts as not given, as the validators read it: each
    form requires its fields non-null and the other forms' fields absent or null,
    so `{"text": null, "messages": [...]}` is one form, as served.
    """
    fields = {f for form in forms for f in form}
    return {"oneOf": [{"required": form,
                       "properties": {f: ({"not": {"type": "null"}} if f in form else {"type": "null"}) for f in sorted(fields)}}
                      for form in forms]}


# --------------------------------------------------------------------- prompts
class ChatMessage(Request):
    role: Annotated[str, Field(min_length=1, examples=["user"])]
    content: str


class Prompt(Request):
    """Exactly one of `token_ids`, `text` or `messages`.

    Chat messages are rendered with the serving model's own chat template, with
    the generation prompt added.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of(["token_ids"], ["text"], ["messages"]))

    # Empty ones are refused by the validator, in its words; the schema says it too.
    token_ids: TokenIds | None = Field(default=None, json_schema_extra={"minItems": 1})
    text: str | None = Field(default=None, json_schema_extra={"minLength": 1})
    messages: list[ChatMessage] | None = Field(default=None, json_schema_extra={"minItems": 1})

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

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of(["token_ids"], ["prompt", "completion"]))

    token_ids: TokenIds | None = Field(default=None, json_schema_extra={"minItems": 2})
    start: Annotated[Count, Field(ge=1)] | None = None
    prompt: Prompt | None = None
    completion: TokenIds | None = Field(default=None, json_schema_extra={"minItems": 1})

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
    top_k: Annotated[Count, Field(ge=0, le=MAX_TOP_K)] = 0
    temperature: Annotated[
        Number, Field(ge=MIN_TEMPERATURE, le=100.0, description="Scores log softmax(logits / temperature).")
    ] = 1.0


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


class RenderRequest(Request):
    prompts: Annotated[list[Prompt], Field(min_length=1, description="At most the teacher's max_sequences (GET /info).")]


class RenderResponse(Response):
    """The ids each prompt renders to: exactly what POST /logprobs puts before a `prompt` + `completion` sequence's
    completion."""

    model: str
    token_ids: list[list[int]]


# --------------------------------------------------------------------- student
class RolloutRequest(Request):
    prompts: Annotated[list[Prompt], Field(min_length=1)]
    n: Annotated[Count, Field(ge=1, le=64)] = 1
    max_tokens: Annotated[
        Count, Field(ge=1, description="At most the service's max_tokens limit, and prompt + max_tokens <= max_model_len (GET /info).")
    ] = 128
    temperature: Annotated[
        Number,
        Field(
            ge=0.0, le=10.0,
            description=f"Below {MIN_TEMPERATURE} (0 included): greedy decoding, whose logprobs are the model's at temperature 1.",
        ),
    ] = 1.0
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[Count, Field(ge=0, le=MAX_SEED)] | None = None
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
    version: Annotated[Count, Field(ge=1)]
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
    waiting_for: str | None = Field(default=None, description="The service call the run is waiting out (that service is down).")
    alignment: dict[str, str] | None = Field(
        default=None, description="Once the run is set up, how each teacher scores: ids (the student's token ids) or "
        "bytes (its own tokenization of the completion, aligned on bytes).")
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


class TrainerInfo(Response):
    """The trainer's GET /info: what this service is and how many runs it takes (its ServiceInfo: no model of
    its own, a run names its student)."""

    service: Literal["trainer"] = "trainer"
    version: str | None = Field(default=None, description="The opd package's version (null when unknown).")
    nproc: int = Field(description="Trainer processes (FSDP2 under torchrun above 1); rank 0 serves this API.")
    runs_dir: str = Field(description="Where a run without an output_dir writes (runs_dir/<id>).")
    max_runs: int = Field(description="Runs at once; POST /runs answers 409 while active_runs is at it.")
    active_runs: int = Field(description="Runs in progress now.")
    limits: dict[str, int] = Field(default={}, description="As the teacher's and the student's: max_pending (requests "
                                   "in flight or queued before 503), max_body_bytes (largest request body, 413 above).")
    alignment: dict[str, dict[str, str]] = Field(
        default={}, description="Per run in progress (by id), once it is set up: how each of its teachers scores, ids "
        "(the student's token ids) or bytes (its own tokenization of the completion, aligned on bytes), as the run's "
        "status says.")
