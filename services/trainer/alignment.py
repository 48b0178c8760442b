"""Sampled-token reverse KL across tokenizers: align a completion's bytes, score chunks, credit student tokens.

    student = byte_table(student_tokenizer); teacher = byte_table(teacher_tokenizer)     # once per tokenizer
    pieces = end_of_turn(token_bytes(student, ids), ids, student_eot_ids, teacher.pieces[teacher_eot_id])
    teacher_ids = encode_bytes(teacher, b"".join(pieces[:-1])) + [teacher_eot_id]      # when ids end the turn
    cut = align(pieces, token_bytes(teacher, teacher_ids))                             # the teacher scores teacher_ids
    sample.teacher_logprobs = credit(sample.sampling_logprobs, chunk_logprobs(teacher_lp, [c.teacher for c in cut]), cut)

In loss.py's terms the reward of a sampled token is -(log p_student - log p_teacher)
at that token. Across tokenizers the teacher has no logprob for a student
token, but both sides have one for any byte string both tokenizations cut at
the same places: a chunk. log p(chunk) is the sum of the chunk's token
logprobs on each side, and the chunks of a completion tile it, so the sum over
chunks is log p_student(y) - log p_teacher(y) exactly: the sequence's reverse
KL, as the per-token sum is today.

Choices:
1) Bytes, never strings: a token's bytes come from its vocabulary entry (the
   GPT-2 byte-to-unicode table for byte-level BPE, `<0xNN>` byte fallback and
   `▁` for SentencePiece-style vocabularies, the content of added tokens), so a
   token holding part of a multi-byte character owns exactly those bytes, and a
   completion cut mid-character by max_tokens keeps its partial bytes (its text
   may end in invalid UTF-8; the bytes are what both sides must agree on).
2) Chunks end where both tokenizations have a token boundary, and only there:
   the smallest pieces on which both sides define a probability. With identical
   tokenizations every chunk is one token on each side. A token of no bytes
   (an empty added token) joins the chunk that ends where it sits.
3) Credit: the chunk's reverse KL, log p_s(chunk) - log p_t(chunk), is spread
   evenly over its m student tokens: each gets teacher value
   log p_s(token) - (log p_s(chunk) - log p_t(chunk)) / m, so its reward is the
   chunk's KL per token and the rewards of a chunk sum to its KL. Why even and
   not all on the last token: every token of the chunk decided the chunk's
   bytes (the first byte token of a character chooses the character), so each
   gets the signal; with the default kl_discount 0 the last-token rule would
   give the chunk's earlier tokens reward 0 and never train them. A chunk of
   one student token gets the teacher's chunk logprob itself (no arithmetic),
   so identical tokenizations give the teacher's per-token logprobs to the bit
   and today's update.
4) End of turn: a student completion that stops on its end-of-turn token is
   scored by the teacher with the teacher's own end-of-turn token (`end_of_turn`
   makes the student's last token carry the teacher's end-of-turn bytes), so
   "<|im_end|>" against "<|eot_id|>" is one chunk of one token on each side.
5) The teacher's ids for a completion (`encode_bytes`) never carry BOS or
   other special tokens its post-processor adds, and bytes that are not valid
   UTF-8 become the teacher's byte tokens. A tokenizer that cannot give back
   the same bytes (a normaliser, an added prefix space) is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte -> the printable character byte-level BPE vocabularies spell it with."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class ByteTable:
    """The bytes of every token id of one tokenizer (None: an id the tokenizer does not have)."""

    pieces: list[bytes | None]
    byte_ids: list[int | None]  # the id of the token that is exactly byte b, when there is one
    tokenizer: Any  # the tokenizer it was built from, for encode_bytes


def _decoder_kinds(config: dict | None) -> set[str]:
    if not config:
        return set()
    kinds = {config.get("type", "")}
    for inner in config.get("decoders") or ():
        kinds |= _decoder_kinds(inner)
    return kinds


def byte_table(tokenizer: Any) -> ByteTable:
    """Build once per tokenizer (a transformers fast tokenizer); token_bytes then costs a list lookup per id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: load the model's tokenizer.json "
                         "(AutoTokenizer with use_fast=True) to align across tokenizers")
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    byte_level = "ByteLevel" in kinds
    unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    byte_ids: list[int | None] = [None] * 256
    for token, i in vocab.items():
        if i in added:
            piece = added[i].encode()
        elif byte_level:
            try:
                piece = bytes(unicode_to_byte[c] for c in token)
            except KeyError as exc:
                raise ValueError(f"token {i} {token!r} of a byte-level vocabulary has a character outside the byte "
                                 "table: is this tokenizer's decoder really ByteLevel?") from exc
        elif m := BYTE_FALLBACK.fullmatch(token):
            piece = bytes([int(m.group(1), 16)])
        else:
            piece = token.replace("▁", " ").encode()
        pieces[i] = piece
        if len(piece) == 1 and i not in added and (byte_ids[piece[0]] is None or BYTE_FALLBACK.fullmatch(token)):
            byte_ids[piece[0]] = i
    return ByteTable(pieces, byte_ids, tokenizer)


