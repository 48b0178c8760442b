"""Scoring by a teacher of another tokenizer: its own ids for each completion, chunks, credit, top-k (rollouts.py 6, 7).

    prepare(sample, teacher, student_table, student_eot)   # sample.teacher_ids, sample.chunks
    fit(sample, max_len, prompt_len)                       # trimmed at a chunk boundary to the teacher's length
    sample.teacher_logprobs = credited(sample, scores)     # one value per student token (alignment.credit)
    to_student = student_ids(teacher, student_tokenizer, student_table)  # once per teacher, for a top-k loss (4)
    sample.teacher_topk_ids, sample.teacher_topk_logprobs = student_topk(sample, top_ids, top_lps, to_student, k)

Choices:
1) Where the teacher's vocabulary holds every token the student sampled (the
   same bytes as one teacher token: the same segmentation under other ids),
   the teacher scores the student's own tokens, mapped: every chunk is one
   token and the run is the run on token ids. Otherwise it scores its own
   tokenization of the completion's bytes (`alignment.encode_bytes`): the
   way the teacher itself writes that text, cut into chunks. Either way
   after its own rendering of the row's prompt
   (the run's rows carry a teacher prompt for it: context.py, `render:
   teacher`; for a stock vLLM or SGLang server, which takes token ids only,
   the trainer renders it with the teacher's tokenizer and chat template).
   A completion that ends the student's turn (the student
   tokenizer's end-of-sequence id) ends with the teacher's own end-of-turn
   token instead (`alignment.end_of_turn`).
2) A completion too long for the teacher loses its last chunks, never part of
   a chunk: both sides keep the same bytes, and the student tokens cut are
   counted in `trimmed_tokens` as on the token-id path.
3) The records say what the alignment did, over the step's aligned samples:
   `aligned_chunks`, `multi_token_chunks` (the share of chunks longer than one
   token on either side: 0 means the two tokenizations agree wherever they
   were used) and `bytes_per_chunk`.
4) A top-k loss (update.py choice 5) needs the teacher's top-k in student
   ids. Where every chunk of a sample is one token on both sides (the mapped
   path of 1), completion token j is scored by the teacher at its position
   j, and each teacher id of its top-k there becomes the student's token of
   the same bytes (`student_ids`, built once per teacher): an ordinary token
   the student's ordinary one, a special token (the chat markup) the
   student's special one of the same content; the teacher's end-of-turn id
   becomes the student's (its eos_token_id), as in 1. A teacher id with no
   such student token (bytes the student has no single token for, a special
   token the student lacks) is absent: id -1, logprob -inf, its mass left in
   the teacher's tail (topk.py choice 9); two teacher ids of the same bytes
   (a byte-fallback token beside the plain one) are one student bucket,
   their probabilities added, the second absent. Where a chunk spans
   several tokens, the teacher's positions are not the student's and its
   top-k ranks its own next tokens, not the student's: every entry of every
   position of that sample is absent, and the trainer counts those tokens
   in `topk_unaligned`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

from opd.common.errors import InvalidInput
from opd.trainer.alignment import ByteTable, align, chunk_logprobs, credit, encode_bytes, end_of_turn, token_bytes


def token_ids_by_bytes(tokenizer: Any, table: ByteTable) -> dict[bytes, int]:
    """Each byte string that is one of the tokenizer's ordinary tokens -> its id (special tokens left out)."""
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, int] = {}
    for i, piece in enumerate(table.pieces):
        if piece and i not in special:
            out.setdefault(piece, i)
    return out


def prepare(s: Any, teacher: Any, student_table: ByteTable, student_eot: Collection[int]) -> None:
    """The teacher's ids for the sample's completion and the chunks both tokenizations share (1)."""
    table: ByteTable = teacher.table
    eot_id = teacher.tokenizer.eos_token_id
    pieces = token_bytes(student_table, s.token_ids)
    ends_turn = bool(s.token_ids) and s.token_ids[-1] in student_eot and eot_id is not None
    content = pieces[:-1] if ends_turn else pieces
    mapped = [teacher.by_bytes.get(piece) for piece in content]
    if all(i is not None for i in mapped):  # the student's own tokens, under the teacher's ids
        ids = list(mapped)
    else:
        ids = encode_bytes(table, b"".join(content))
    if ends_turn:
        pieces = end_of_turn(pieces, s.token_ids, student_eot, table.pieces[eot_id] or b"")
        ids.append(eot_id)
    s.teacher_ids, s.chunks = ids, align(pieces, token_bytes(table, ids))


