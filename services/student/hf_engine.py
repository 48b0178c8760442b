"""The student's hf engine: transformers forwards, its own decoding loop, fair turns.

Choices:
1) Each request's rollouts are micro-batched by a token budget
   (prompt + max_tokens per row); a micro-batch is prefilled once (left
   padding, its KV cache kept) and then decoded a token per forward.
2) Fair service: a micro-batch decodes `turn_tokens` tokens per turn on the
   engine's one worker thread, then queues again (services/common/worker.py).
   Requests in flight take turns round robin, so a long request slows others
   down but never holds them back until it is done; a cancelled request
   stops within one turn.
3) Tokens are chosen by services/student/sampling.py: greedy below the
   temperature floor, else temperature and top-p; the logprob reported is the
   chosen token's under the distribution it was chosen from.
4) With a seed, rollout j of prompt i draws from its own generator, seeded
   `seed + i*n + j` as vLLM seeds its rollouts (vLLM's draws differ all the
   same): a rollout depends on its prompt and its seed only, not on the
   request's other prompts or its micro-batch, so the same request gives the
   same rollouts whatever else the engine serves, and a request split in two
   (prompts [a, b) seeded `seed + a*n`) gives the same rollouts as the whole.
5) A swap builds the new policy beside the old one and then switches to it:
   a failed load leaves the old version serving.
6) Memory: each request in flight holds the KV cache of one micro-batch at
   most (`micro_batch_tokens` tokens; on CUDA by default as many as half the
   free memory holds: a whole request where it fits), so `max_pending`
   bounds the total.
7) On CUDA, decoding checks whether every row has finished once per turn,
   not once per token (the check waits for the device), and each decode
   step is one CUDA graph replay (services/student/cuda_graphs.py; off with
   `cuda_graphs=False`). On a CPU every step runs as it always has.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd.common.settings import StudentSettings
from opd.common.worker import Worker
from opd.student.cuda_graphs import GraphDecoder, GraphPool
from opd.student.engine import FinishReason, RolloutEngine, Sample, Sampling, cut_text, first_stop
from opd.student.sampling import next_tokens

log = logging.getLogger("opd.student")

@dataclass
class Decoding:
    """One micro-batch between turns: its KV cache and what each row has so far."""

    sampling: Sampling
    uniforms: torch.Tensor  # [B, max_tokens]: each row's draw for each token (sampling.py)
    cache: object
    mask: torch.Tensor  # [B, prompt width + generated]
    logits: torch.Tensor  # [B, V]: the next token's
    finished: torch.Tensor  # [B] bool
    graph: GraphDecoder | None = None  # CUDA: the decoder whose graph runs each step
    tokens: list[torch.Tensor] = field(default_factory=list)  # per step, [B]
    logprobs: list[torch.Tensor] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.sampling.max_tokens or bool(self.finished.all())


class HFRolloutEngine(RolloutEngine):
    name = "hf"

    def __init__(self, settings: StudentSettings) -> None:
        super().__init__(settings)
        from opd.common.hf import bytes_per_token, load_causal_lm

        model = load_causal_lm(settings.model, settings.dtype, settings.device)
        self.bytes_per_token = bytes_per_token(model, kv_cache=True, vocab_rows=0)
        config = model.config
        self.vocab_size = min(config.vocab_size, len(self.tokenizer))
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(settings.max_model_len or limit, limit)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {*eos, self.tokenizer.eos_token_id} - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.model = self.base = model.eval()  # base: the weights a LoRA version applies to
        self.worker = Worker("opd-student-hf")
        self.on_cuda = self.device.type == "cuda"
        self.graphs = GraphPool() if self.on_cuda and settings.cuda_graphs else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    async def sample(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        from opd.common.hf import batch_token_budget, token_budget_batches

        rows = [i for i in range(len(prompts_P)) for _ in range(sampling.n)]
        lengths = [len(prompts_P[i]) + sampling.max_tokens for i in rows]
        uniforms_RT = draws(len(rows), sampling)
        out: list[Sample | None] = [None] * len(rows)
        budget = batch_token_budget(self.model, self.settings.micro_batch_tokens, self.bytes_per_token)
        for batch in token_budget_batches(lengths, budget):
            d = await self.worker.run(self._prefill, [prompts_P[rows[r]] for r in batch], sampling, uniforms_RT[batch])
            try:
                while not d.done:
                    await self.worker.run(self._decode, d, self.settings.turn_tokens)
            finally:
                if d.graph is not None and self.graphs is not None:  # after any turn still running
                    self.worker.later(self.graphs.give_back, d.graph)
            for r, sample in zip(batch, self._samples(d), strict=True):
                out[r] = sample
        n = sampling.n
        return [out[i * n : (i + 1) * n] for i in range(len(prompts_P))]  # type: ignore[misc]

    def sample_sync(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        """`sample` for callers without an event loop (tests, benchmarks)."""
        return asyncio.run(self.sample(prompts_P, sampling))

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]], sampling: Sampling, uniforms_BT: torch.Tensor) -> Decoding:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[b, width - len(p) :] = torch.as_tensor(p)
            mask[b, width - len(p) :] = 1
        ids, mask, uniforms_BT = ids.to(self.device), mask.to(self.device), uniforms_BT.to(self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        graph = self._graph_prefill(ids, mask, sampling.max_tokens)
        if graph is not None:
            d = Decoding(sampling, uniforms_BT, None, mask, graph[1], finished, graph[0])
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            d = Decoding(sampling, uniforms_BT, out.past_key_values, mask, out.logits[:, -1], finished)
        self._decode(d, self.settings.turn_tokens)
        return d

    def _graph_prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[GraphDecoder, torch.Tensor] | None:
        """On CUDA: the prompts prefilled into a graph decoder's cache, and their next-token logits."""
        if self.graphs is None or self.graphs.failed:
            return None
        decoder = self.graphs.take(self.model, ids.shape[0], GraphPool.length(ids.shape[1], max_tokens))
        try:
            return decoder, decoder.prefill(self.model, ids, mask)
        except Exception:  # a model transformers runs some other way: decode without graphs from now on
            log.warning("CUDA graph decoding failed; the student decodes without graphs", exc_info=True)
            self.graphs.failed = True
            return None

    @torch.inference_mode()
    def _decode(self, d: Decoding, steps: int) -> None:
        """Up to `steps` more tokens of every unfinished row."""
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        for _ in range(steps):
            uniform_B = d.uniforms[:, len(d.tokens)]
            token_B, logprob_B = next_tokens(d.logits, d.sampling.temperature, d.sampling.top_p, uniform_B)
            token_B = token_B.masked_fill(d.finished, self.pad_id)
            d.tokens.append(token_B)
            d.logprobs.append(logprob_B)
            d.finished |= torch.isin(token_B, eos)
            if d.sampling.stop:
                self._stop_rows(d)
            if len(d.tokens) >= d.sampling.max_tokens or (not self.on_cuda and d.done):
                return  # on CUDA, whether all rows finished is asked once per turn (sample), not per token
            if d.graph is not None:
                d.logits = d.graph.step(token_B)
                continue
            d.mask = torch.cat([d.mask, torch.ones_like(d.mask[:, :1])], dim=1)
            positions = d.mask.sum(-1, keepdim=True) - 1
            out = self.model(
                input_ids=token_B[:, None], attention_mask=d.mask, position_ids=positions,
                past_key_values=d.cache, use_cache=True,
            )
            d.cache, d.logits = out.past_key_values, out.logits[:, -1]

    def _stop_rows(self, d: Decoding) -> None:
        so_far = torch.stack(d.tokens, dim=1).tolist()
        for b in (~d.finished).nonzero().flatten().tolist():
            text = self.tokenizer.decode(so_far[b], skip_special_tokens=True)
            if any(s in text for s in d.sampling.stop):
                d.finished[b] = True

    def _samples(self, d: Decoding) -> list[Sample]:
        tokens = torch.stack(d.tokens, dim=1).tolist()
        logprobs = torch.stack(d.logprobs, dim=1).float().tolist()
        return [self._finish(t, lp, d.sampling) for t, lp in zip(tokens, logprobs, strict=True)]

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
        from opd.common.hf import load_causal_lm

        dtype = str(self.base.dtype).removeprefix("torch.")
        model = load_causal_lm(str(folder), dtype, str(self.device))
        self.base = self.model = model

    async def load_lora(self, folder: Path, version: int) -> None:
        await asyncio.to_thread(self._load_lora_sync, folder)

    def _load_lora_sync(self, folder: Path) -> None:
        from peft import PeftModel

        # peft injects adapter layers into the model it is given: give it a copy, so the base stays clean.
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(folder)).eval()
        if self.settings.merge_lora:  # W + scale * B @ A: sampling at the plain model's speed
            model = model.merge_and_unload()
        self.model = model

    async def close(self) -> None:
        self.worker.close()


def draws(rows: int, sampling: Sampling) -> torch.Tensor:
    """[rows, max_tokens] uniform numbers: row r's from a generator seeded seed + r (unseeded: random ones)."""
    if sampling.seed is None:
        generator = torch.Generator()
        generator.seed()  # its own, non-deterministic: torch's global generator is left alone
        return torch.rand(rows, sampling.max_tokens, generator=generator)
    return torch.stack([torch.rand(sampling.max_tokens, generator=torch.Generator().manual_seed(sampling.seed + r))
                        for r in range(rows)]) if rows else torch.empty(0, sampling.max_tokens)
