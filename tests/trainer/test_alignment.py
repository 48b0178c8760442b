"""The alignment of a completion across two tokenizations (alignment.py), on hand-made byte-level BPE tokenizers
whose merges are written here, so every segmentation and every chunk below is known in advance."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from opd.trainer.alignment import (
    Chunk, align, byte_table, bytes_to_unicode, chunk_logprobs, chunks, credit, encode_bytes, end_of_turn, spans,
    token_byte_spans, token_bytes,
)

SPECIALS = ["<|im_end|>", "<|eot|>", "<s>"]


def bpe(*merges: tuple[bytes, bytes], bos: bool = False):
    """A byte-level BPE tokenizer: ids 0-255 are the bytes, then one token per merge, then SPECIALS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spell = bytes_to_unicode()
    chars = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    vocab = {spell[b]: b for b in range(256)}
    for left, right in merges:
        vocab[chars(left + right)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(chars(a), chars(b)) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<s>")


def pieces(tokenizer, text: str) -> list[bytes]:
    return token_bytes(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def lps(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [-rng.uniform(0.01, 6.0) for _ in range(n)]


def test_identical_tokenizations_are_one_token_chunks_and_credit_is_the_teacher_to_the_bit() -> None:
    tok = bpe((b"t", b"h"), (b" ", b"c"), (b"th", b"e"))
    ids = tok.encode("the cat sat", add_special_tokens=False)
    assert token_bytes(tok, ids) == [b"the", b" c", b"a", b"t", b" ", b"s", b"a", b"t"]
    cut = align(token_bytes(tok, ids), token_bytes(tok, ids))
    assert cut == [Chunk(range(k, k + 1), range(k, k + 1), a, b) for k, (a, b) in enumerate(token_byte_spans(tok, ids))]
    student, teacher = lps(len(ids), 1), lps(len(ids), 2)
    assert credit(student, chunk_logprobs(teacher, [c.teacher for c in cut]), cut) == teacher  # == on floats: exact


def test_multibyte_characters_split_differently() -> None:
    """"日本" = e6 97 a5 | e6 9c ac: the student has 日 whole and 本 as e69c+ac, the teacher e6+97a5 | e6+9cac."""
    student = bpe((b"\xe6", b"\x97"), (b"\xe6\x97", b"\xa5"), (b"\xe6", b"\x9c"))
    teacher = bpe((b"\x97", b"\xa5"), (b"\x9c", b"\xac"))
    s, t = pieces(student, "日本"), pieces(teacher, "日本")
    assert s == [b"\xe6\x97\xa5", b"\xe6\x9c", b"\xac"]
    assert t == [b"\xe6", b"\x97\xa5", b"\xe6", b"\x9c\xac"]
    assert align(s, t) == [Chunk(range(0, 1), range(0, 2), 0, 3), Chunk(range(1, 3), range(2, 4), 3, 6)]
    # "é" (c3 a9) whole on one side, two bytes on the other; an emoji (f0 9f 98 80) cut 2+2 against 1+2+1
    student, teacher = bpe((b"\xc3", b"\xa9"), (b"\xf0", b"\x9f"), (b"\x98", b"\x80")), bpe((b"\x9f", b"\x98"))
    s, t = pieces(student, "é😀"), pieces(teacher, "é😀")
    assert s == [b"\xc3\xa9", b"\xf0\x9f", b"\x98\x80"] and t == [b"\xc3", b"\xa9", b"\xf0", b"\x9f\x98", b"\x80"]
    assert align(s, t) == [Chunk(range(0, 1), range(0, 2), 0, 2), Chunk(range(1, 3), range(2, 5), 2, 6)]


def test_completion_cut_mid_character_keeps_its_bytes() -> None:
    """max_tokens stopped the student inside 本: its last token is e6 9c, the text ends in invalid UTF-8."""
    student = bpe((b"\xe6", b"\x97"), (b"\xe6\x97", b"\xa5"), (b"\xe6", b"\x9c"))
    teacher = bpe((b"\x97", b"\xa5"), (b"\x9c", b"\xac"))
    ids = student.encode("日本", add_special_tokens=False)[:-1]
    s = token_bytes(student, ids)
    assert s == [b"\xe6\x97\xa5", b"\xe6\x9c"] and token_byte_spans(student, ids) == [(0, 3), (3, 5)]
    assert student.decode(ids) == "日\ufffd"  # the text loses what the bytes keep
    teacher_ids = encode_bytes(teacher, b"".join(s))  # 日 as text, then the cut bytes as the teacher's byte tokens
    assert teacher_ids == [0xE6, 256, 0xE6, 0x9C]  # 256: the teacher's first merge, 97 a5
    assert align(s, token_bytes(teacher, teacher_ids)) == [Chunk(range(0, 1), range(0, 2), 0, 3),
                                                           Chunk(range(1, 2), range(2, 4), 3, 5)]
    assert encode_bytes(teacher, b"\x9cok") == [0x9C, ord("o"), ord("k")]  # a stray byte in the middle too


def test_leading_spaces_and_no_bos_in_the_teachers_completion() -> None:
    """The student has " the" whole, the teacher " " + "the"; a double space splits as the pre-tokenizer splits it."""
    student = bpe((b" ", b"t"), (b" t", b"h"), (b" th", b"e"))
    teacher = bpe((b"t", b"h"), (b"th", b"e"), bos=True)
    assert teacher.encode(" the")[0] == teacher.convert_tokens_to_ids("<s>")  # its post-processor adds BOS ...
    teacher_ids = encode_bytes(teacher, b" the  the")  # ... which a completion never carries
    s, t = pieces(student, " the  the"), token_bytes(teacher, teacher_ids)
    assert s == [b" the", b" ", b" the"] and t == [b" ", b"the", b" ", b" ", b"the"]
    assert align(s, t) == [Chunk(range(0, 1), range(0, 2), 0, 4), Chunk(range(1, 2), range(2, 3), 4, 5),
                           Chunk(range(2, 3), range(3, 5), 5, 9)]


def test_end_of_turn_is_mapped_to_the_teachers() -> None:
    student, teacher = bpe((b"h", b"i")), bpe()
    im_end, eot = student.convert_tokens_to_ids("<|im_end|>"), teacher.convert_tokens_to_ids("<|eot|>")
    ids = [*student.encode("hi", add_special_tokens=False), im_end]
    assert token_bytes(student, ids) == [b"hi", b"<|im_end|>"]
    s = end_of_turn(token_bytes(student, ids), ids, {im_end}, token_bytes(teacher, [eot])[0])
    assert s == [b"hi", b"<|eot|>"]
    teacher_ids = encode_bytes(teacher, b"".join(s[:-1])) + [eot]
    assert teacher_ids == [ord("h"), ord("i"), eot]
    assert align(s, token_bytes(teacher, teacher_ids)) == [Chunk(range(0, 1), range(0, 2), 0, 2),  # "hi" | "h" "i"
                                                           Chunk(range(1, 2), range(2, 3), 2, 9)]  # the end of turn
    cut_by_length = ids[:-1]  # no end of turn: nothing to map
    assert end_of_turn(token_bytes(student, cut_by_length), cut_by_length, {im_end}, b"<|eot|>") == [b"hi"]


def test_empty_completion_has_no_chunks() -> None:
    tok = bpe()
    assert token_byte_spans(tok, []) == [] and encode_bytes(tok, b"") == []
    assert chunks([], []) == [] and align([], []) == []
    assert chunk_logprobs([], []) == [] and credit([], [], []) == []


def test_sums_per_chunk_and_per_sequence() -> None:
    """Σ chunks = Σ tokens on each side; the credited rewards of a chunk sum to log p_s(chunk) - log p_t(chunk),
    spread evenly over its student tokens."""
    s_spans = [(0, 3), (3, 5), (5, 6), (6, 7), (7, 9)]
    t_spans = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 9)]
    cut = chunks(s_spans, t_spans)
    assert cut == [Chunk(range(0, 1), range(0, 2), 0, 3), Chunk(range(1, 3), range(2, 4), 3, 6),
                   Chunk(range(3, 5), range(4, 5), 6, 9)]
    student, teacher = lps(5, 3), lps(5, 4)
    s_chunk, t_chunk = chunk_logprobs(student, [c.student for c in cut]), chunk_logprobs(teacher, [c.teacher for c in cut])
    assert math.fsum(t_chunk) == pytest.approx(math.fsum(teacher), abs=1e-12)
    assert math.fsum(s_chunk) == pytest.approx(math.fsum(student), abs=1e-12)
    credited = credit(student, t_chunk, cut)
    rkl = [s - t for s, t in zip(student, credited, strict=True)]  # loss.reverse_kl's per-token terms
    for c, ls, lt in zip(cut, s_chunk, t_chunk, strict=True):
        assert math.fsum(rkl[k] for k in c.student) == pytest.approx(ls - lt, abs=1e-12)
        assert all(rkl[k] == pytest.approx((ls - lt) / len(c.student), abs=1e-12) for k in c.student)
    assert credited[0] == t_chunk[0]  # one student token: the teacher's chunk logprob itself
    assert math.fsum(rkl) == pytest.approx(math.fsum(student) - math.fsum(teacher), abs=1e-12)


def test_mismatches_say_what_differs() -> None:
    with pytest.raises(ValueError, match="student's 2 tokens cover 5 bytes but the teacher's 1 cover 4"):
        chunks([(0, 3), (3, 5)], [(0, 4)])
    with pytest.raises(ValueError, match="must tile the completion"):
        chunks([(0, 3), (4, 5)], [(0, 5)])
    with pytest.raises(ValueError, match="different bytes from byte 2"):
        align([b"hi!"], [b"hi", b"?"])
    with pytest.raises(ValueError, match="chunks cover 1 student tokens but 2"):
        credit([-1.0, -2.0], [-1.0], chunks([(0, 1)], [(0, 1)]))
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        token_bytes(bpe(), [10_000])


def test_bytes_of_a_trained_tokenizer_are_its_decoded_text(tiny_tokenizer: Path) -> None:
    """On the tests' trained byte-level BPE: the tokens' bytes join to the decoded text, and encode_bytes gives back
    the tokenizer's own ids for any valid text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    table = byte_table(tok)
    for text in ["The boy said hello.", " leading  spaces\n\n", "café 日本 😀<|im_end|>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(token_bytes(table, ids)) == tok.decode(ids).encode() == text.encode()
        assert encode_bytes(table, text.encode()) == ids
        assert spans(token_bytes(table, ids)) == token_byte_spans(tok, ids)
