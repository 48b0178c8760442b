"""One training step's update of the trainable student from scored samples.

Choices:
1) Advantages are computed once per step from the sampler's and the teacher's
   logprobs (they do not depend on the trainable weights): the KL advantage
   per token, plus the optional task reward, group-centered over the samples
   of one prompt and added to every token of its sample. The `rl` objective
   uses the centred reward alone; `sft` uses no advantage but the
   log-likelihood of the (teacher's) tokens (objectives.py).
2) The step's samples are split into `substeps` contiguous chunks, one
   optimizer step each; each chunk is run in micro-batches of at most
   `micro_batch_tokens` padded tokens (by default 4096 on a CPU; on CUDA
   sized from free memory) with gradients accumulated, and its loss is
   normalised by the chunk's completion tokens.
3) A chunk whose loss or gradient norm is NaN or infinite takes no optimizer
   step (policy.py): its gradient is dropped, the weights, the optimizer
   state and the schedule stay as they were, and the step reports it in
   `skipped_updates`, so a NaN never reaches the weights the student serves.
4) Under torchrun every rank gets the whole step and trains its share of each
   chunk (`Parallel.share`: sequences dealt longest first to the rank with
   the fewest tokens so far). The loss is still normalised by the
   whole chunk's tokens and multiplied by the number of ranks, because FSDP
   averages the ranks' gradients: the update is one process's. Every rank
   runs as many micro-batches as the busiest (FSDP's collectives pair up),
   the idle ones on a one-token stand-in whose loss is 0; losses and ratio
   statistics are gathered, so every rank takes the same skip decision. The
   record says how the work was split: `rank_tokens/<rank>` and
   `idle_micro_batches` (stand-in passes over every rank).
5) `loss.distill` topk_forward / topk_reverse (objective opd): the student's
   K + 1 buckets of the teacher's top-k and the tail come from its full
   distribution at the sampling temperature, without the top-p mask
   (hf.token_logprobs, topk.py choice 6); the teacher's buckets take the
   student's vocabulary size, and for reverse KL a tail floor of 1e-6 (a
   confident teacher's tail rounds to 0, where reverse KL would be +inf).
   The loss is (1 - topk_weight) * the sampled loss (today's, importance
   sampling or PPO) + topk_weight * the mean bucket KL per completion token.
   The records gain `topk_kl` (mean per token), `topk_mass` (the teacher's
   top-k mass, mean per token), `topk_misses` (sampled tokens outside the
   teacher's top-k), `topk_unaligned` (tokens whose position had no usable
   top-k, below) and `sampled_loss` (the sampled part, as `loss` is
   reported); with `sampled` nothing changes, the records included.
   A teacher of another tokenizer (aligned.py choice 4) gives its top-k in
   student ids, -1 for an entry with no student token of its bytes (an
   absent bucket, topk.py choice 9). A position whose entries are all absent
   (every position of a sample the teacher scored in chunks of several
   tokens) has no usable top-k: it is masked out of the bucket KL, adds 0 to
   it (and to `topk_kl` and `topk_mass`, still means over every completion
   token), is no miss, and counts in `topk_unaligned`. With topk_weight 1
   such positions train from nothing; mix in the sampled loss there
   (topk_weight < 1), which scores every token through its chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from opd.common.hf import batch_token_budget, bytes_per_token, token_budget_batches
from opd.trainer import loss as L
from opd.trainer import topk as T
from opd.trainer.config import RunConfig
from opd.trainer.parallel import Parallel
from opd.trainer.rollouts import Sample

log = logging.getLogger("opd.trainer")
TAIL_FLOOR = 1e-6  # topk_reverse: a teacher tail read as at least this (topk.py choice 5), else +inf where it rounds to 0


class Policy(Protocol):
    """What the update needs of the trainable student (policy.Policy is one; this module does not import it)."""

    model: torch.nn.Module
    parallel: Parallel  # one process or N: who trains which sequences (parallel.py)
    pad_id: int

    @property
    def lr(self) -> float: ...

    def logprobs(self, seqs: Sequence[Sequence[int]], starts: Sequence[int], temperature: float = 1.0,
                 top_p: float = 1.0, bucket_ids: Sequence[Any] | None = None,
                 ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def optimizer_step(self, finite_loss: bool = True) -> float: ...
CPU_BATCH_TOKENS = 4096  # padded tokens per training forward on a CPU (on CUDA: from free memory)


def task_rewards(samples: list[Sample], reward_fn: Callable[[dict, str], float]) -> tuple[list[float], list[float]]:
    """reward_fn per sample: (raw, centered within each group of samples of one prompt)."""
    raw = torch.tensor([float(reward_fn(s.row, s.text)) for s in samples])
    centered = torch.zeros_like(raw)
    for group in sorted({s.group for s in samples}):
        idx = torch.tensor([i for i, s in enumerate(samples) if s.group == group])
        centered[idx] = L.group_centered(raw[idx])
    return raw.tolist(), centered.tolist()


def advantages(samples: list[Sample], config: RunConfig, rewards: list[float] | None) -> list[torch.Tensor]:
    """Per sample, A_t over its completion tokens."""
    sampling_BT, mask_BT = L.pad_right([torch.tensor(s.sampling_logprobs) for s in samples])
    if config.objective == "sft":
        return [torch.zeros(len(s.token_ids)) for s in samples]
    if config.objective == "rl":
        assert rewards is not None, "the rl objective trains on task rewards"
        adv_BT = L.reward_advantages(torch.tensor(rewards), mask_BT)
        return [adv_BT[b, : len(s.token_ids)] for b, s in enumerate(samples)]
    teacher_BT, _ = L.pad_right([torch.tensor(s.teacher_logprobs) for s in samples])
    rkl_BT = L.reverse_kl(sampling_BT, teacher_BT, mask_BT)
    adv_BT = L.kl_advantages(rkl_BT, mask_BT, config.kl_coef, config.kl_discount)
    if rewards is not None:
        adv_BT = adv_BT + torch.tensor(rewards)[:, None] * mask_BT
    return [adv_BT[b, : len(s.token_ids)] for b, s in enumerate(samples)]


def chunk_loss(
    policy: Policy, samples: list[Sample], adv_B: list[torch.Tensor], config: RunConfig, num_tokens: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (normalised by the whole chunk's tokens) and its ratio statistics."""
    seqs = [s.prompt_ids + s.token_ids for s in samples]
    starts = [len(s.prompt_ids) for s in samples]
    sampling = config.sampling  # the distribution the student drew from: temperature and nucleus
    topk = config.objective == "opd" and config.loss.distill != "sampled"
    if topk:
        logprobs, buckets = policy.logprobs(seqs, starts, sampling.temperature, sampling.top_p,
                                            bucket_ids=[teacher_topk(s, policy)[0] for s in samples])
    else:
        logprobs = policy.logprobs(seqs, starts, sampling.temperature, sampling.top_p)
    logprobs_BT, mask_BT = L.pad_right(logprobs)
    device = logprobs_BT.device  # the loss is computed where the model is
    sampling_BT, _ = L.pad_right([torch.tensor(s.sampling_logprobs, device=device) for s in samples])
    adv_BT, _ = L.pad_right([a.to(device) for a in adv_B])
    if config.objective == "sft":
        loss = L.sft_loss(logprobs_BT, mask_BT, num_tokens)
    elif config.loss.kind == "ppo":
        loss = L.ppo_loss(logprobs_BT, sampling_BT, adv_BT, mask_BT, num_tokens, config.loss.clip_range)
    else:
        loss = L.importance_sampling_loss(logprobs_BT, sampling_BT, adv_BT, mask_BT, num_tokens)
    stats = L.ratio_stats(logprobs_BT.detach(), sampling_BT, mask_BT, config.loss.clip_range)
    stats["tokens"] = float(mask_BT.sum())
    if topk:
        loss, stats = topk_part(loss, stats, samples, buckets, mask_BT, config, num_tokens, policy)
    return loss, stats


