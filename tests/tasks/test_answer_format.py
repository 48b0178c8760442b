"""The shipped skill task: its verifier, its data and its config fit together."""

from __future__ import annotations

from opd.tasks.answer_format import verify
from opd.up.config import DEFAULT_CONFIG
from tests.tasks.stacks import held_out_conversations

SKILL = DEFAULT_CONFIG.parent / "answer_format.yaml"


def test_the_verifier_checks_the_format() -> None:
    assert verify({}, "ANSWER: Paris")
    assert verify({}, "  ANSWER:Paris, of course")
    assert not verify({}, "The answer is ANSWER: Paris")
    assert not verify({}, "Answer: Paris") and not verify({}, "ANSWER Paris") and not verify({}, "")


def test_the_skill_stack_gives_the_teacher_a_context_the_student_never_sees(monkeypatch) -> None:
    for _, teacher in held_out_conversations(SKILL, verify, monkeypatch):
        assert "ANSWER:" in teacher[0] and sum(verify({}, t) for t in teacher[1:-1]) == len(teacher[1:-1]) // 2
