"""The top-k bucket losses (topk.py) against hand-computed values, autograd of the textbook formulas and the
full-vocabulary KLs at k = V; never negative, finite gradients, masked positions exactly 0. Pure tensors, no
services: seconds in all."""

from __future__ import annotations

import math

import pytest
import torch

from opd.trainer import topk as K

# A 4-token vocabulary; the teacher's top-2 at the one position are tokens 2 and 0.
STUDENT = [0.4, 0.3, 0.2, 0.1]
TOP_IDS = [2, 0]
TOP_PROBS = [0.5, 0.3]  # teacher tail 0.2


def hand_case(dtype=torch.float64):
    logp_student = torch.tensor(STUDENT, dtype=dtype).log().reshape(1, 1, 4)
    ids = torch.tensor(TOP_IDS).reshape(1, 1, 2)
    top = torch.tensor(TOP_PROBS, dtype=dtype).log().reshape(1, 1, 2)
    return logp_student, ids, top, torch.ones(1, 1)


def test_buckets_by_hand() -> None:
    logp_student, ids, top, _ = hand_case()
    # student: q(2) = 0.2, q(0) = 0.4, tail = q(1) + q(3) = 0.3 + 0.1 = 0.4; teacher: 0.5, 0.3, tail 1 - 0.8 = 0.2.
    assert K.student_buckets(logp_student, ids).exp().flatten().tolist() == pytest.approx([0.2, 0.4, 0.4], abs=1e-15)
    assert K.teacher_buckets(top).exp().flatten().tolist() == pytest.approx([0.5, 0.3, 0.2], abs=1e-15)
    assert K.topk_mass(K.teacher_buckets(top)).item() == pytest.approx(0.8, abs=1e-15)


def test_forward_kl_by_hand() -> None:
    logp_student, ids, top, mask = hand_case()
    # KL[t || s] = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.4)
    #            = 0.5 * 0.916291 + 0.3 * (-0.287682) + 0.2 * (-0.693147) = 0.458145 - 0.086305 - 0.138629 = 0.233212
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.4)
    assert expected == pytest.approx(0.233212, abs=1e-6)
    kl = K.topk_forward_kl(K.student_buckets(logp_student, ids), K.teacher_buckets(top), mask)
    assert kl.item() == pytest.approx(expected, abs=1e-12)


def test_reverse_kl_by_hand() -> None:
    logp_student, ids, top, mask = hand_case()
    # KL[s || t] = 0.2 ln(0.2/0.5) + 0.4 ln(0.4/0.3) + 0.4 ln(0.4/0.2)
    #            = 0.2 * (-0.916291) + 0.4 * 0.287682 + 0.4 * 0.693147 = -0.183258 + 0.115073 + 0.277259 = 0.209074
    expected = 0.2 * math.log(0.2 / 0.5) + 0.4 * math.log(0.4 / 0.3) + 0.4 * math.log(0.4 / 0.2)
    assert expected == pytest.approx(0.209074, abs=1e-6)
    kl = K.topk_reverse_kl(K.student_buckets(logp_student, ids), K.teacher_buckets(top), mask)
    assert kl.item() == pytest.approx(expected, abs=1e-12)


def test_the_hand_case_in_float32() -> None:
    logp_student, ids, top, mask = hand_case(torch.float32)
    q, p = K.student_buckets(logp_student, ids), K.teacher_buckets(top)
    assert K.topk_forward_kl(q, p, mask).item() == pytest.approx(0.2332116, abs=1e-6)
    assert K.topk_reverse_kl(q, p, mask).item() == pytest.approx(0.2090741, abs=1e-6)


def textbook(logits_BTV, ids_BTK, top_BTK, mask_BT, reverse: bool) -> torch.Tensor:
    """The explicit formula, written independently: softmax, gather, 1 - sum, sum p log(p / q)."""
    q_BTV = torch.softmax(logits_BTV, dim=-1)
    q_top = q_BTV.gather(-1, ids_BTK)
    q = torch.cat([q_top, 1.0 - q_top.sum(-1, keepdim=True)], dim=-1)
    p_top = top_BTK.exp()
    p = torch.cat([p_top, 1.0 - p_top.sum(-1, keepdim=True)], dim=-1)
    kl_BT = (q * (q.log() - p.log())).sum(-1) if reverse else (p * (p.log() - q.log())).sum(-1)
    return (kl_BT * mask_BT).sum() / mask_BT.sum()