def teacher_topk(s: Sample, policy: Policy) -> tuple[list[list[int]], list[list[float]]]:
    """A sample's teacher top-k (ids, logprobs), checked against the student's vocabulary."""
    if s.teacher_topk_ids is None or s.teacher_topk_logprobs is None:
        raise ValueError("loss.distill is a top-k loss but a sample carries no teacher top-k: score with top_k")
    vocab = student_vocab(policy)
    if any(i >= vocab for row in s.teacher_topk_ids for i in row):
        raise ValueError(f"the teacher's top-k names a token id beyond the student's vocabulary of {vocab}")
    return s.teacher_topk_ids, s.teacher_topk_logprobs


def student_vocab(policy: Policy) -> int:
    """The width of the student's output distribution (its logits), the V of the teacher's buckets."""
    output = policy.model.get_output_embeddings()
    return int(output.weight.shape[0]) if output is not None else int(policy.model.config.vocab_size)


def topk_part(sampled: torch.Tensor, stats: dict[str, float], samples: list[Sample], buckets: list[torch.Tensor],
              mask_BT: torch.Tensor, config: RunConfig, num_tokens: int, policy: Policy) -> tuple[torch.Tensor, dict[str, float]]:
    """Choice 5: the bucketed top-k KL of the micro-batch mixed with the sampled loss, and its statistics."""
    device = mask_BT.device
    forward = config.loss.distill == "topk_forward"
    logq_BTK1 = pad_sequence(buckets, batch_first=True)  # padding positions are masked (topk.py)
    ids_BTK = pad_sequence([torch.tensor(s.teacher_topk_ids, device=device) for s in samples], batch_first=True)  # id 0
    top_BTK = pad_sequence([torch.tensor(s.teacher_topk_logprobs, device=device) for s in samples], batch_first=True)
    valid_BTK = ids_BTK >= 0  # -1: absent, a teacher id of another tokenizer with no student counterpart (topk.py 9)
    logp_BTK1 = T.teacher_buckets(top_BTK, vocab_size=student_vocab(policy), tail_floor=0.0 if forward else TAIL_FLOOR,
                                  valid_BTK=valid_BTK)
    kept = mask_BT.bool()
    unaligned_BT = kept & ~valid_BTK.any(-1)  # no usable top-k at the position: it adds 0 to the KL
    topk_mask_BT = mask_BT.masked_fill(unaligned_BT, 0)
    kl_BT = (T.topk_forward_kl if forward else T.topk_reverse_kl)(logq_BTK1, logp_BTK1, topk_mask_BT)
    loss = T.mixed_loss(sampled, T.topk_loss(kl_BT, topk_mask_BT, num_tokens), config.loss.topk_weight)
    tokens_BT, _ = L.pad_right([torch.tensor(s.token_ids, device=device) for s in samples])
    miss_BT = ~T.sampled_in_topk(tokens_BT, ids_BTK, valid_BTK) & kept & ~unaligned_BT
    stats.update(topk_kl=float(kl_BT.detach()[kept].double().mean()) if kept.any() else 0.0,
                 topk_mass=float(T.topk_mass(logp_BTK1)[kept].double().mean()) if kept.any() else 0.0,
                 topk_misses=float(miss_BT.sum()), topk_unaligned=float(unaligned_BT.sum()),
                 sampled_loss=float(sampled.detach()))
    return loss, stats


