"""Scoring by a teacher of another tokenizer: its own ids for each completion, chunks, credit (rollouts.py choice 6).

    prepare(sample, teacher, student_table, student_eot)   # sample.teacher_ids, sample.chunks
    fit(sample, max_len, prompt_len)                       # trimmed at a chunk boundary to the teacher's length
    sample.teacher_logprobs = credited(sample, scores)     # one value per student token (alignment.credit)

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
"""

from __future__ import annotations

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


def summary(samples: Sequence[Any]) -> dict[str, float]:
    """The alignment's figures over the samples scored on bytes (3); {} when there are none."""
    aligned = [s.chunks for s in samples if getattr(s, "chunks", None) is not None]
    if not aligned:
        return {}
    cut = [c for chunks in aligned for c in chunks]
    return {"aligned_chunks": len(cut),
            "multi_token_chunks": sum(len(c.student) > 1 or len(c.teacher) > 1 for c in cut) / max(1, len(cut)),
            "bytes_per_chunk": sum(c.end - c.start for c in cut) / max(1, len(cut))}