def random_case(seed: int, B=3, T=5, V=11, k=3, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, T, V, generator=g, dtype=dtype)).requires_grad_(True)
    teacher = torch.log_softmax(scale * torch.randn(B, T, V, generator=g, dtype=dtype), dim=-1)
    top, ids = teacher.topk(k, dim=-1)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(dtype)
    mask[0, 0] = 1.0
    return logits, teacher, top, ids, mask


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_autograd_of_the_textbook_formula(seed: int, reverse: bool) -> None:
    logits, _, top, ids, mask = random_case(seed)
    kl_fn = K.topk_reverse_kl if reverse else K.topk_forward_kl
    q = K.student_buckets(torch.log_softmax(logits, dim=-1), ids)
    ours = K.topk_loss(kl_fn(q, K.teacher_buckets(top), mask), mask, int(mask.sum()))
    theirs = textbook(logits, ids, top, mask, reverse)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-12)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6, rtol=0)
    assert torch.all(g_ours[mask == 0] == 0), "masked positions get no gradient"
    assert torch.all(g_ours[mask == 1].abs().sum(-1) > 0), "every real position gets one, tail tokens included"


class TinyModel(torch.nn.Module):
    """Embedding -> tanh layer -> vocabulary head: enough of a model to give logits with a gradient path."""

    def __init__(self, vocab: int, width: int, scale: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)
        with torch.no_grad():
            self.head.weight.mul_(scale)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


@pytest.mark.parametrize("reverse", [False, True])
def test_k_equal_to_the_vocabulary_gives_the_full_kl(reverse: bool) -> None:
    V = 50
    student, teacher = TinyModel(V, 16, 1.0, seed=0), TinyModel(V, 16, 4.0, seed=1)
    ids_BT = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7)
    mask[2, 5:] = 0.0
    n = int(mask.sum())
    logp_s = torch.log_softmax(student(ids_BT).float(), dim=-1)
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(ids_BT).float(), dim=-1)
    top, top_ids = logp_t.topk(V, dim=-1)
    q, p = K.student_buckets(logp_s, top_ids), K.teacher_buckets(top, vocab_size=V)
    assert torch.isneginf(q[..., -1]).all() and torch.isneginf(p[..., -1]).all(), "k = V: both tails are exactly 0"
    kl = (K.topk_reverse_kl if reverse else K.topk_forward_kl)(q, p, mask)
    # the full-vocabulary KLs: kl_div(input, target, log_target) = sum exp(target) (target - input)
    full = (torch.nn.functional.kl_div(logp_t, logp_s, log_target=True, reduction="none") if reverse
            else torch.nn.functional.kl_div(logp_s, logp_t, log_target=True, reduction="none")).sum(-1) * mask
    assert torch.allclose(kl, full, atol=1e-5, rtol=0)
    assert kl[mask == 1].min() > 1e-3, "the two models differ: the check is not on zeros"
    (g_ours,) = torch.autograd.grad(K.topk_loss(kl, mask, n), list(student.parameters())[-1], retain_graph=True)
    (g_full,) = torch.autograd.grad(full.sum() / n, list(student.parameters())[-1])
    assert torch.allclose(g_ours, g_full, atol=1e-5, rtol=0)


def many_cases():
    """Random positions, from flat to extremely peaked (the teacher's top-k holding all but ~e^-100 of its mass,
    a student whose tail is ~1e-30), with k from 1 to V, in float32 and float64."""
    g = torch.Generator().manual_seed(0)
    V = 20
    for case in range(60):
        dtype = torch.float32 if case % 2 else torch.float64
        k = [1, 2, 5, V - 1, V][case % 5]
        s_scale, t_scale = [(0.1, 0.1), (1.0, 3.0), (10.0, 1.0), (1.0, 40.0), (40.0, 40.0), (3.0, 100.0)][case % 6]
        logits = (s_scale * torch.randn(4, 6, V, generator=g)).to(dtype).requires_grad_(True)
        teacher = torch.log_softmax((t_scale * torch.randn(4, 6, V, generator=g)).to(dtype), dim=-1)
        if case % 7 == 0:
            teacher = torch.log_softmax(logits.detach() + 1e-4 * torch.randn(4, 6, V, generator=g).to(dtype), dim=-1)
        top, ids = teacher.topk(k, dim=-1)
        mask = (torch.rand(4, 6, generator=g) < 0.8).to(dtype)
        yield logits, top, ids, mask, V


