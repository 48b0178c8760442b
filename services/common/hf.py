"""transformers + torch pieces shared by the hf engines and the trainer.

`token_logprobs` is the one place where opd turns a causal LM's logits into
per-token log-probabilities: the teacher's hf engine scores with it, the
student's hf engine checks samples with it, and the trainer differentiates
through it. Choices:
1) Right padding with an attention mask; positions are ordinary 0..n-1 per row.
2) Only the logits from the earliest scored position on are computed
   (`logits_to_keep`), so long prompts do not pay for a vocabulary-sized
   projection they never use.
3) log_softmax in float32, whatever the model's dtype. The teacher scores
   with `exact_normaliser`: the normaliser (the logsumexp over the
   vocabulary) summed in float64 and each returned logprob rounded once to
   float32. A float32 logsumexp depends on the order it sums the vocabulary
   in: SmolLM2 with its vocabulary permuted gives bitwise the same logits
   under the new ids, but float32 log-probabilities up to 1.1e-5 apart,
   which a run amplifies (docs/other-tokenizers.md). In float64 the result
   is the correctly rounded one but for rare ties, the same in any order.
   No V-wide output is built (the chosen token's and the top-k's values
   are gathered from the logits), so it costs a float64 copy of 256
   positions' logits at a time, and no gradient flows.
4) With `top_p` < 1 the logprobs are those of the nucleus distribution the
   student samples from (vLLM's and transformers' top-p: the smallest set of
   top tokens whose probability reaches `top_p`, renormalised), so the
   trainer's importance ratio compares like with like. The nucleus is chosen
   without gradient (it is piecewise constant); the scored token always
   counts as inside it, so a token sampled at the nucleus' edge never gets
   log 0 from a last-bit difference between engines.
5) Batches are sized for the device (`batch_token_budget`): a fixed token
   budget on a CPU; on CUDA from the memory free when a request starts, so a
   whole rollout or scoring request runs as one batch where it fits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, config_dtype: torch.dtype | str | None = None) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    return config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32


def load_causal_lm(model: str, dtype: str = "auto", device: str = "auto") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    return lm.to(resolve_device(device)).eval()


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class TokenScores(NamedTuple):
    """One sequence's scores: the chosen tokens' logprobs, optional top-k and ranks."""

    logprobs: torch.Tensor  # _T
    top_values: torch.Tensor | None  # _TK, None when top_k == 0
    top_ids: torch.Tensor | None  # _TK
    ranks: torch.Tensor | None  # _T, None unless asked for
    buckets: torch.Tensor | None = None  # _TK1, None unless bucket_ids were given


def token_logprobs(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    pad_id: int = 0,
    ranks: bool = False,
    bucket_ids: Sequence[Sequence[Sequence[int]] | torch.Tensor] | None = None,
    exact_normaliser: bool = False,
) -> list[TokenScores]:
    """For each sequence, log p(seq[j] | seq[:j]) for j in [start, len).

    With `ranks`, also each chosen token's rank in the vocabulary (1 = most
    likely; ties count against it, as in vLLM). With `bucket_ids` (per
    sequence a T x K list or tensor of ids: a teacher's top-k at each scored
    position), also the log-probabilities of the K + 1 buckets those ids and
    the tail make (topk.student_buckets, choice 6), taken from the full
    distribution at `temperature`, WITHOUT the top-p mask; an id -1 is an
    absent entry, never gathered (its bucket -inf, topk.py choice 9).
    Gradients flow when the caller enables them, except with
    `exact_normaliser` (choice 3: the teacher's scores; not with top_p or
    bucket_ids).
    """
    assert not exact_normaliser or (top_p == 1.0 and bucket_ids is None), "exact_normaliser scores the full distribution"
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id, device)
    first = min(starts) - 1
    keep = ids.shape[1] - first
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    out = []
    for b, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        rows = logits[b, start - 1 - first : len(seq) - 1 - first].float()
        target = ids[b, start : len(seq)]
        if temperature != 1.0:
            rows = rows / temperature
        if exact_normaliser:
            out.append(exactly_normalised(rows.detach(), target, top_k, ranks))
            continue
        full = rows
        if top_p < 1.0:
            rows = rows.masked_fill(outside_nucleus(rows.detach(), top_p, target), float("-inf"))
        logp = torch.log_softmax(rows, dim=-1)
        chosen = logp.gather(-1, target[:, None]).squeeze(-1)
        values, indices = logp.topk(top_k, dim=-1) if top_k else (None, None)
        rank = (logp >= chosen[:, None]).sum(-1) if ranks else None
        buckets = None
        if bucket_ids is not None:
            from opd.trainer.topk import student_buckets

            logp_full = logp if full is rows else torch.log_softmax(full, dim=-1)
            top_TK = torch.as_tensor(bucket_ids[b], dtype=torch.long, device=device)
            buckets = student_buckets(logp_full[None], top_TK[None], (top_TK >= 0)[None])[0]
        out.append(TokenScores(chosen, values, indices, rank, buckets))
    return out


NORMALISER_ROWS = 256  # positions whose logits are in float64 at once (choice 3)


def float64_logsumexp(rows_TV: torch.Tensor) -> torch.Tensor:
    """lse_T, the normaliser of each row summed in float64, NORMALISER_ROWS rows at a time (choice 3)."""
    return torch.cat([torch.logsumexp(part.double(), dim=-1) for part in rows_TV.split(NORMALISER_ROWS)]) \
        if len(rows_TV) else rows_TV.new_zeros(0, dtype=torch.float64)


def float64_log_softmax(rows_TV: torch.Tensor) -> torch.Tensor:
    """log_softmax of each row normalised in float64, rounded once to float32 (choice 3; the teacher's vLLM engine
    computes its logprobs with this, services/teacher/vllm_plugin.py)."""
    parts = [(wide - torch.logsumexp(wide, dim=-1, keepdim=True)).float()
             for wide in (part.double() for part in rows_TV.split(NORMALISER_ROWS))]
    return torch.cat(parts) if parts else rows_TV.float()


def exactly_normalised(rows_TV: torch.Tensor, target_T: torch.Tensor, top_k: int, ranks: bool) -> TokenScores:
    """The chosen tokens' logprobs (and the top-k, ranks) of float32 logits, normalised in float64 (choice 3)."""
    lse_T = float64_logsumexp(rows_TV)
    chosen_T = rows_TV.gather(-1, target_T[:, None]).squeeze(-1)
    values, indices = rows_TV.topk(top_k, dim=-1) if top_k else (None, None)
    rank = (rows_TV >= chosen_T[:, None]).sum(-1) if ranks else None
    as_logprobs = lambda x: (x.double() - (lse_T if x.dim() == 1 else lse_T[:, None])).float()  # noqa: E731
    return TokenScores(as_logprobs(chosen_T), None if values is None else as_logprobs(values), indices, rank)


