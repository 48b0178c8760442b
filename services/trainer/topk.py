"""Losses on the teacher's top-k: bucketed forward and reverse KL, as small pure functions on padded tensors.

Notation as in loss.py: `_B` sequences, `_T` token positions, `_V` the
student's vocabulary, `_K` the teacher's top-k at a position, `_K1` the K
buckets of those tokens and one tail bucket. Every `_BT` result comes with
`mask_BT` (1 on the completion tokens the student sampled); masked positions
may hold anything (NaN, inf, padding ids that are valid vocabulary ids) and
contribute exactly 0, with zero gradient.

Choices:
1) K + 1 buckets. At each position the vocabulary is split into the teacher's
   K top-k tokens and one tail bucket holding everything else; both the
   teacher and the student are read as distributions over these K + 1
   buckets (teacher tail: 1 - its top-k mass; student tail: its mass on the
   other V - K tokens). Both bucketed distributions sum to 1, so forward and
   reverse KL between them are exact KLs, never negative and 0 only when they
   agree. The truncated alternative, sum over the top-k alone of
   p_t (log p_t - log q_s), is no KL: it goes negative whenever the student
   puts more mass on the top-k than the teacher (verl RFC #7856 clamped it in
   415 of 467 steps). The bucketed KL is a lower bound of the full-vocabulary
   KL (coarse-graining never increases a KL) and equals it when K = V.
2) Forward KL[teacher || student] = sum_b p_t(b) (log p_t(b) - log q_s(b)) is
   mode-covering over the teacher's support: it pulls up every top-k token in
   proportion to the teacher's probability, and only the tail's total mass
   outside it. Reverse KL[student || teacher] = sum_b q_s(b) (log q_s(b) -
   log p_t(b)) is mode-seeking, the bucketed counterpart of the sampled-token
   estimate (loss.py choice 1): it penalises student mass where the teacher
   has little, but a bucket the student has nearly abandoned costs little
   (q log(q / p) -> 0 as q -> 0), so it need not pull such top-k tokens back
   up and can shrink the student's top-k mass (verl #5041 found top-k reverse
   KL unstable this way). Neither sees how the student spreads its mass
   within the tail. Both are minimised only where the buckets agree; which
   is better on a task is measured, not assumed (issue 41's study).
3) Each KL is computed as sum_b [b_b - a_b - a_b log(b_b / a_b)] for
   KL[a || b], which equals sum_b a_b log(a_b / b_b) because both sum to 1.
   Every term is a_b (e^d - 1 - d) >= 0 with d = log b_b - log a_b, computed
   as a_b (expm1(d) - d) (faithfully rounded, hence >= 0 in floating point
   too) or, for d > 1 where e^d could overflow, b_b - a_b (1 + d): the sum is
   never negative, not even by rounding, and there is no clamp. It also
   avoids the cancellation of p log p - p log q when the two are close. The
   gradient is that of the textbook formula (the two differ by
   sum_b b_b - sum_b a_b, constant on the simplex). Zero-probability buckets:
   a_b = 0 contributes b_b (the textbook 0 log 0 = 0, rewritten); b_b = 0 < a_b
   gives +inf, the exact value, and no NaN.
4) Gradients flow through the student's full softmax at every position: the
   top-k buckets are the student's log-probabilities gathered at the
   teacher's ids, the tail is the logsumexp of its log-probabilities over the
   complement (exact even when the tail mass is 1e-30, where
   log(1 - sum p) would cancel to log 0), so every logit receives gradient,
   including the tokens in the tail. The complement costs one more V-wide
   tensor per position, as large as the log-softmax itself. When the
   complement is empty (K = V) or holds only -inf, the tail is exactly -inf
   (probability 0), with zero gradient instead of logsumexp's NaN.
5) The teacher's tail is log(1 - sum exp(topk)), computed in float64 from
   the top-k's logsumexp S as log(-expm1(S)) (S near 0) or log1p(-exp(S)).
   A top-k whose mass rounds to more than 1 (S > 0) is renormalised to 1 and
   its tail is 0; with `vocab_size` = K it is renormalised always and its
   tail is exactly 0 (k = V: the bucketed KLs are the full-vocabulary KLs).
   A teacher with K < V whose reported mass rounds to 1 (a confident
   position: a logprob of -1e-10 reads 0.0 in float32) has tail 0 too, and
   then reverse KL is +inf wherever the student keeps any tail mass; give
   `tail_floor` (e.g. 1e-6, below the precision of the teacher's float32
   logprobs) to read such a tail as at least that much, the top-k scaled to
   1 - tail_floor. The default 0 keeps the buckets exactly as reported.
6) The student's distribution passed in should be the one the teacher's
   top-k is compared with, without the nucleus (top-p) mask: a teacher top-k
   token outside the student's nucleus has student probability 0 there and
   forward KL is +inf (exact, but useless as a loss).
7) A sampled token outside the teacher's top-k: the sampled-token estimate
   (loss.py) still scores it with the teacher's own logprob of that token;
   the bucket losses see it only as part of the tail (its probability is
   neither pushed up nor down individually, only the tail's total).
   `sampled_in_topk` flags such positions so the trainer can count them.
8) Normalisation as loss.py choice 3: sum over the batch's completion tokens
   divided by their number (`num_tokens`, the whole chunk's). A mix is
   (1 - weight) * sampled + weight * topk, weight in [0, 1]; the end points
   return the one loss itself (bit for bit; an inf in the other term does not
   leak).
9) Absent buckets (`valid_BTK`, False where an entry is absent: a top-k id of
   a teacher of another tokenizer with no student token of the same bytes,
   id -1 in the sample, aligned.py choice 4). K stays fixed per tensor; an
   absent entry is a bucket of log-probability -inf on both sides: its id is
   never gathered (a safe id stands in) nor taken out of the student's tail,
   the teacher's mass on it stays in the teacher's tail (1 - the present
   entries' mass), and it contributes exactly 0 with zero gradient (choice 3's
   a_b = 0 term, b_b = 0). With K >= V, `vocab_size` makes the top-k the
   vocabulary only where no entry is absent. A position with every entry
   absent compares two tails of mass 1; the trainer masks such positions out
   of the KL (update.py choice 5). `sampled_in_topk` never matches an absent
   entry, and `topk_mass` is the present entries' mass. Without `valid_BTK`
   (or with every entry present) the results are those without it, bit for bit.
"""