def merge(stats: list[dict[str, float]], chunks: int = 1) -> dict[str, float]:
    """The micro-batches' statistics of a step's `chunks` optimizer steps: token-weighted means, extremes, and
    with a top-k loss the sampled loss as `loss` is (the mean over optimizer steps of each one's sum)."""
    if not stats:
        return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "clip_fraction": 0.0}
    tokens = sum(s["tokens"] for s in stats) or 1.0
    out = {
        "ratio_mean": sum(s["ratio_mean"] * s["tokens"] for s in stats) / tokens,
        "ratio_min": min(s["ratio_min"] for s in stats),
        "ratio_max": max(s["ratio_max"] for s in stats),
        "clip_fraction": sum(s["clip_fraction"] * s["tokens"] for s in stats) / tokens,
    }
    if "topk_kl" in stats[0]:  # a top-k loss (choice 5); the sampled loss alone records none of these
        out.update(topk_kl=sum(s["topk_kl"] * s["tokens"] for s in stats) / tokens,
                   topk_mass=sum(s["topk_mass"] * s["tokens"] for s in stats) / tokens,
                   topk_misses=sum(s["topk_misses"] for s in stats),
                   topk_unaligned=sum(s["topk_unaligned"] for s in stats),
                   sampled_loss=sum(s["sampled_loss"] for s in stats) / chunks)
    return out