def _table(tokenizer_or_table: Any) -> ByteTable:
    return tokenizer_or_table if isinstance(tokenizer_or_table, ByteTable) else byte_table(tokenizer_or_table)


def token_bytes(tokenizer_or_table: Any, ids: Sequence[int]) -> list[bytes]:
    """The bytes each token id stands for, in order; their concatenation is the completion's UTF-8 bytes."""
    table = _table(tokenizer_or_table)
    out = []
    for i in ids:
        piece = table.pieces[i] if 0 <= i < len(table.pieces) else None
        if piece is None:
            raise ValueError(f"token id {i} is not in the tokenizer's vocabulary ({len(table.pieces)} ids): was the "
                             "completion sampled by a model of another tokenizer, or from a padded embedding row?")
        out.append(piece)
    return out


def spans(pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """[start, end) of each piece in their concatenation."""
    out, at = [], 0
    for piece in pieces:
        out.append((at, at + len(piece)))
        at += len(piece)
    return out


def token_byte_spans(tokenizer_or_table: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each token in the UTF-8 bytes of the decoded completion (choice 1)."""
    return spans(token_bytes(tokenizer_or_table, ids))


@dataclass(frozen=True)
class Chunk:
    """Student tokens `student` and teacher tokens `teacher` (index ranges) cover bytes [start, end) of the completion."""

    student: range
    teacher: range
    start: int
    end: int


def _ends(side: str, token_spans: Sequence[tuple[int, int]]) -> list[int]:
    at = 0
    for k, (start, end) in enumerate(token_spans):
        if start != at or end < start:
            raise ValueError(f"{side} token {k} spans bytes [{start}, {end}) but the tokens before it end at byte {at}: "
                             "spans must tile the completion from byte 0 (use token_byte_spans)")
        at = end
    return [end for _, end in token_spans]


def chunks(student_spans: Sequence[tuple[int, int]], teacher_spans: Sequence[tuple[int, int]]) -> list[Chunk]:
    """The completion cut at every byte position where both sides end a token (choice 2); no tokens, no chunks."""
    s_ends, t_ends = _ends("student", student_spans), _ends("teacher", teacher_spans)
    s_total, t_total = (s_ends[-1] if s_ends else 0), (t_ends[-1] if t_ends else 0)
    if s_total != t_total:
        raise ValueError(f"the student's {len(s_ends)} tokens cover {s_total} bytes but the teacher's {len(t_ends)} "
                         f"cover {t_total}: both must tokenize the same completion bytes (end-of-turn mapped, the same "
                         "trim); compare token_bytes of both sides")
    if not s_ends and not t_ends:
        return []
    cuts = sorted((set(s_ends) & set(t_ends)) - {0}) or [0]
    out, s_at, t_at, start = [], 0, 0, 0
    for k, cut in enumerate(cuts):
        last = k == len(cuts) - 1
        s_to = len(s_ends) if last else bisect_right(s_ends, cut)  # tokens of no bytes at the end join the last chunk
        t_to = len(t_ends) if last else bisect_right(t_ends, cut)
        out.append(Chunk(range(s_at, s_to), range(t_at, t_to), start, cut))
        s_at, t_at, start = s_to, t_to, cut
    return out


def align(student_pieces: Sequence[bytes], teacher_pieces: Sequence[bytes]) -> list[Chunk]:
    """chunks() of two tokenizations, after checking that they spell the same bytes (and saying where they part)."""
    s, t = b"".join(student_pieces), b"".join(teacher_pieces)
    if s != t:
        at = next((k for k, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
        raise ValueError(f"the student's and the teacher's tokens spell different bytes from byte {at}: "
                         f"student {s[max(0, at - 8):at + 8]!r}, teacher {t[max(0, at - 8):at + 8]!r} "
                         f"({len(s)} and {len(t)} bytes); the teacher must score the student's completion bytes")
    return chunks(spans(student_pieces), spans(teacher_pieces))


def chunk_logprobs(logprobs: Sequence[float], ranges: Sequence[range]) -> list[float]:
    """log p(chunk) = the sum of its tokens' logprobs, per range (a chunk's `student` or `teacher`); an empty range
    gives 0.0. The ranges of chunks() tile the tokens, so sum(result) == sum(logprobs) up to float rounding."""
    return [math.fsum(logprobs[k] for k in r) for r in ranges]


def credit(student_logprobs_T: Sequence[float], teacher_chunk_logprobs: Sequence[float],
           cut: Sequence[Chunk]) -> list[float]:
    """A teacher value per student token such that loss.py's reward, -(student - teacher), is the chunk's reverse KL
    spread evenly over its student tokens (choice 3): sum over a chunk of (student_k - teacher_k) equals
    log p_s(chunk) - log p_t(chunk); a one-token chunk gets the teacher's chunk logprob exactly."""
    if len(teacher_chunk_logprobs) != len(cut):
        raise ValueError(f"{len(teacher_chunk_logprobs)} teacher chunk logprobs for {len(cut)} chunks")
    covered = cut[-1].student.stop if cut else 0
    if covered != len(student_logprobs_T):
        raise ValueError(f"the chunks cover {covered} student tokens but {len(student_logprobs_T)} logprobs came: "
                         "align the same completion the student sampled")
    out = [0.0] * len(student_logprobs_T)
    for c, teacher in zip(cut, teacher_chunk_logprobs, strict=True):
        if len(c.student) == 1:
            out[c.student[0]] = teacher
            continue
        if not c.student:  # only tokens of no bytes, none of them the student's: nothing to credit
            continue
        share = (math.fsum(student_logprobs_T[k] for k in c.student) - teacher) / len(c.student)
        for k in c.student:
            out[k] = student_logprobs_T[k] - share
    return out


def end_of_turn(pieces: Sequence[bytes], ids: Sequence[int], student_eot_ids: Collection[int],
                teacher_eot: bytes) -> list[bytes]:
    """The student's pieces with its last token's bytes replaced by the teacher's end-of-turn bytes when that token
    is one of the student's end-of-turn ids (choice 4); otherwise (cut by max_tokens) unchanged. The teacher scores
    the rest of the completion followed by its own end-of-turn token id."""
    out = list(pieces)
    if ids and ids[-1] in student_eot_ids:
        out[-1] = teacher_eot
    return out


def encode_bytes(tokenizer_or_table: Any, data: bytes) -> list[int]:
    """The teacher's token ids for completion bytes (choice 5): valid UTF-8 runs through the tokenizer without special
    tokens added, other bytes (a character cut by max_tokens) as the tokenizer's single-byte tokens."""
    table = _table(tokenizer_or_table)
    ids: list[int] = []
    rest = data
    while rest:
        try:
            text, bad = rest.decode(), b""
        except UnicodeDecodeError as exc:
            text, bad = rest[: exc.start].decode(), rest[exc.start : exc.end]
        if text:
            ids.extend(table.tokenizer.encode(text, add_special_tokens=False))
        for b in bad:
            if table.byte_ids[b] is None:
                raise ValueError(f"byte 0x{b:02X} (not valid UTF-8: a character cut by max_tokens?) has no token of its "
                                 "own in the teacher's vocabulary: align with a byte-level or byte-fallback tokenizer")
            ids.append(table.byte_ids[b])
        rest = rest[len(text.encode()) + len(bad) :]
    got = b"".join(token_bytes(table, ids))
    if got != data:
        raise ValueError(f"the teacher's tokenizer turns {data[:32]!r} into tokens spelling {got[:32]!r}: a normaliser or "
                         "an added prefix space changes the text; such a tokenizer cannot score the student's bytes")
    return ids
