"""The demo's skill task: its verifier, its data and its stack file fit together."""

from __future__ import annotations

from opd.tasks.short_answer import verify
from opd.up.config import DEFAULT_CONFIG
from tests.tasks.stacks import held_out_conversations

SKILL = DEFAULT_CONFIG.parent / "skill.yaml"


def test_the_verifier_accepts_a_bare_answer_and_refuses_a_sentence() -> None:
    for reply in ("Rome", " Paris.", "Eight legs", "New York City", "Blue-green", "Baa!", "42"):
        assert verify({}, reply), reply
    for reply in ("The capital of Italy is Rome.", "", "   ", "...", "Rome\nItaly", "It is eight legs"):
        assert not verify({}, reply), reply


def test_the_skill_stack_gives_the_teacher_a_context_the_student_never_sees(monkeypatch) -> None:
    for _, teacher in held_out_conversations(SKILL, verify, monkeypatch):
        answers = teacher[2:-1:2]  # system, then user/assistant pairs, then the question
        assert answers and all(verify({}, a) for a in answers)
        assert not any(verify({}, q) for q in teacher[1:-1:2])  # the example questions are sentences
