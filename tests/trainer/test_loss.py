"""The loss and advantages against an independent computation in plain Python loops.

Every batch mixes prompt positions, completion tokens and right padding; the
masked positions hold garbage (including NaN and inf) that must not leak.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from opd.trainer import loss as L

GARBAGE = [float("nan"), float("inf"), -float("inf"), 123.0]


def make_batch(seed: int, rows: int = 4, width: int = 9):
    """Per row: a prompt of p tokens, a completion of c tokens, padding to `width`."""
    rng = random.Random(seed)
    spans, theta, sampling, teacher, mask = [], [], [], [], []
    for _ in range(rows):
        p = rng.randint(0, 3)
        c = rng.randint(1, width - p)
        spans.append((p, c))
        row_mask = [0.0] * p + [1.0] * c + [0.0] * (width - p - c)
        mask.append(row_mask)
        for out in (theta, sampling, teacher):
            out.append([-rng.uniform(0.05, 4.0) if m else rng.choice(GARBAGE) for m in row_mask])
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return spans, t(theta), t(sampling), t(teacher), t(mask)


def completion(values, span):
    p, c = span
    return [float(v) for v in values[p : p + c]]


def loop_advantages(sampling, teacher, spans, kl_coef, discount):
    out = []
    for b, span in enumerate(spans):
        s, q = completion(sampling[b], span), completion(teacher[b], span)
        rewards = [-kl_coef * (si - qi) for si, qi in zip(s, q)]
        adv = []
        for t in range(len(rewards)):
            adv.append(sum(discount ** (k - t) * rewards[k] for k in range(t, len(rewards))))
        out.append(adv)
    return out


def loop_loss(theta, sampling, adv, spans, clip=None):
    total, tokens = 0.0, 0
    for b, span in enumerate(spans):
        th, s = completion(theta[b], span), completion(sampling[b], span)
        for t, a in enumerate(adv[b]):
            ratio = math.exp(th[t] - s[t])
            if clip is None:
                total += ratio * a
            else:
                total += min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            tokens += 1
    return -total / tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("kl_coef", "discount"), [(1.0, 0.0), (0.5, 0.0), (1.0, 0.9), (2.0, 0.5)])
def test_advantages_match_loops(seed: int, kl_coef: float, discount: float) -> None:
    spans, _, sampling, teacher, mask = make_batch(seed)
    rkl = L.reverse_kl(sampling, teacher, mask)
    adv = L.kl_advantages(rkl, mask, kl_coef, discount)
    expected = loop_advantages(sampling.tolist(), teacher.tolist(), spans, kl_coef, discount)
    for b, span in enumerate(spans):
        assert completion(adv[b].tolist(), span) == pytest.approx(expected[b], rel=1e-5, abs=1e-6)
    assert torch.all(adv[mask == 0] == 0), "prompt and padding positions carry no advantage"
    assert torch.isfinite(adv).all()


def test_discount_credits_later_tokens_only_within_the_sequence() -> None:
    sampling = torch.tensor([[0.0, -1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, -2.0, -1.0, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = L.kl_advantages(L.reverse_kl(sampling, teacher, mask), mask, kl_coef=1.0, discount=0.5)
    # row 0: rkl = [1, 0] on its two tokens; row 1: rkl = [2] and nothing after it.
    assert adv.tolist() == [[0.0, -1.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 3, 4])
@pytest.mark.parametrize("discount", [0.0, 0.7])
def test_importance_sampling_loss_matches_loops(seed: int, discount: float) -> None:
    spans, theta, sampling, teacher, mask = make_batch(seed)
    adv = L.kl_advantages(L.reverse_kl(sampling, teacher, mask), mask, 1.0, discount)
    n = int(mask.sum())
    got = L.importance_sampling_loss(theta, sampling, adv, mask, n)
    expected = loop_loss(theta.tolist(), sampling.tolist(), loop_advantages(sampling.tolist(), teacher.tolist(), spans, 1.0, discount), spans)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 5, 6])
def test_ppo_loss_matches_loops_and_clips(seed: int) -> None:
    spans, theta, sampling, teacher, mask = make_batch(seed)
    # Move theta far from the sampler so many ratios fall outside [0.8, 1.2].
    theta = torch.where(mask.bool(), sampling + torch.linspace(-0.6, 0.6, theta.numel()).reshape(theta.shape), theta)
    adv = L.kl_advantages(L.reverse_kl(sampling, teacher, mask), mask, 1.0, 0.0)
    n = int(mask.sum())
    got = L.ppo_loss(theta, sampling, adv, mask, n, clip_range=0.2)
    loop_adv = loop_advantages(sampling.tolist(), teacher.tolist(), spans, 1.0, 0.0)
    assert got.item() == pytest.approx(loop_loss(theta.tolist(), sampling.tolist(), loop_adv, spans, clip=0.2), rel=1e-5)
    unclipped = L.importance_sampling_loss(theta, sampling, adv, mask, n)
    assert got.item() != pytest.approx(unclipped.item(), rel=1e-3), "clipping must change this batch's loss"
    stats = L.ratio_stats(theta, sampling, mask, 0.2)
    assert 0.0 < stats["clip_fraction"] < 1.0 and stats["ratio_min"] < 0.8 < 1.2 < stats["ratio_max"]


def test_gradients_reach_only_real_tokens() -> None:
    spans, theta, sampling, teacher, mask = make_batch(7)
    theta = torch.where(mask.bool(), theta, torch.zeros_like(theta)).requires_grad_(True)
    adv = L.kl_advantages(L.reverse_kl(sampling, teacher, mask), mask, 1.0, 0.0)
    n = int(mask.sum())
    L.importance_sampling_loss(theta, sampling, adv, mask, n).backward()
    assert torch.all(theta.grad[mask == 0] == 0)
    # On policy (theta = sampling) d loss / d theta_t = -A_t / n: the ratio's gradient is the ratio.
    on = torch.where(mask.bool(), sampling, torch.zeros_like(sampling)).requires_grad_(True)
    L.importance_sampling_loss(on, sampling, adv, mask, n).backward()
    assert torch.allclose(on.grad, -adv / n, atol=1e-6)


def test_group_centering_and_padding() -> None:
    assert L.group_centered(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    values, mask = L.pad_right([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    assert values.tolist() == [[1.0, 2.0], [3.0, 0.0]] and mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
