"""The teacher's scoring engines behind one small interface.

`ScoringEngine.score` takes whole token sequences with the position scoring
starts at and returns the log-probability of every token from there on (and
optionally the top-k alternatives and each token's rank in the vocabulary,
which vLLM's OpenAI-compatible answers carry). Two implementations:
- `HFScoringEngine` here: transformers + torch, micro-batched by a token
  budget (on CUDA sized from free memory: services/common/hf.py); the reference the vLLM engine is tested against. Each micro-batch
  is one turn on the engine's worker thread (services/common/worker.py), so
  requests in flight take turns round robin: a request of many sequences
  cannot hold back a small one until it is done, and a cancelled request
  stops after the micro-batch running.
- `VLLMScoringEngine` (vllm_engine.py): vLLM's AsyncLLM, prompt logprobs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from opd.common.settings import TeacherSettings
from opd.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from opd.common.worker import Worker


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
        self.max_sequence_len = 0  # the longest sequence it scores (prompt and completion)

    @abstractmethod
    async def score(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]: ...

    def supports_temperature(self, temperature: float) -> bool:
        return True

    def healthy(self) -> bool:
        """False once the engine can no longer score (a vLLM engine that died)."""
        return True

    async def close(self) -> None:
        return None


class HFScoringEngine(ScoringEngine):
    name = "hf"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        from opd.common.hf import bytes_per_token, load_causal_lm

        self.model = load_causal_lm(settings.model, settings.dtype, settings.device)
        self.bytes_per_token = bytes_per_token(self.model)  # logits for every token
        config = self.model.config
        self.vocab_size = min(config.vocab_size, len(self.tokenizer))
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = self.max_sequence_len = min(settings.max_model_len or limit, limit)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.worker = Worker("opd-teacher-hf")

    def _batches(self, jobs: list[ScoreJob]) -> list[list[int]]:
        from opd.common.hf import batch_token_budget, token_budget_batches

        budget = batch_token_budget(self.model, self.settings.micro_batch_tokens, self.bytes_per_token)
        return list(token_budget_batches([len(j.token_ids) for j in jobs], budget))

    async def score(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]:
        outputs: list[ScoreOutput] = [None] * len(jobs)  # type: ignore[list-item]
        for batch in self._batches(jobs):
            scored = await self.worker.run(self._score_batch, [jobs[i] for i in batch], top_k, temperature, ranks)
            for i, out in zip(batch, scored, strict=True):
                outputs[i] = out
        return outputs

    def score_sync(
        self, jobs: list[ScoreJob], top_k: int = 0, temperature: float = 1.0, ranks: bool = False
    ) -> list[ScoreOutput]:
        """`score` in the calling thread (tests, benchmarks)."""
        outputs: list[ScoreOutput] = [None] * len(jobs)  # type: ignore[list-item]
        for batch in self._batches(jobs):
            scored = self._score_batch([jobs[i] for i in batch], top_k, temperature, ranks)
            for i, out in zip(batch, scored, strict=True):
                outputs[i] = out
        return outputs

    def _score_batch(self, jobs: list[ScoreJob], top_k: int, temperature: float, ranks: bool = False) -> list[ScoreOutput]:
        import torch

        from opd.common.hf import token_logprobs

        with torch.inference_mode():
            scored = token_logprobs(
                self.model, [j.token_ids for j in jobs], [j.start for j in jobs],
                temperature=temperature, top_k=top_k, pad_id=self.pad_id, ranks=ranks, exact_normaliser=True,
            )
        outputs = []
        for chosen, values, indices, rank, _ in scored:
            top = None
            if values is not None and indices is not None:
                top = [list(zip(ix, vs, strict=True)) for ix, vs in zip(indices.tolist(), values.tolist(), strict=True)]
            outputs.append(ScoreOutput(chosen.tolist(), top, rank.tolist() if rank is not None else None))
        return outputs

    async def close(self) -> None:
        self.worker.close()


def build_engine(settings: TeacherSettings) -> ScoringEngine:
    if settings.engine == "hf":
        return HFScoringEngine(settings)
    from opd.teacher.vllm_engine import VLLMScoringEngine

    return VLLMScoringEngine(settings)