def outside_nucleus(rows_TV: torch.Tensor, top_p: float, keep_T: torch.Tensor) -> torch.Tensor:
    """True for the tokens top-p sampling drops: sorted ascending, those whose cumulative
    probability stays <= 1 - top_p (the most likely token always stays), as vLLM and
    transformers compute it; `keep_T`, the token scored at each position, is never dropped."""
    sorted_TV, order_TV = rows_TV.sort(dim=-1)
    cumulative_TV = sorted_TV.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted_TV = cumulative_TV <= 1 - top_p
    drop_sorted_TV[:, -1] = False
    drop_TV = torch.zeros_like(drop_sorted_TV).scatter(-1, order_TV, drop_sorted_TV)
    drop_TV[torch.arange(len(keep_T), device=drop_TV.device), keep_T] = False
    return drop_TV


CPU_BATCH_TOKENS = 8192  # padded tokens per forward on a CPU, where memory is not what limits a batch
CUDA_MEMORY_SHARE = 0.5  # of the memory free when a request starts: the stack's other processes share the device


def batch_token_budget(
    model: torch.nn.Module, configured: int | None, bytes_per_token: int, cpu: int = CPU_BATCH_TOKENS
) -> int:
    """Padded tokens per forward: `configured` where given; else `cpu` on a CPU, and on CUDA as many as
    CUDA_MEMORY_SHARE of the device's free memory holds at `bytes_per_token` (a whole request, where it fits)."""
    if configured is not None:
        return configured
    device = next(model.parameters()).device
    if device.type != "cuda":
        return cpu
    free, _ = torch.cuda.mem_get_info(device)
    return max(cpu, int(free * CUDA_MEMORY_SHARE) // bytes_per_token)


def bytes_per_token(model: torch.nn.Module, *, kv_cache: bool = False, vocab_rows: int = 1, training: bool = False) -> int:
    """A forward's memory per token, roughly: a few layers' activations (the widest of hidden and MLP sizes;
    with `training`, every layer's, kept for the backward pass), `vocab_rows` rows of vocabulary-sized logits
    (the model's dtype and float32 copies), and with `kv_cache` every layer's keys and values."""
    c = model.config
    size = next(model.parameters()).element_size()
    hidden = c.hidden_size
    width = max(hidden, getattr(c, "intermediate_size", 0) or 4 * hidden)
    layers = c.num_hidden_layers if training else 1
    per_token = 16 * width * size * layers + vocab_rows * c.vocab_size * (size + 4 * (3 if training else 1))
    if kv_cache:
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        per_token += 2 * c.num_hidden_layers * kv_heads * head_dim * size
    return per_token


def token_budget_batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices grouped so that (longest in group) * (group size) <= budget; longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and width * (len(batch) + 1) > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
