"""The student's rollout engines behind one small interface.

`RolloutEngine.sample` takes prompts as token ids and returns, per prompt,
`n` completions with the log-probability of every sampled token under the
distribution it was drawn from (after temperature and top-p), so a rollout's
logprobs are exactly the "sampling" logprobs of the importance ratio.
`load_full` and `load_lora` switch the policy; the caller (serving.py) makes
sure no rollout is in flight while they run. Two implementations:
- `HFRolloutEngine` (hf_engine.py): transformers forwards, the reference.
- `VLLMRolloutEngine` (vllm_engine.py): vLLM's AsyncLLM, the production engine.

Choices shared by both:
1) A completion ends at the first EOS token (kept, with its logprob: the
   trainer learns when to stop) or at the token that completes a stop string
   (kept; `text` ends before the stop string), else after `max_tokens`.
2) `text` is the completion decoded without special tokens.
3) A LoRA version applies on the weights serving at the time of the swap
   (the base model or the last full version); a full version drops any adapter.
4) Temperatures below protocol.MIN_TEMPERATURE become 0: greedy decoding,
   reported with the model's logprobs at temperature 1, without top-p
   (vLLM's own rule for greedy requests; the hf engine follows it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opd.common.protocol import MIN_TEMPERATURE, RolloutRequest
from opd.common.settings import StudentSettings
from opd.common.tokenizer import load_tokenizer, tokenizer_fingerprint

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_request(cls, request: RolloutRequest) -> Sampling:
        return cls(
            n=request.n, max_tokens=request.max_tokens,
            temperature=0.0 if request.temperature < MIN_TEMPERATURE else request.temperature,
            top_p=request.top_p, seed=request.seed, stop=tuple(request.stop or ()),
        )


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str


class RolloutEngine(ABC):
    name: str
    # Whether adapters with a per-layer rank or alpha (peft's rank_pattern, alpha_pattern) are served exactly.
    lora_patterns: bool = True

    def __init__(self, settings: StudentSettings) -> None:
        self.settings = settings
        self.model_name = settings.model
        self.tokenizer = load_tokenizer(settings.model)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.vocab_size = 0
        self.max_model_len = 0

    @abstractmethod
    async def sample(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        """For each prompt, `sampling.n` completions (indexed [prompt][sample])."""

    @abstractmethod
    async def load_full(self, folder: Path) -> None:
        """Serve the full checkpoint in `folder` (already checked) from now on."""

    @abstractmethod
    async def load_lora(self, folder: Path, version: int) -> None:
        """Serve the current weights plus the LoRA adapter in `folder` (already checked) from now on."""

    def healthy(self) -> bool:
        """False once the engine can no longer serve (a vLLM engine that died)."""
        return True

    async def close(self) -> None:
        return None


def first_stop(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> int | None:
    """Length of the shortest prefix of `tokens` whose text holds a stop string, if any."""
    if not stops or not any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stops):
        return None
    lo, hi = 1, len(tokens)  # holding a stop string only grows with the prefix: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(tokens[:mid], skip_special_tokens=True) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cut_text(text: str, stops: tuple[str, ...]) -> str:
    """The text before the earliest stop string."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def build_engine(settings: StudentSettings) -> RolloutEngine:
    if settings.engine == "hf":
        from opd.student.hf_engine import HFRolloutEngine

        return HFRolloutEngine(settings)
    from opd.student.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(settings)
