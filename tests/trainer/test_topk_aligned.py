"""The teacher's top-k across tokenizers (aligned.py choice 4) on the hand-made byte-level BPE tokenizers of
test_alignment.py: each teacher id mapped to the student's token of the same bytes, -1 where the student has none,
the end of turn mapped, a sample scored in chunks of several tokens all -1, and the update counting such tokens in
`topk_unaligned`. Pure Python and tensors, no model, no service: a second or two."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from opd.common import protocol as p
from opd.trainer import topk as T
from opd.trainer.aligned import prepare, student_ids, student_topk, token_ids_by_bytes
from opd.trainer.alignment import byte_table
from opd.trainer.rollouts import Sample, ScoreMismatch, score_chunk
from opd.trainer.update import merge, topk_part
from tests.trainer.test_alignment import bpe

# student: 256 "th", 257 "the", 258 " c", specials 259 <|im_end|> (its end of turn), 260 <|eot|>, 261 <s>
STUDENT = bpe((b"t", b"h"), (b"th", b"e"), (b" ", b"c"))
# the same tokens under other ids, and one more: 256 "xy", 257 " c", 258 "th", 259 "the", 260 <|im_end|>,
# 261 <|eot|> (its end of turn), 262 <s>
SAME = bpe((b"x", b"y"), (b" ", b"c"), (b"t", b"h"), (b"th", b"e"))
SAME.eos_token = "<|eot|>"
# without "the": the student's "the" is two of its tokens, "th" "e"
FEWER = bpe((b"t", b"h"), (b" ", b"c"))
FEWER.eos_token = "<|eot|>"


def teacher(tok) -> SimpleNamespace:
    table = byte_table(tok)
    t = SimpleNamespace(tokenizer=tok, table=table, by_bytes=token_ids_by_bytes(tok, table))
    t.to_student = student_ids(t, STUDENT, byte_table(STUDENT))
    return t


def sample(t: SimpleNamespace) -> Sample:
    """ "the cat" and the student's end of turn, prepared for teacher t."""
    ids = [*STUDENT.encode("the cat", add_special_tokens=False), STUDENT.eos_token_id]
    assert ids == [257, 258, ord("a"), ord("t"), 259]
    s = Sample(0, [1], ids, [-0.5] * len(ids), "the cat", "stop", {})
    prepare(s, t, byte_table(STUDENT), {STUDENT.eos_token_id})
    return s


def test_teacher_ids_map_to_the_students_by_bytes() -> None:
    t = teacher(SAME)
    assert t.to_student[:256] == list(range(256))  # the bytes
    # "xy": none; <|im_end|>, not special here, none (the student's is); <|eot|>, the teacher's end of turn: the
    # student's <|im_end|>; <s>, special on both sides: the student's <s>
    assert SAME.all_special_tokens == ["<s>", "<|eot|>"] and STUDENT.all_special_tokens == ["<s>", "<|im_end|>"]
    assert t.to_student[256:] == [-1, 258, 256, 257, -1, 259, 261]
    s = sample(t)
    assert s.teacher_ids == [259, 257, ord("a"), ord("t"), 261] and all(len(c.teacher) == 1 for c in s.chunks)
    rows = [[259, 256, 260], [257, 258, 97], [97, 98, 99], [116, 256, 261], [261, 259, 262]]
    lps = [[-0.1, -2.0, -3.0], [-0.2, -2.5, -3.5], [-0.3, -1.5, -4.0], [-0.4, -1.2, -2.2], [-0.05, -3.0, -5.0]]
    ids, logprobs = student_topk(s, rows, lps, t.to_student, 3)
    assert ids == [[257, -1, -1], [258, 256, 97], [97, 98, 99], [116, -1, 259], [259, 257, 261]]
    assert logprobs[0] == [-0.1, -math.inf, -math.inf] and logprobs[1] == lps[1] and logprobs[3][2] == -2.2


def test_two_teacher_ids_of_the_same_bytes_are_one_bucket() -> None:
    s = sample(teacher(SAME))
    to_student = list(teacher(SAME).to_student)
    to_student[98] = 97  # as a byte-fallback <0x61> beside "a": the same bytes
    ids, logprobs = student_topk(s, [[97, 98, 99]] * 5, [[-1.0, -2.0, -3.0]] * 5, to_student, 3)
    assert ids[0] == [97, -1, 99]
    assert logprobs[0][0] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)), abs=1e-15)
    assert logprobs[0][1:] == [-math.inf, -3.0]


