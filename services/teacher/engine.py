"""The teacher's scoring engines behind one small interface.

`ScoringEngine.score` takes whole token sequences with the position scoring
starts at and returns the log-probability of every token from there on (and
optionally the top-k alternatives and each token's rank in the vocabulary,
which vLLM's OpenAI-compatible answers carry). Two implementations:
- `HFScoringEngine` here: transformers + torch, micro-batched by a token
  budget; the reference the vLLM engine is tested against.
- `VLLMScoringEngine` (vllm_engine.py): vLLM's AsyncLLM, prompt logprobs.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

from services.common.settings import TeacherSettings
from services.common.tokenizer import load_tokenizer, tokenizer_fingerprint


@dataclass(frozen=True)
class ScoreJob:
    token_ids: list[int]
    start: int


@dataclass
class ScoreOutput:
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ranks: list[int] | None = None


class ScoringEngine(ABC):
    name: str

    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings
        self.model_name = settings.model
        self.tokenizer = load_tokenizer(settings.model)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.vocab_size = 0
        self.max_model_len = 0

    @abstractmethod
    async def score(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]: ...

    def supports_temperature(self, temperature: float) -> bool:
        return True

    async def close(self) -> None:
        return None


class HFScoringEngine(ScoringEngine):
    name = "hf"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        from services.common.hf import load_causal_lm

        self.model = load_causal_lm(settings.model, settings.dtype, settings.device)
        config = self.model.config
        self.vocab_size = min(config.vocab_size, len(self.tokenizer))
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(settings.max_model_len or limit, limit)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._lock = asyncio.Lock()  # one forward at a time; requests queue in order

    async def score(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]:
        async with self._lock:
            return await asyncio.to_thread(self.score_sync, jobs, top_k, temperature, ranks)

    def score_sync(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]:
        import torch

        from services.common.hf import token_budget_batches, token_logprobs

        outputs: list[ScoreOutput | None] = [None] * len(jobs)
        budget = self.settings.micro_batch_tokens
        with torch.inference_mode():
            for batch in token_budget_batches([len(j.token_ids) for j in jobs], budget):
                scored = token_logprobs(
                    self.model,
                    [jobs[i].token_ids for i in batch],
                    [jobs[i].start for i in batch],
                    temperature=temperature,
                    top_k=top_k,
                    pad_id=self.pad_id,
                    ranks=ranks,
                )
                for i, (chosen, values, indices, rank) in zip(batch, scored, strict=True):
                    top = None
                    if values is not None and indices is not None:
                        top = [list(zip(ix, vs, strict=True)) for ix, vs in zip(indices.tolist(), values.tolist(), strict=True)]
                    outputs[i] = ScoreOutput(chosen.tolist(), top, rank.tolist() if rank is not None else None)
        return outputs  # type: ignore[return-value]


def build_engine(settings: TeacherSettings) -> ScoringEngine:
    if settings.engine == "hf":
        return HFScoringEngine(settings)
    from services.teacher.vllm_engine import VLLMScoringEngine

    return VLLMScoringEngine(settings)
