"""The part every shipped skill stack must get right, checked the same way for each task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opd.trainer.config import build_config, deep_merge
from opd.trainer.context import with_teacher_prompts
from opd.trainer.data import load_prompts
from opd.trainer.rollouts import load_callable
from opd.up.config import load_stack

REPO = Path(__file__).resolve().parents[2]


def held_out_conversations(stack_file: Path, verify: Callable, monkeypatch) -> list[tuple[list[str], list[str]]]:
    """(student, teacher) message texts per held-out row, after checking the stack's verifier and data split."""
    monkeypatch.chdir(REPO)  # the stack files' dataset paths are relative to the repository
    stack = load_stack(stack_file)
    run = build_config(deep_merge(stack.run, {"student": {"model": "m"}, "teacher_urls": ["http://t"],
                                              "student_url": "http://s"}), environ={})
    assert load_callable(run.eval.verifier, "eval.verifier") is verify
    train, held = load_prompts(run.dataset, run.seed)
    assert len(train) >= 150 and len(held) >= 32
    assert not {r.row["prompt"] for r in train} & {r.row["prompt"] for r in held}
    out = []
    for row in with_teacher_prompts(held, run.teacher_prompt, "eval"):
        student = [m.content for m in row.prompt.messages]
        teacher = [m.content for m in row.teacher.messages]
        hint = f"\n{run.teacher_prompt.hint.format_map(row.row)}" if run.teacher_prompt.hint else ""
        assert student == [row.row["prompt"]] and teacher[-1] == row.row["prompt"] + hint
        out.append((student, teacher))
    return out
