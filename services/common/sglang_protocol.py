"""SGLang's native `/generate` protocol: the scoring subset the teacher answers.

Shapes follow SGLang's `GenerateReqInput` (sglang/srt/managers/io_struct.py),
its `SamplingParams` and the `meta_info` its tokenizer manager returns, so
slime and Miles (on-policy distillation with an SGLang teacher) can point at
the teacher unchanged. The teacher's route and the trainer's adapter for
stock SGLang servers (services/common/compat_client.py) both use these models.

The logprob layout, as SGLang answers it: with `logprob_start_len` s,
`meta_info.input_token_logprobs` has one `[logprob, token_id, text]` entry per
input token from s on; the first entry's logprob is always null (SGLang never
returns log p(ids[s] | ids[:s])), entry i > 0 holds log p(ids[s+i] | ids[:s+i]).
`input_top_logprobs` is aligned the same way (null first). `text` is null
unless `return_text_in_logprobs`. s = -1 (the default) means the last token.

Choices:
1) Scoring only: `max_new_tokens` must be 0 (SGLang's default is 128, so a
   request must say 0), `n` 1, no streaming; anything else is refused with a
   400 that points at `/logprobs`.
2) `sampling_params.temperature` is accepted and does not scale the returned
   logprobs, which is what SGLang does by default (unless started with
   SGLANG_TEMP_SCALED_LOGPROBS).
3) Unknown fields are a 422 naming the field, as SGLang refuses unknown
   sampling parameters; types are strict (StrictRequest).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from opd.common.errors import InvalidRequest
from opd.common.protocol import MAX_TOP_K, Count, Response, StrictRequest, TokenIds



class SamplingParams(StrictRequest):
    max_new_tokens: Annotated[Count, Field(ge=0)] | None = Field(
        default=128, description="0: the teacher scores, it does not generate."
    )
    n: Annotated[Count, Field(ge=1)] | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    sampling_seed: int | None = None


TopNum = Annotated[Count, Field(ge=0, le=MAX_TOP_K)]


class GenerateRequest(StrictRequest):
    """POST /generate: exactly one of `text` and `input_ids`, each one item or a batch."""

    text: str | list[str] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: Count | list[Count] | None = None
    top_logprobs_num: TopNum | list[TopNum] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    log_metrics: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        items = self.items()
        if not items:
            raise ValueError("the batch is empty: give at least one 'text' or 'input_ids' item")
        for i, item in enumerate(items):
            if not item:
                raise ValueError(f"item {i} is empty" if self.is_batch else "the input is empty")
        return self

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)  # type: ignore[index]

    def items(self) -> list[str | list[int]]:
        given = self.text if self.text is not None else self.input_ids
        return list(given) if self.is_batch else [given]  # type: ignore[list-item, arg-type]

    def per_item(self, name: str, default: Any) -> list[Any]:
        """A field's value for each item: a scalar repeats, a list must have one value per item."""
        value = getattr(self, name)
        n = len(self.items())
        if isinstance(value, list):
            if len(value) != n:
                raise InvalidRequest(f"'{name}' has {len(value)} values for {n} items: give one per item, or a single value")
            return [default if v is None else v for v in value]
        return [default if value is None else value] * n


# A logprob entry as SGLang writes it: [logprob or null, token_id, token text or null].
LogprobEntry = tuple[float | None, int, str | None]


class MetaInfo(Response):
    id: str
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    e2e_latency: float | None = None
    input_token_logprobs: list[LogprobEntry] | None = None
    output_token_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None


class GenerateOutput(Response):
    """One item's answer; a batch request gets a list of them, in order."""

    text: str = ""
    output_ids: list[int] = Field(default_factory=list)
    meta_info: MetaInfo