from __future__ import annotations

import math

import torch

from opd.trainer.loss import masked


def student_buckets(logp_student_BTV: torch.Tensor, topk_ids_BTK: torch.Tensor,
                    valid_BTK: torch.Tensor | None = None) -> torch.Tensor:
    """logq_BTK1: the student's log-probabilities of the teacher's K top-k tokens and of the tail (every other token).

    `logp_student_BTV` are log-probabilities (a log-softmax over the vocabulary; -inf allowed); `topk_ids_BTK`
    distinct ids per position (padding positions: any valid ids). Differentiable through the full softmax.
    `valid_BTK` (choice 9): False marks an absent entry (its id, e.g. -1, is never read): bucket -inf, and its
    token stays in the tail.
    """
    if valid_BTK is None:
        top_BTK = logp_student_BTV.gather(-1, topk_ids_BTK)
        in_top_BTV = torch.zeros_like(logp_student_BTV, dtype=torch.bool).scatter_(-1, topk_ids_BTK, True)
    else:  # an absent entry gathers a safe id 0 and reads -inf; it marks an extra column V, then dropped
        V = logp_student_BTV.shape[-1]
        top_BTK = logp_student_BTV.gather(-1, topk_ids_BTK.clamp(min=0)).masked_fill(~valid_BTK, float("-inf"))
        marks_BTK = topk_ids_BTK.masked_fill(~valid_BTK, V)
        in_top_BTV = logp_student_BTV.new_zeros((*logp_student_BTV.shape[:-1], V + 1), dtype=torch.bool)
        in_top_BTV = in_top_BTV.scatter_(-1, marks_BTK, True)[..., :V]
    rest_BTV = logp_student_BTV.masked_fill(in_top_BTV, float("-inf"))
    # logsumexp over nothing (or only -inf) is -inf with a NaN gradient: give it zeros and put -inf back after.
    empty_BT1 = torch.isneginf(rest_BTV).all(-1, keepdim=True)
    rest_BTV = rest_BTV.masked_fill(empty_BT1, 0.0)
    tail_BT1 = torch.logsumexp(rest_BTV, dim=-1, keepdim=True).masked_fill(empty_BT1, float("-inf"))
    return torch.cat([top_BTK, tail_BT1], dim=-1)


def teacher_buckets(topk_logprobs_BTK: torch.Tensor, *, vocab_size: int | None = None,
                    tail_floor: float = 0.0, valid_BTK: torch.Tensor | None = None) -> torch.Tensor:
    """logp_BTK1: the teacher's top-k logprobs and its tail, log(1 - sum exp(topk)), a distribution over K + 1 buckets.

    Choice 5: with `vocab_size` equal to K the tail is exactly 0 (-inf); `tail_floor` > 0 reads the tail as at
    least that probability (the top-k scaled down to 1 - tail_floor); 0 keeps the teacher's numbers as they are.
    `valid_BTK` (choice 9): False marks an absent entry: bucket -inf, its mass left in the tail.
    """
    assert 0.0 <= tail_floor < 1.0, f"tail_floor {tail_floor} must lie in [0, 1)"
    top_BTK = topk_logprobs_BTK.double()
    full = vocab_size is not None and top_BTK.shape[-1] >= vocab_size
    if valid_BTK is not None:
        top_BTK = top_BTK.masked_fill(~valid_BTK, float("-inf"))
        full = full and bool(valid_BTK.all())
    ceiling = 0.0 if full else math.log1p(-tail_floor)  # the most the top-k may hold, in log
    mass_BT1 = torch.logsumexp(top_BTK, dim=-1, keepdim=True)  # S = log sum exp(topk)
    excess_BT1 = (mass_BT1 - ceiling) if full else (mass_BT1 - ceiling).clamp(min=0.0)
    top_BTK = top_BTK - excess_BT1
    mass_BT1 = mass_BT1 - excess_BT1
    # log(1 - e^S): log(-expm1(S)) near S = 0, log1p(-e^S) for S well below (both exact where they are used).
    near_BT1 = mass_BT1 > -math.log(2.0)
    tail_BT1 = torch.where(near_BT1, torch.log(-torch.expm1(mass_BT1.clamp(min=-math.log(2.0)))),
                           torch.log1p(-torch.exp(mass_BT1.clamp(max=-math.log(2.0)))))
    if full:
        tail_BT1 = torch.full_like(tail_BT1, float("-inf"))
    return torch.cat([top_BTK, tail_BT1], dim=-1).to(topk_logprobs_BTK.dtype)