@pytest.mark.parametrize("reverse", [False, True])
def test_never_negative_and_finite_gradients(reverse: bool) -> None:
    kl_fn = K.topk_reverse_kl if reverse else K.topk_forward_kl
    hard = {"teacher tail 0 with k < V": 0, "textbook formula below 0 by rounding": 0}
    for logits, top, ids, mask, V in many_cases():
        q = K.student_buckets(torch.log_softmax(logits, dim=-1), ids)
        # a floor on the teacher's tail keeps reverse KL finite where a peaked teacher's reported top-k mass rounds
        # to 1 while the student keeps tail mass (topk.py choice 5)
        p = K.teacher_buckets(top, vocab_size=V, tail_floor=1e-6 if reverse else 0.0)
        assert torch.allclose(p.exp().sum(-1), torch.ones(()).to(p.dtype), atol=1e-5)
        kl = kl_fn(q, p, mask)
        if ids.shape[-1] < V:
            hard["teacher tail 0 with k < V"] += int((K.teacher_buckets(top)[..., -1].isneginf() & mask.bool()).sum())
        a, b = (q, p) if reverse else (p, q)
        plain = torch.where(a > -math.inf, a.exp() * (a - b), torch.zeros_like(a)).sum(-1)
        hard["textbook formula below 0 by rounding"] += int((plain[mask.bool()] < 0).sum())
        assert torch.all(kl >= 0), kl.min()
        assert torch.isfinite(kl).all()
        (grad,) = torch.autograd.grad(K.topk_loss(kl, mask, int(mask.sum())), logits)
        assert torch.isfinite(grad).all()
        assert torch.all(grad[mask == 0] == 0)
    assert all(count > 0 for count in hard.values()), hard


def test_a_confident_teacher_tail_rounds_to_zero_reverse_kl_needs_the_floor() -> None:
    """float32: a teacher logprob of -1e-10 reads 0.0, its top-2 mass 1 + e^-30; the student keeps 1e-3 in the tail."""
    logp_student = torch.tensor([0.989, 0.01, 0.0005, 0.0005]).log().reshape(1, 1, 4).requires_grad_(True)
    ids = torch.tensor([0, 1]).reshape(1, 1, 2)
    top = torch.tensor([0.0, -30.0]).reshape(1, 1, 2)
    mask = torch.ones(1, 1)
    q = K.student_buckets(logp_student, ids)
    exact = K.teacher_buckets(top)
    assert torch.isneginf(exact[..., -1]).all()
    assert math.isinf(K.topk_reverse_kl(q, exact, mask).item()), "exact: the student's tail mass against 0"
    forward = K.topk_forward_kl(q, exact, mask)
    assert math.isfinite(forward.item()) and forward.item() >= 0
    floored = K.teacher_buckets(top, tail_floor=1e-6)
    assert floored[..., -1].exp().item() == pytest.approx(1e-6, rel=1e-4)
    reverse = K.topk_reverse_kl(q, floored, mask)
    assert math.isfinite(reverse.item()) and reverse.item() > 0
    (grad,) = torch.autograd.grad(reverse.sum(), logp_student)
    assert torch.isfinite(grad).all()


def test_teacher_mass_over_one_is_renormalised() -> None:
    """Rounded logprobs can report a top-k mass above 1: it is scaled back to 1 and the tail is 0, no NaN."""
    for values in ([-1e-9, -20.0, -20.0], [0.0, -5.0]):  # masses 1 + 3.1e-9 and 1 + e^-5
        p = K.teacher_buckets(torch.tensor(values).reshape(1, 1, -1))
        assert torch.isfinite(p[..., :-1]).all() and torch.isneginf(p[..., -1]).all()
        assert p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # just under 1: the tail is what is left, computed without cancellation (float64 inside)
    p = K.teacher_buckets(torch.tensor([-1e-7, -20.0, -20.0]).reshape(1, 1, 3))
    left = 1.0 - math.exp(-1e-7) - 2 * math.exp(-20.0)
    assert p[..., -1].item() == pytest.approx(math.log(left), abs=1e-4)


