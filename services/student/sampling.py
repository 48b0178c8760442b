"""How the hf engine picks each next token, and the logprob it reports for it.

Choices (the same as vLLM's sampler, so both engines report the same numbers):
1) Greedy below `MIN_TEMPERATURE` (0 included): the argmax token, reported
   with its logprob under the model at temperature 1 without top-p.
2) Otherwise logits / temperature, then top-p (the smallest set of most
   likely tokens holding at least top_p of the mass; the best one always
   stays), then a draw; the reported logprob is the drawn token's under that
   renormalised distribution: exactly what it was drawn from.
3) Arithmetic in float32 whatever the model's dtype. With a temperature of at
   least MIN_TEMPERATURE finite logits stay finite (a logit would have to pass
   about 3e36), so the probabilities are never inf or nan.
4) A draw is inverse-transform sampling of one uniform number per row, which
   the caller gives (hf_engine.py draws each rollout's from its own seed), so
   a row's tokens depend on its own numbers only: not on the other rows of
   its batch, nor on what else the engine serves meanwhile.
"""

from __future__ import annotations

import torch

from opd.common.protocol import MIN_TEMPERATURE


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def next_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, uniform_B: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its logprob under the distribution it was chosen from.
    `uniform_B`: each row's draw in [0, 1) (default: fresh random numbers); greedy rows use none."""
    logits_BV = logits_BV.float()
    if is_greedy(temperature):
        token_B = logits_BV.argmax(dim=-1)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
    else:
        scaled_BV = logits_BV / temperature
        if top_p < 1.0:
            scaled_BV = nucleus(scaled_BV, top_p)
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        if uniform_B is None:
            uniform_B = torch.rand(logits_BV.shape[0])
        token_B = inverse_cdf(logp_BV.exp(), uniform_B.to(logits_BV.device, torch.float32))
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


def inverse_cdf(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability passes u * total: token x with probability p(x)."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    total_B1 = cdf_BV[:, -1:]
    # Below the total, whatever the rounding of u * total, so a token is always found.
    target_B1 = (uniform_B[:, None] * total_B1).minimum(torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    token_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)
    # cdf[x] > cdf[x-1] means p(x) > 0, unless a parallel scan (CUDA) rounded two equal sums apart: never a
    # token outside the nucleus, then.
    chosen_B = probs_BV.gather(-1, token_B[:, None]).squeeze(-1)
    return torch.where(chosen_B > 0, token_B, probs_BV.argmax(dim=-1))


def nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """The logits with every token outside the top-p nucleus set to -inf."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1)  # ascending: the tail first
    tail_mass_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    drop_BV = tail_mass_BV <= 1.0 - top_p
    drop_BV[:, -1] = False
    return logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