def bucket_kl(loga_BTK1: torch.Tensor, logb_BTK1: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """kl_BT = KL[a || b] = sum_k a_k log(a_k / b_k) over the buckets, as sum_k [b_k - a_k - a_k log(b_k / a_k)] (choice 3).

    Both must be distributions over the buckets (log-probabilities, -inf for 0). Masked positions give 0.
    """
    keep_BT1 = mask_BT.bool()[..., None]
    zero = torch.zeros((), dtype=loga_BTK1.dtype, device=loga_BTK1.device)
    loga_BTK1 = torch.where(keep_BT1, loga_BTK1, zero)
    logb_BTK1 = torch.where(keep_BT1, logb_BTK1.to(loga_BTK1.dtype), zero)
    some_BTK1 = loga_BTK1 > float("-inf")  # a_k > 0
    la_BTK1 = torch.where(some_BTK1, loga_BTK1, zero)  # finite stand-ins where a_k = 0: no NaN gradients
    lb_BTK1 = torch.where(some_BTK1, logb_BTK1, zero)
    d_BTK1 = lb_BTK1 - la_BTK1
    small_BTK1 = d_BTK1 <= 1.0
    d_small_BTK1 = torch.where(small_BTK1, d_BTK1, zero)  # may be -inf: b_k = 0 < a_k, the term is +inf
    d_large_BTK1 = torch.where(small_BTK1, zero + 2.0, d_BTK1)
    a_BTK1 = la_BTK1.exp()
    term_small_BTK1 = a_BTK1 * (torch.expm1(d_small_BTK1) - d_small_BTK1)
    term_large_BTK1 = lb_BTK1.exp() - a_BTK1 * (1.0 + d_large_BTK1)  # a (e^d - 1 - d) without e^d
    term_BTK1 = torch.where(small_BTK1, term_small_BTK1, term_large_BTK1)
    term_BTK1 = torch.where(some_BTK1, term_BTK1, logb_BTK1.exp())  # a_k = 0: the term is b_k
    return masked(term_BTK1.sum(-1), mask_BT)


def topk_forward_kl(logq_student_BTK1: torch.Tensor, logp_teacher_BTK1: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """kl_BT = KL[teacher || student] over the K + 1 buckets = sum_b p_t(b) (log p_t(b) - log q_s(b)); 0 where masked."""
    return bucket_kl(logp_teacher_BTK1.to(logq_student_BTK1.dtype), logq_student_BTK1, mask_BT)


def topk_reverse_kl(logq_student_BTK1: torch.Tensor, logp_teacher_BTK1: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """kl_BT = KL[student || teacher] over the K + 1 buckets = sum_b q_s(b) (log q_s(b) - log p_t(b)); 0 where masked."""
    return bucket_kl(logq_student_BTK1, logp_teacher_BTK1.to(logq_student_BTK1.dtype), mask_BT)


def sampled_in_topk(sampled_ids_BT: torch.Tensor, topk_ids_BTK: torch.Tensor,
                    valid_BTK: torch.Tensor | None = None) -> torch.Tensor:
    """bool_BT: whether the teacher's top-k at each position holds the token the student sampled there (an absent
    entry, False in `valid_BTK`, never does)."""
    hit_BTK = topk_ids_BTK == sampled_ids_BT[..., None]
    return (hit_BTK if valid_BTK is None else hit_BTK & valid_BTK).any(-1)


def topk_mass(logp_teacher_BTK1: torch.Tensor) -> torch.Tensor:
    """mass_BT: the probability the teacher's top-k holds (1 - its tail; with absent entries, the present
    ones'), for the metrics."""
    return -torch.expm1(logp_teacher_BTK1[..., -1])


def topk_loss(kl_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """loss = sum_t kl_t / num_tokens over the completion tokens (num_tokens: the whole chunk's, loss.py choice 3)."""
    return masked(kl_BT, mask_BT).sum() / num_tokens


def mixed_loss(sampled_loss: torch.Tensor, topk_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * sampled_loss + weight * topk_loss, weight in [0, 1]; 0 and 1 return that one loss itself."""
    assert 0.0 <= weight <= 1.0, f"the top-k weight {weight} must lie in [0, 1]"
    if weight == 0.0:
        return sampled_loss
    if weight == 1.0:
        return topk_loss
    return (1.0 - weight) * sampled_loss + weight * topk_loss