def test_zero_probability_buckets() -> None:
    """A teacher top-k entry of -inf (probability 0) and a student with probability 0 on a token: 0 log 0 = 0."""
    logp_student = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64).log().reshape(1, 1, 4).requires_grad_(True)
    ids = torch.tensor([0, 2]).reshape(1, 1, 2)
    top = torch.tensor([math.log(0.6), -math.inf], dtype=torch.float64).reshape(1, 1, 2)
    mask = torch.ones(1, 1, dtype=torch.float64)
    q, p = K.student_buckets(logp_student, ids), K.teacher_buckets(top)
    # buckets: student [0.5, 0, 0.5], teacher [0.6, 0, 0.4]
    fwd = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    assert K.topk_forward_kl(q, p, mask).item() == pytest.approx(fwd, abs=1e-12)
    assert K.topk_reverse_kl(q, p, mask).item() == pytest.approx(rev, abs=1e-12)
    for fn in (K.topk_forward_kl, K.topk_reverse_kl):
        (grad,) = torch.autograd.grad(fn(q, p, mask).sum(), logp_student, retain_graph=True)
        assert not torch.isnan(grad).any()
    # every student token outside the top-k at -inf (a nucleus): the tail is exactly 0, gradients stay finite
    nucleus = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64).log().reshape(1, 1, 4).requires_grad_(True)
    qn = K.student_buckets(nucleus, torch.tensor([0, 1]).reshape(1, 1, 2))
    assert torch.isneginf(qn[..., -1]).all()
    pn = K.teacher_buckets(torch.tensor([math.log(0.7), math.log(0.3)], dtype=torch.float64).reshape(1, 1, 2))
    (grad,) = torch.autograd.grad(K.topk_reverse_kl(qn, pn, mask).sum(), nucleus)
    assert torch.isfinite(grad).all()