def idle_loss(policy: Policy) -> torch.Tensor:
    """A rank with no sequences left still runs forward and backward (FSDP's collectives pair up): loss 0."""
    return policy.logprobs([[policy.pad_id, policy.pad_id]], [1])[0].sum() * 0.0


def accumulate(
    policy: Policy, samples: list[Sample], adv_B: list[torch.Tensor], config: RunConfig
) -> tuple[float, list[dict[str, float]], dict[str, int]]:
    """Gradients of one optimizer step's loss, summed over micro-batches; returns the loss, each micro-batch's stats
    and, under torchrun, each rank's work: `rank_tokens/<rank>` (prompt and completion tokens it trained on) and
    `idle_micro_batches` (stand-in passes, over every rank). Under torchrun: this rank's share of the chunk, and
    the loss and stats of every rank."""
    num_tokens = sum(len(s.token_ids) for s in samples)
    parallel = policy.parallel
    lengths = [len(s.prompt_ids) + len(s.token_ids) for s in samples]
    mine = parallel.share(lengths)
    budget = batch_token_budget(policy.model, config.student.micro_batch_tokens,
                                bytes_per_token(policy.model, training=True), cpu=CPU_BATCH_TOKENS)
    batches = [[mine[i] for i in batch] for batch in token_budget_batches([lengths[i] for i in mine], budget)]
    batches += [[]] * (parallel.micro_batches(len(batches)) - len(batches))
    scale = parallel.world  # FSDP averages over ranks; the loss is already a share of the whole
    total, stats = 0.0, []
    for batch in batches:
        if not batch:
            idle_loss(policy).backward()
            continue
        loss, batch_stats = chunk_loss(policy, [samples[i] for i in batch], [adv_B[i] for i in batch], config, num_tokens)
        (loss * scale if scale != 1 else loss).backward()
        total += loss.item()
        stats.append(batch_stats)
    every = parallel.gather((total, stats, sum(lengths[i] for i in mine), sum(not batch for batch in batches)))
    total, stats = sum(e[0] for e in every), [s for e in every for s in e[1]]
    work = {**{f"rank_tokens/{rank}": e[2] for rank, e in enumerate(every)}, "idle_micro_batches": sum(e[3] for e in every)}
    return total, stats, work if parallel.world > 1 else {}


def train_on(policy: Policy, samples: list[Sample], config: RunConfig, rewards: list[float] | None = None) -> dict[str, Any]:
    """Substeps of optimizer steps on the scored samples; returns loss, gradient norm, lr, ratio stats and skipped updates."""
    adv_all = advantages(samples, config, rewards)
    lr = policy.lr  # the rate this step's first optimizer step uses
    bounds = torch.linspace(0, len(samples), config.substeps + 1).round().long().tolist()
    losses, norms, stats, skipped, work = [], [], [], 0, {}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        total, chunk_stats, chunk_work = accumulate(policy, samples[lo:hi], adv_all[lo:hi], config)
        work = {k: work.get(k, 0) + v for k, v in chunk_work.items()}
        norm = policy.optimizer_step(finite_loss=math.isfinite(total))
        if not (math.isfinite(total) and math.isfinite(norm)):
            skipped += 1
            log.warning("update skipped: loss %s, gradient norm %s (not finite); the weights stay as they were", total, norm)
        losses.append(total)
        norms.append(norm)
        stats += chunk_stats
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), "lr": lr,
            "skipped_updates": skipped, **merge(stats, len(losses)), **work}