def fit(s: Any, max_len: int | None, prompt_len: int) -> None:
    """Drops the last chunks until the teacher's prompt + its ids fit `max_len` (2)."""
    if max_len is None or prompt_len + len(s.teacher_ids) <= max_len:
        return
    room = max_len - prompt_len
    kept = [c for c in s.chunks if c.teacher.stop <= room]
    if not kept:
        raise InvalidInput(
            f"the teacher's prompt, {prompt_len} tokens as it renders, leaves no room for the completion's first chunk "
            f"under the teacher's maximum length of {max_len}: shorten the prompts, or serve the teacher with a longer "
            "max_model_len")
    keep = kept[-1].student.stop
    s.trimmed += len(s.token_ids) - keep
    s.token_ids, s.sampling_logprobs, s.finish_reason = s.token_ids[:keep], s.sampling_logprobs[:keep], "length"
    s.teacher_ids, s.chunks = s.teacher_ids[: kept[-1].teacher.stop], kept


def rendered(tokenizer: Any, prompt: Any) -> Any:
    """The prompt as the teacher's token ids (its chat template, or its encoding of the text), for a stock server."""
    from opd.common import protocol as p
    from opd.common.tokenizer import render_prompt

    return prompt if prompt.token_ids is not None else p.Prompt(token_ids=render_prompt(tokenizer, prompt))


def credited(s: Any, teacher_logprobs: Sequence[float]) -> list[float]:
    """One teacher value per student token, from the teacher's logprobs of its own ids (alignment.credit)."""
    return credit(s.sampling_logprobs, chunk_logprobs(teacher_logprobs, [c.teacher for c in s.chunks]), s.chunks)


def student_ids(teacher: Any, student_tokenizer: Any, student_table: ByteTable) -> list[int]:
    """Each teacher id -> the student's token of the same bytes (ordinary to ordinary, special to special), its
    end-of-turn id -> the student's eos_token_id, -1 where there is none (4). Once per teacher."""
    ordinary = token_ids_by_bytes(student_tokenizer, student_table)
    special = {student_table.pieces[i]: i for i in student_tokenizer.all_special_ids if student_table.pieces[i]}
    teacher_special = set(teacher.tokenizer.all_special_ids)
    out = [(special if i in teacher_special else ordinary).get(piece, -1) if piece else -1
           for i, piece in enumerate(teacher.table.pieces)]
    eot_id, student_eot = teacher.tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if eot_id is not None and student_eot is not None:
        out[eot_id] = student_eot
    return out


def student_topk(s: Any, ids_TK: Sequence[Sequence[int]], logprobs_TK: Sequence[Sequence[float]],
                 to_student: Sequence[int], top_k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The teacher's top-k at each of the sample's completion tokens (its rows, one per teacher id scored) in
    student ids, `top_k` entries a row, -1 (logprob -inf) where absent; a sample with a chunk of several tokens:
    every entry absent, one row per student token (4)."""
    absent = [[-1] * top_k for _ in s.token_ids], [[-math.inf] * top_k for _ in s.token_ids]
    if any(len(c.student) != 1 or len(c.teacher) != 1 for c in s.chunks) or len(ids_TK) != len(s.token_ids):
        return absent
    out_ids, out_lps = [], []
    for row_ids, row_lps in zip(ids_TK, logprobs_TK, strict=True):
        ids, lps = [], []
        for i, lp in zip(row_ids, row_lps, strict=True):
            mine = to_student[i] if 0 <= i < len(to_student) else -1
            if mine >= 0 and mine in ids:  # the same bytes as an entry before it: one bucket
                at = ids.index(mine)
                lps[at] = _logaddexp(lps[at], lp)
                mine = -1
            ids.append(mine)
            lps.append(lp if mine >= 0 else -math.inf)
        out_ids.append(ids)
        out_lps.append(lps)
    return out_ids, out_lps


def _logaddexp(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def summary(samples: Sequence[Any]) -> dict[str, float]:
    """The alignment's figures over the samples scored on bytes (3); {} when there are none."""
    aligned = [s.chunks for s in samples if getattr(s, "chunks", None) is not None]
    if not aligned:
        return {}
    cut = [c for chunks in aligned for c in chunks]
    return {"aligned_chunks": len(cut),
            "multi_token_chunks": sum(len(c.student) > 1 or len(c.teacher) > 1 for c in cut) / max(1, len(cut)),
            "bytes_per_chunk": sum(c.end - c.start for c in cut) / max(1, len(cut))}