def test_masked_positions_contribute_exactly_zero() -> None:
    logits, _, top, ids, mask = random_case(5, dtype=torch.float32)
    mask[1] = 0.0
    garbage = top.clone()
    garbage[1, 0], garbage[1, 1], garbage[1, 2] = float("nan"), float("inf"), -float("inf")
    for fn in (K.topk_forward_kl, K.topk_reverse_kl):
        q = K.student_buckets(torch.log_softmax(logits, dim=-1), ids)
        clean = fn(q, K.teacher_buckets(top), mask)
        dirty = fn(q, K.teacher_buckets(garbage), mask)
        assert torch.all(dirty[mask == 0] == 0) and torch.equal(clean, dirty)
        loss = K.topk_loss(dirty, mask, int(mask.sum()))
        assert loss.item() == pytest.approx((clean * mask).sum().item() / mask.sum().item(), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and torch.all(grad[mask == 0] == 0)


def test_sampled_in_topk_by_hand() -> None:
    sampled = torch.tensor([[3, 1, 0], [2, 2, 7]])
    ids = torch.tensor([[[3, 4], [0, 2], [0, 1]], [[1, 5], [2, 9], [6, 8]]])
    assert K.sampled_in_topk(sampled, ids).tolist() == [[True, False, True], [False, True, False]]


def test_loss_normalisation_and_mix() -> None:
    kl = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 8.0, 16.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert K.topk_loss(kl, mask, num_tokens=8).item() == (1 + 2 + 4 + 16) / 8
    sampled, top = torch.tensor(0.3), torch.tensor(1.1)
    assert K.mixed_loss(sampled, top, 0.25).item() == pytest.approx(0.75 * 0.3 + 0.25 * 1.1)
    assert K.mixed_loss(sampled, torch.tensor(float("inf")), 0.0) is sampled, "weight 0: the sampled loss itself"
    assert K.mixed_loss(torch.tensor(float("nan")), top, 1.0) is top
    with pytest.raises(AssertionError):
        K.mixed_loss(sampled, top, 1.5)


# ------------------------------------------------------------------ absent buckets (topk.py choice 9)
def test_an_absent_entry_leaves_the_top_1_bucket_kl() -> None:
    """The hand case's top-2 [2, 0] with token 0 absent (id -1) is the top-1 case [2]: student buckets q(2) = 0.2,
    tail 0.8 (token 0 stays in it); teacher 0.5, tail 0.5 (its 0.3 on the absent entry stays in the tail)."""
    logp_student, _, top, mask = hand_case()
    ids, valid = torch.tensor([2, -1]).reshape(1, 1, 2), torch.tensor([True, False]).reshape(1, 1, 2)
    q, p = K.student_buckets(logp_student, ids, valid), K.teacher_buckets(top, valid_BTK=valid)
    assert q.exp().flatten().tolist() == pytest.approx([0.2, 0.0, 0.8], abs=1e-15)
    assert p.exp().flatten().tolist() == pytest.approx([0.5, 0.0, 0.5], abs=1e-15)
    assert torch.isneginf(q[..., 1]).all() and torch.isneginf(p[..., 1]).all()
    forward = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    reverse = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    assert K.topk_forward_kl(q, p, mask).item() == pytest.approx(forward, abs=1e-12)
    assert K.topk_reverse_kl(q, p, mask).item() == pytest.approx(reverse, abs=1e-12)
    top1 = (K.student_buckets(logp_student, torch.tensor([2]).reshape(1, 1, 1)),
            K.teacher_buckets(top[..., :1]))
    for fn in (K.topk_forward_kl, K.topk_reverse_kl):
        assert fn(q, p, mask).item() == pytest.approx(fn(*top1, mask).item(), abs=1e-15)
    assert K.topk_mass(p).item() == pytest.approx(0.5, abs=1e-15)
    assert K.sampled_in_topk(torch.tensor([[0]]), torch.tensor([0, -1]).reshape(1, 1, 2),
                             torch.tensor([False, False]).reshape(1, 1, 2)).tolist() == [[False]]
    assert K.sampled_in_topk(torch.tensor([[2]]), ids, valid).tolist() == [[True]]


def absent_case(seed: int, dtype=torch.float64):
    """random_case with about a third of the entries absent (id -1, logprob garbage) and one position all absent."""
    logits, teacher, top, ids, mask = random_case(seed, dtype=dtype)
    g = torch.Generator().manual_seed(100 + seed)
    valid = torch.rand(ids.shape, generator=g) > 0.35
    valid[0, 0] = torch.tensor([True, False, True])
    valid[1, 1] = False
    return logits, top.masked_fill(~valid, float("nan")), ids.masked_fill(~valid, -1), valid, mask


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_absent_entries_add_nothing_and_their_gradient_is_finite(seed: int, reverse: bool) -> None:
    """Absent buckets are the buckets of the present entries alone (textbook: the K present ids, the teacher's tail
    1 - their mass), with finite gradients and no NaN, whatever the absent entries' logprobs hold."""
    logits, top, ids, valid, mask = absent_case(seed)
    kl_fn = K.topk_reverse_kl if reverse else K.topk_forward_kl
    q = K.student_buckets(torch.log_softmax(logits, dim=-1), ids, valid)
    p = K.teacher_buckets(top, valid_BTK=valid)
    kl = kl_fn(q, p, mask)
    assert torch.isfinite(kl).all() and torch.all(kl >= 0)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True), strict=True):  # each position: its present entries alone
        keep = valid[b, t]
        if not keep.any():
            continue
        one = (K.student_buckets(torch.log_softmax(logits[b, t], -1)[None, None], ids[b, t][keep][None, None]),
               K.teacher_buckets(top[b, t][keep][None, None]))
        assert kl[b, t].item() == pytest.approx(kl_fn(*one, torch.ones(1, 1)).item(), rel=1e-10, abs=1e-14)
    (grad,) = torch.autograd.grad(K.topk_loss(kl, mask, int(mask.sum())), logits)
    assert torch.isfinite(grad).all() and torch.all(grad[mask == 0] == 0)
    # a position with every entry absent compares two tails of mass 1: 0 where the trainer masks it out (update.py)
    assert torch.all(valid[1, 1] == False)  # noqa: E712
    unaligned = mask.clone()
    unaligned[1, 1] = 0.0
    kl = kl_fn(K.student_buckets(torch.log_softmax(logits, dim=-1), ids, valid), p, unaligned)
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    assert kl[1, 1].item() == 0.0 and torch.all(grad[1, 1] == 0) and torch.isfinite(grad).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_every_entry_present_is_todays_result_bit_for_bit(reverse: bool) -> None:
    kl_fn = K.topk_reverse_kl if reverse else K.topk_forward_kl
    for logits, top, ids, mask, V in many_cases():
        valid = torch.ones(ids.shape, dtype=torch.bool)
        logp = torch.log_softmax(logits, dim=-1)
        q, q_valid = K.student_buckets(logp, ids), K.student_buckets(logp, ids, valid)
        floor = 1e-6 if reverse else 0.0
        p = K.teacher_buckets(top, vocab_size=V, tail_floor=floor)
        p_valid = K.teacher_buckets(top, vocab_size=V, tail_floor=floor, valid_BTK=valid)
        assert torch.equal(q, q_valid) and torch.equal(p, p_valid)
        kl, kl_valid = kl_fn(q, p, mask), kl_fn(q_valid, p_valid, mask)
        assert torch.equal(kl, kl_valid)
        (grad,) = torch.autograd.grad(K.topk_loss(kl, mask, int(mask.sum())), logits, retain_graph=True)
        (grad_valid,) = torch.autograd.grad(K.topk_loss(kl_valid, mask, int(mask.sum())), logits)
        assert torch.equal(grad, grad_valid)
        assert torch.equal(K.sampled_in_topk(ids[..., 0], ids), K.sampled_in_topk(ids[..., 0], ids, valid))
        assert torch.equal(K.topk_mass(p), K.topk_mass(p_valid))
