"""Privileged context: the prompt after which the teacher scores the student's completion.

    rows = with_teacher_prompts(rows, config.teacher_prompt)   # at set-up (one teacher)
    rows = with_teachers(rows, config, "train")                # at set-up: each row's teacher and its prompt
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
   format. A teacher of another tokenizer always gets `prompt` + its own ids
   for the completion (rollouts.py choice 6).
   Its length is the teacher's too: limits are measured with what the
   teacher renders (its /render, rollouts.py choice 4).
3) In text mode (`dataset.prompt_format: text`) the context is a text prefix:
   the system text, a blank line, the row's prompt.
4) With several teachers (`teachers`), a row's `dataset.teacher_field`
   names its teacher (none: the default teacher), and that teacher's
   `teacher_prompt` makes its prompt. A name that is not one of the run's
   teachers is refused at set-up, naming the row and the name. The
   single-teacher style ignores the field: its rows all go to its teacher.
5) `teacher_prompt.hint` is a template filled from each row's own fields
   ("Hint: {answer}"): privileged information that differs per row (a
   reference answer, a retrieved passage) without copying it into a context
   field of every row. It goes on a line of its own at the end of the row's
   last user turn (text mode: after the prompt), next to the question, where
   few-shot examples written the same way show the teacher how to use it.
   On the demo's task a 135M teacher barely used the reference answer in
   its system message, and mostly gave it after the question with examples
   that show it (docs/results.md, "The teacher's gap"). A row without
   a field the hint names fails the run as it sets up, naming the row and
   the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opd.common import protocol as p
from opd.trainer.config import ConfigError, RunConfig, TeacherPromptConfig
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
    hint = filled_hint(cfg.hint, row.row, where) if cfg.hint else None
    own = row.row.get(cfg.row_messages)
    own_messages = row_messages(own, f"{where}: '{cfg.row_messages}'") if own is not None else None
    if not (cfg.system or cfg.examples or hint or extra or own_messages) and cfg.render == "auto":
        return None
    if row.prompt.text is not None and own_messages is None:
        prefix = "\n\n".join(x for x in (cfg.system, extra) if x)
        text = f"{row.prompt.text}\n{hint}" if hint else row.prompt.text
        return p.Prompt(text=f"{prefix}\n\n{text}" if prefix else text)
    conversation = own_messages if own_messages is not None else list(row.prompt.messages or [])
    if hint:
        conversation = with_hint(conversation, hint, where)
    parts = [cfg.system, extra]
    if conversation and conversation[0].role == "system":
        parts.append(conversation[0].content)
        conversation = conversation[1:]
    system = "\n\n".join(x for x in parts if x)
    head = [p.ChatMessage(role="system", content=system)] if system else []
    examples = [p.ChatMessage(role=t.role, content=t.content) for t in cfg.examples]
    return p.Prompt(messages=head + examples + conversation)


def with_hint(conversation: list[p.ChatMessage], hint: str, where: str) -> list[p.ChatMessage]:
    """Choice 5: the hint on a line of its own at the end of the last user turn."""
    last = max((i for i, m in enumerate(conversation) if m.role == "user"), default=None)
    if last is None:
        raise DatasetError(f"{where}: teacher_prompt.hint goes at the end of the last user turn, and the row has none")
    turn = conversation[last]
    return [*conversation[:last], p.ChatMessage(role="user", content=f"{turn.content}\n{hint}"), *conversation[last + 1:]]


def filled_hint(template: str, row: dict[str, Any], where: str) -> str:
    """Choice 5: the hint template with the row's fields filled in."""
    try:
        return template.format_map(row)  # the config checked the template: only a missing field can fail
    except KeyError as e:
        raise DatasetError(
            f"{where}: teacher_prompt.hint names the field {e.args[0]!r}, which the row lacks (it has "
            f"{', '.join(map(repr, row)) or 'no fields'}): add it to every row, or name another field in the hint"
        ) from None


def with_teacher_prompts(rows: list[PromptRow], cfg: TeacherPromptConfig, name: str = "train") -> list[PromptRow]:
    return [dataclasses.replace(r, teacher=teacher_prompt(r, cfg, f"{name} row {i}")) for i, r in enumerate(rows)]


def with_teachers(rows: list[PromptRow], config: RunConfig, name: str = "train",
                  own_tokenizer: frozenset[str] = frozenset()) -> list[PromptRow]:
    """Each row with its teacher's name and the prompt that teacher scores after (4); a teacher named in
    `own_tokenizer` (another tokenizer than the student's) always renders its own (2)."""
    teachers, field = config.teacher_set, config.dataset.teacher_field
    default = config.default_teacher_name
    out = []
    for i, r in enumerate(rows):
        chosen = r.row.get(field) if config.teachers is not None else None
        chosen = default if chosen is None else chosen
        if not isinstance(chosen, str) or chosen not in teachers:
            raise ConfigError(
                f"{name} row {i}: its {field!r} names the teacher {chosen!r}, which is not one of the run's teachers "
                f"({', '.join(teachers)}): name one of them in `teachers`, or fix the row"
            )
        cfg = teachers[chosen].teacher_prompt
        if chosen in own_tokenizer:
            cfg = cfg.model_copy(update={"render": "teacher"})
        prompt = teacher_prompt(r, cfg, f"{name} row {i}")
        out.append(dataclasses.replace(r, teacher=prompt, teacher_name=chosen))
    return out


def score_sequence(prompt_ids: list[int], token_ids: list[int], teacher: p.Prompt | None) -> p.ScoreSequence:
    """The student's completion after the student's own prompt ids, or after the teacher's own prompt."""
    if teacher is None:
        return p.ScoreSequence(token_ids=prompt_ids + token_ids, start=len(prompt_ids))
    return p.ScoreSequence(prompt=teacher, completion=token_ids)
