"""The distillation objective as small pure functions on padded tensors.

Notation (shape suffixes): `_B` sequences in a batch, `_T` token positions,
`_G` samples of one prompt. Every `_BT` tensor comes with `mask_BT`: 1 on the
completion tokens the student sampled, 0 on prompt and padding positions,
whose values may be anything (they never reach a result).

Choices:
1) The per-token reward is the negative reverse KL of the student against the
   teacher at the sampled token; it is a one-sample estimate of
   KL[student || teacher] that needs no full distributions.
2) Advantages carry no baseline: the reward is already per token and dense.
   With `discount` > 0 a token is also credited with the discounted rewards of
   the tokens after it, within its own sequence.
3) The loss is normalised by the number of completion tokens in the whole
   batch (not per sequence), so long and short samples weigh per token.
4) `importance_sampling` is unclipped (on-policy with one substep, the ratio is
   1 up to engine numerics); `ppo` clips the ratio once substeps let the policy
   move away from the sampler.
5) The three arms (objectives.py) share these losses: `opd` uses the KL
   advantages, `rl` a sequence reward centred over the samples of one prompt
   and spread over every token of its sample (`reward_advantages`), `sft` the
   negative log-likelihood of the teacher's samples (`sft_loss`), no ratio.
"""

from __future__ import annotations

import torch


def masked(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0; NaN or inf at masked positions do not leak."""
    return torch.where(mask_BT.bool(), x_BT, torch.zeros_like(x_BT))


def reverse_kl(sampling_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """rkl_t = log p_student(x_t | x_<t) - log p_teacher(x_t | x_<t), x_t sampled by the student.

    KL[p||q] = E_p[log p - log q], p: the student that sampled, q: the teacher.
    """
    return masked(sampling_logprobs_BT - teacher_logprobs_BT, mask_BT)


def kl_advantages(rkl_BT: torch.Tensor, mask_BT: torch.Tensor, kl_coef: float, discount: float = 0.0) -> torch.Tensor:
    """A_t = -kl_coef * sum_{k >= t} discount^(k - t) * rkl_k   (discount 0: A_t = -kl_coef * rkl_t).

    The sum runs over the completion tokens of the same sequence only.
    """
    reward_BT = -kl_coef * masked(rkl_BT, mask_BT)
    if discount == 0.0:
        return reward_BT
    adv_BT = torch.zeros_like(reward_BT)
    running_B = torch.zeros_like(reward_BT[:, 0])
    for t in range(reward_BT.shape[1] - 1, -1, -1):
        # A masked position passes the running sum through undiscounted, so
        # padding between or after tokens never shortens the horizon.
        keep_B = mask_BT[:, t].bool()
        running_B = torch.where(keep_B, reward_BT[:, t] + discount * running_B, running_B)
        adv_BT[:, t] = running_B
    return masked(adv_BT, mask_BT)


def group_centered(rewards_G: torch.Tensor) -> torch.Tensor:
    """r_g - mean_g(r): a task reward relative to the other samples of the same prompt."""
    return rewards_G - rewards_G.mean()


def reward_advantages(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """A_t = r_b for every completion token of sequence b (the RL arm: one reward per episode, no per-token credit)."""
    return masked(rewards_B[:, None].to(mask_BT.dtype).expand_as(mask_BT), mask_BT)


def sft_loss(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """loss = -sum_t log p_theta(x_t) / num_tokens over the completion tokens (x_t sampled by the teacher)."""
    return -masked(logprobs_BT, mask_BT).sum() / num_tokens


def importance_sampling_loss(
    logprobs_BT: torch.Tensor,
    sampling_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """loss = -sum_t exp(logp_theta(x_t) - logp_sampling(x_t)) * A_t / num_tokens."""
    ratio_BT = torch.exp(masked(logprobs_BT - sampling_logprobs_BT, mask_BT))
    return -(masked(ratio_BT * advantages_BT, mask_BT)).sum() / num_tokens


def ppo_loss(
    logprobs_BT: torch.Tensor,
    sampling_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: int,
    clip_range: float,
) -> torch.Tensor:
    """loss = -sum_t min(r_t * A_t, clip(r_t, 1 - eps, 1 + eps) * A_t) / num_tokens,  r_t = exp(logp_theta - logp_sampling)."""
    ratio_BT = torch.exp(masked(logprobs_BT - sampling_logprobs_BT, mask_BT))
    clipped_BT = ratio_BT.clamp(1.0 - clip_range, 1.0 + clip_range)
    objective_BT = torch.minimum(ratio_BT * advantages_BT, clipped_BT * advantages_BT)
    return -(masked(objective_BT, mask_BT)).sum() / num_tokens


def ratio_stats(logprobs_BT: torch.Tensor, sampling_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, clip_range: float) -> dict[str, float]:
    """Mean, min and max importance ratio over the real tokens, and the fraction outside the clip range."""
    with torch.no_grad():
        ratio = torch.exp(logprobs_BT - sampling_logprobs_BT)[mask_BT.bool()]
        if ratio.numel() == 0:
            return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "clip_fraction": 0.0}
        outside = ((ratio < 1.0 - clip_range) | (ratio > 1.0 + clip_range)).float().mean()
        return {
            "ratio_mean": ratio.mean().item(),
            "ratio_min": ratio.min().item(),
            "ratio_max": ratio.max().item(),
            "clip_fraction": outside.item(),
        }


def pad_right(rows_B: list[torch.Tensor], width: int | None = None, value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1-d tensors -> (values_BT, mask_BT), right-padded, on the rows' device."""
    width = max((len(r) for r in rows_B), default=0) if width is None else width
    device = rows_B[0].device if rows_B else None
    out_BT = torch.full((len(rows_B), width), value, dtype=torch.float32, device=device)
    mask_BT = torch.zeros((len(rows_B), width), dtype=torch.float32, device=device)
    for b, row_T in enumerate(rows_B):
        out_BT[b, : len(row_T)] = row_T
        mask_BT[b, : len(row_T)] = 1.0
    return out_BT, mask_BT
