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
4) Draws come from the request's own generator, so a seeded request gives the
   same tokens whatever else the engine serves meanwhile.
"""

from __future__ import annotations

import torch

from opd.common.protocol import MIN_TEMPERATURE


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def next_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its logprob under the distribution it was chosen from."""
    logits_BV = logits_BV.float()
    if is_greedy(temperature):
        token_B = logits_BV.argmax(dim=-1)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
    else:
        scaled_BV = logits_BV / temperature
        if top_p < 1.0:
            scaled_BV = nucleus(scaled_BV, top_p)
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        token_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


def nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """The logits with every token outside the top-p nucleus set to -inf."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1)  # ascending: the tail first
    tail_mass_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    drop_BV = tail_mass_BV <= 1.0 - top_p
    drop_BV[:, -1] = False
    return logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
