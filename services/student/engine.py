"""The student's rollout engines behind one small interface.

`RolloutEngine.sample` takes prompts as token ids and returns, per prompt,
`n` completions with the log-probability of every sampled token under the
distribution it was drawn from (after temperature and top-p), so a rollout's
logprobs are exactly the "sampling" logprobs of the importance ratio.
`load_full` and `load_lora` switch the policy; the caller (serving.py) makes
sure no rollout is in flight while they run. Two implementations:
- `HFRolloutEngine` here: transformers `generate`, the reference.
- `VLLMRolloutEngine` (vllm_engine.py): vLLM's AsyncLLM, the production engine.

Choices shared by both:
1) A completion ends at the first EOS token (kept, with its logprob: the
   trainer learns when to stop) or at the token that completes a stop string
   (kept; `text` ends before the stop string), else after `max_tokens`.
2) `text` is the completion decoded without special tokens.
3) A LoRA version applies on the weights serving at the time of the swap
   (the base model or the last full version); a full version drops any adapter.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.protocol import RolloutRequest
from services.common.settings import StudentSettings
from services.common.tokenizer import load_tokenizer, tokenizer_fingerprint

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
            n=request.n, max_tokens=request.max_tokens, temperature=request.temperature,
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


@contextmanager
def seeded(seed: int | None, device) -> Iterator[None]:
    """Draws inside come from `seed` when given, without disturbing the global random state."""
    import torch

    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFRolloutEngine(RolloutEngine):
    """transformers `generate`, micro-batched by a token budget, one batch at a time.

    - Sampling is `generate`'s own: temperature, then top-p, top-k off; the
      per-step processed scores give the logprobs (memory per micro-batch:
      rows x max_tokens x vocabulary floats).
    - With a seed, the whole request draws from one seeded generator, so the
      same request gives the same rollouts (not the same ones as vLLM, which
      seeds each rollout on its own).
    - A swap builds the new policy beside the old one and then switches to
      it: a failed load leaves the old version serving.
    """

    name = "hf"

    def __init__(self, settings: StudentSettings) -> None:
        super().__init__(settings)
        from services.common.hf import load_causal_lm

        model = load_causal_lm(settings.model, settings.dtype, settings.device)
        config = model.config
        self.vocab_size = min(config.vocab_size, len(self.tokenizer))
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(settings.max_model_len or limit, limit)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {*eos, self.tokenizer.eos_token_id} - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.model = self.base = self._plain(model)  # base: the weights a LoRA version applies to
        # A thread lock, not an asyncio one: the engine may be shared by apps on different event loops (tests).
        self._lock = threading.Lock()

    def _plain(self, model):
        """The model with generation defaults of its own removed: `generate` fills the fields a request leaves
        unset from them (a repetition penalty, say), and vLLM does not: only the request shapes the distribution."""
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
        return model

    @property
    def device(self):
        return next(self.model.parameters()).device

    async def sample(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        return await asyncio.to_thread(self.sample_sync, prompts_P, sampling)

    def sample_sync(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        import torch

        from services.common.hf import token_budget_batches

        rows = [i for i in range(len(prompts_P)) for _ in range(sampling.n)]
        lengths = [len(prompts_P[i]) + sampling.max_tokens for i in rows]
        out: list[Sample | None] = [None] * len(rows)
        with self._lock, torch.inference_mode(), seeded(sampling.seed, self.device):
            for batch in token_budget_batches(lengths, self.settings.micro_batch_tokens):
                samples = self._generate([prompts_P[rows[r]] for r in batch], sampling)
                for r, sample in zip(batch, samples, strict=True):
                    out[r] = sample
        n = sampling.n
        return [out[i * n : (i + 1) * n] for i in range(len(prompts_P))]  # type: ignore[misc]

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Sample]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[b, width - len(p) :] = torch.as_tensor(p)
            mask[b, width - len(p) :] = 1
        config = GenerationConfig(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
            max_new_tokens=sampling.max_tokens, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            output_scores=True, return_dict_in_generate=True,
        )
        criteria = StoppingCriteriaList([StopOnText(self.tokenizer, width, sampling.stop)] if sampling.stop else [])
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            generation_config=config, stopping_criteria=criteria,
        )
        new = out.sequences[:, width:].cpu()
        # scores[t] are the logits after temperature and top-p: the distribution token t was drawn from.
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), dim=-1).gather(-1, new[:, t : t + 1].to(s.device)).squeeze(-1).cpu()
             for t, s in enumerate(out.scores)],
            dim=1,
        )
        return [self._finish(new[b].tolist(), logprobs[b].tolist(), sampling) for b in range(len(prompts))]

    def _finish(self, tokens: list[int], logprobs: list[float], sampling: Sampling) -> Sample:
        end = next((j + 1 for j, t in enumerate(tokens) if t in self.eos_ids), None)
        stop_end = first_stop(self.tokenizer, tokens[: end or len(tokens)], sampling.stop)
        if stop_end is not None:
            end = stop_end
        reason: FinishReason = "stop" if end is not None else "length"
        end = end if end is not None else sampling.max_tokens
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        return Sample(tokens[:end], logprobs[:end], reason, cut_text(text, sampling.stop))

    async def load_full(self, folder: Path) -> None:
        await asyncio.to_thread(self._load_full_sync, folder)

    def _load_full_sync(self, folder: Path) -> None:
        from services.common.hf import load_causal_lm

        dtype = str(self.base.dtype).removeprefix("torch.")
        model = self._plain(load_causal_lm(str(folder), dtype, str(self.device)))
        with self._lock:
            self.base = self.model = model

    async def load_lora(self, folder: Path, version: int) -> None:
        await asyncio.to_thread(self._load_lora_sync, folder)

    def _load_lora_sync(self, folder: Path) -> None:
        from peft import PeftModel

        # peft injects adapter layers into the model it is given: give it a copy, so the base stays clean.
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(folder)).eval()
        if self.settings.merge_lora:  # W + scale * B @ A: sampling at the plain model's speed
            model = model.merge_and_unload()
        with self._lock:
            self.model = model


class StopOnText:
    """A `generate` stopping criterion: a row is done once its completion's text holds a stop string."""

    def __init__(self, tokenizer, prompt_width: int, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.width, self.stops = tokenizer, prompt_width, stops

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


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
        return HFRolloutEngine(settings)
    from services.student.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(settings)