def test_a_sample_scored_in_chunks_has_no_top_k() -> None:
    t = teacher(FEWER)
    s = sample(t)
    assert s.teacher_ids[:2] == [256, ord("e")] and len(s.chunks[0].teacher) == 2  # "the" = "th" "e"
    rows = [[97, 98]] * len(s.teacher_ids)
    ids, logprobs = student_topk(s, rows, [[-1.0, -2.0]] * len(rows), t.to_student, 2)
    assert ids == [[-1, -1]] * 5 and logprobs == [[-math.inf, -math.inf]] * 5  # a row per student token


class FakeRemote:
    """Answers /logprobs with a top-k row per teacher id scored; knows the one teacher's map."""

    def __init__(self, t: SimpleNamespace, rows: list[list[tuple[int, float]]], scored: int) -> None:
        self.teachers, self.default_teacher, self.rows, self.scored = {"default": t}, "default", rows, scored

    def score(self, sequences, teacher=None, top_k: int = 0) -> p.LogprobsResponse:
        top = [[p.TopLogprob(token_id=i, logprob=lp) for i, lp in row] for row in self.rows]
        result = p.SequenceLogprobs(token_ids=[1] * (self.scored + 1), start=1, logprobs=[-0.5] * self.scored,
                                    top_logprobs=top)
        return p.LogprobsResponse(model="t", results=[result], usage=p.Usage())


def test_scoring_keeps_the_top_k_in_student_ids() -> None:
    t = teacher(SAME)
    s = sample(t)
    rows = [[(259, -0.1), (256, -2.0)], [(257, -0.2), (258, -2.5)], [(97, -0.3), (98, -1.5)],
            [(116, -0.4), (256, -1.2)], [(261, -0.05), (259, -3.0)]]
    score_chunk(FakeRemote(t, rows, 5), [s], "default", 2)  # type: ignore[arg-type]
    assert s.teacher_topk_ids == [[257, -1], [258, 256], [97, 98], [116, -1], [259, 257]]
    chunked = sample(teacher(FEWER))
    scored = len(chunked.teacher_ids)
    assert scored == 6
    with pytest.raises(ScoreMismatch, match="5 top-k rows for a 6-token"):  # a row per teacher id scored, or refused
        score_chunk(FakeRemote(teacher(FEWER), rows, scored), [chunked], "default", 2)  # type: ignore[arg-type]
    rows = [[(97, -1.0), (98, -2.0)]] * scored
    score_chunk(FakeRemote(teacher(FEWER), rows, scored), [chunked], "default", 2)  # type: ignore[arg-type]
    assert chunked.teacher_topk_ids == [[-1, -1]] * 5 and len(chunked.teacher_logprobs) == 5


def test_the_update_counts_tokens_without_a_usable_top_k() -> None:
    """Two samples: one mapped (an entry absent here and there), one chunked (all absent). The chunked one's tokens
    are `topk_unaligned`, add 0 to the KL and its gradient, and are no misses; merge sums the count."""
    mapped, chunked = sample(teacher(SAME)), sample(teacher(FEWER))
    mapped.teacher_topk_ids = [[257, -1], [258, 256], [98, 99], [116, -1], [259, 257]]  # "a" (97) outside
    mapped.teacher_topk_logprobs = [[-0.1, -math.inf], [-0.2, -2.5], [-0.3, -1.5], [-0.4, -math.inf], [-0.05, -3.0]]
    chunked.token_ids = chunked.token_ids[:4]  # another length: padding
    chunked.teacher_topk_ids, chunked.teacher_topk_logprobs = [[-1, -1]] * 4, [[-math.inf, -math.inf]] * 4
    V = 262
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logp = torch.log_softmax(logits, dim=-1)
    buckets = []
    for b, s in enumerate([mapped, chunked]):
        ids = torch.tensor(s.teacher_topk_ids)
        buckets.append(T.student_buckets(logp[b, : len(s.token_ids)][None], ids[None], (ids >= 0)[None])[0])
    mask = torch.tensor([[1.0] * 5, [1.0] * 4 + [0.0]])
    policy = SimpleNamespace(model=SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(1, V)))
    config = SimpleNamespace(loss=SimpleNamespace(distill="topk_reverse", topk_weight=1.0))
    loss, stats = topk_part(torch.tensor(0.0), {"tokens": 9.0}, [mapped, chunked], buckets, mask, config, 9, policy)
    assert stats["topk_unaligned"] == 4 and stats["topk_misses"] == 1  # the chunked sample's tokens are no misses
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and torch.all(grad[1] == 0) and grad[0].abs().sum() > 0
    alone, _ = topk_part(torch.tensor(0.0), {"tokens": 5.0}, [mapped], buckets[:1], mask[:1], config, 9, policy)
    assert loss.item() == alone.item(), "the chunked sample adds exactly 0"
    ratio = {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "clip_fraction": 0.0}
    assert merge([{**ratio, **stats}, {**ratio, **stats}])["topk_unaligned"] == 8
