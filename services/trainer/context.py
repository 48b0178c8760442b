"""Privileged context: the prompt after which the teacher scores the student's completion.

    rows = with_teacher_prompts(rows, config.teacher_prompt)   # at set-up
    sequence = score_sequence(sample)                          # one sequence of POST teacher/logprobs

The teacher may see what the student never does (instructions, a persona,
few-shot examples, per-row hints); distilling then moves a behaviour held in a
prompt into the student's weights. Choices:
1) The teacher's conversation for a row is, in order: one system message made
   of `teacher_prompt.system`, the row's `teacher_context` and the system
   message the row's own conversation opens with, if any (joined by blank
   lines); the few-shot `examples`; then the row's `teacher_messages` when it
   has them, else the student's conversation (less its system message, merged
   above).
2) A row with no context (and `render: auto`) is scored on the student's own
   prompt token ids, exactly what the student conditioned on. With a context,
   or `render: teacher`, the teacher gets `prompt` + `completion`: it renders
   the prompt with its own chat template and scores exactly the completion
   tokens, so a teacher whose template differs from the student's sees its own
   format. Tokenizers must still match: the completion is the student's ids.
3) In text mode (`dataset.prompt_format: text`) the context is a text prefix:
   the system text, a blank line, the row's prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opd.common import protocol as p
from opd.trainer.config import TeacherPromptConfig
from opd.trainer.data import DatasetError, PromptRow


def row_messages(value: Any, where: str) -> list[p.ChatMessage]:
    ok = isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    if not ok:
        raise DatasetError(f"{where}: must be a non-empty list of {{'role', 'content'}} messages")
    return [p.ChatMessage(role=m["role"], content=m["content"]) for m in value]


def teacher_prompt(row: PromptRow, cfg: TeacherPromptConfig, where: str = "row") -> p.Prompt | None:
    """The prompt the teacher scores this row's completions after; None: the student's own prompt ids."""
    extra = row.row.get(cfg.row_context)
    if extra is not None and not isinstance(extra, str):
        raise DatasetError(f"{where}: '{cfg.row_context}' must be a text")
    own = row.row.get(cfg.row_messages)
    own_messages = row_messages(own, f"{where}: '{cfg.row_messages}'") if own is not None else None
    if not (cfg.system or cfg.examples or extra or own_messages) and cfg.render == "auto":
        return None
    if row.prompt.text is not None and own_messages is None:
        prefix = "\n\n".join(x for x in (cfg.system, extra) if x)
        return p.Prompt(text=f"{prefix}\n\n{row.prompt.text}" if prefix else row.prompt.text)
    conversation = own_messages if own_messages is not None else list(row.prompt.messages or [])
    parts = [cfg.system, extra]
    if conversation and conversation[0].role == "system":
        parts.append(conversation[0].content)
        conversation = conversation[1:]
    system = "\n\n".join(x for x in parts if x)
    head = [p.ChatMessage(role="system", content=system)] if system else []
    examples = [p.ChatMessage(role=t.role, content=t.content) for t in cfg.examples]
    return p.Prompt(messages=head + examples + conversation)


def with_teacher_prompts(rows: list[PromptRow], cfg: TeacherPromptConfig, name: str = "train") -> list[PromptRow]:
    return [dataclasses.replace(r, teacher=teacher_prompt(r, cfg, f"{name} row {i}")) for i, r in enumerate(rows)]


def score_sequence(prompt_ids: list[int], token_ids: list[int], teacher: p.Prompt | None) -> p.ScoreSequence:
    """The student's completion after the student's own prompt ids, or after the teacher's own prompt."""
    if teacher is None:
        return p.ScoreSequence(token_ids=prompt_ids + token_ids, start=len(prompt_ids))
    return p.ScoreSequence(prompt=teacher, completion=token_ids)
