"""The demo's skill task: its three measures, its data with their reference answers, and its stack file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opd.tasks.answers import references
from opd.tasks.short_answer import content, correct, verify
from opd.trainer.rollouts import load_callable
from opd.up.config import DEFAULT_CONFIG, load_stack
from tests.tasks.stacks import REPO, held_out_conversations

SKILL = DEFAULT_CONFIG.parent / "skill.yaml"
QUESTIONS = REPO / "services/data/questions"
ARITHMETIC = re.compile(r"^What is (\d+) (plus|times) (\d+)\?$")


def question_rows() -> list[dict]:
    return [json.loads(line) for path in sorted(QUESTIONS.glob("*.jsonl")) for line in path.read_text().splitlines()
            if line.strip()]


def test_the_verifier_accepts_a_bare_answer_and_refuses_a_sentence() -> None:
    for reply in ("Rome", " Paris.", "Eight legs", "New York City", "Blue-green", "Baa!", "42"):
        assert verify({}, reply), reply
    for reply in ("The capital of Italy is Rome.", "", "   ", "...", "Rome\nItaly", "It is eight legs"):
        assert not verify({}, reply), reply


@pytest.mark.parametrize(("question", "answer", "reply", "form", "right", "anywhere"), [
    ("What is the capital of Thailand?", "Bangkok", "Bangkok", True, True, True),
    ("What is the capital of Thailand?", "Bangkok", "The capital of Thailand is Bangkok.", False, False, True),
    ("What is the capital of Thailand?", "Bangkok", "Bangaklesaraya", True, False, False),
    ("How many legs does a chicken have?", "2", "Two", True, True, True),
    ("How many legs does a chicken have?", "2", "2 legs", True, True, True),
    ("How many legs does a chicken have?", "2", "The answer is 12. A chicken has 12 legs.", False, False, False),
    ("How many legs does a chicken have?", "2", "10", True, False, False),
    ("What is 11 plus 5?", "16", "sixteen", True, True, True),
    ("What is 11 plus 5?", "16", "17", True, False, False),
    ("What is 11 plus 5?", "16", "11 plus 5 is 16.", False, False, True),
    ("What is the opposite of hot?", "cold", "COLD!", True, True, True),
    ("What is the plural of mouse?", "mice", "The mice", True, True, True),
])
def test_form_correct_and_content_on_hand_made_replies(question, answer, reply, form, right, anywhere) -> None:
    row = {"prompt": question, "answer": answer}
    assert (verify(row, reply), correct(row, reply), content(row, reply)) == (form, right, anywhere)


def test_every_question_has_a_reference_answer() -> None:
    rows = question_rows()
    assert len(rows) == 248
    for row in rows:
        assert set(row) <= {"prompt", "answer", "accept", "topic"} and references(row), row
        assert content(row, row["answer"]) and correct(row, row["answer"]), f"{row}: its own answer must count"
        assert all(content(row, a) for a in row.get("accept", ())), row


def test_the_arithmetic_answers_are_right() -> None:
    checked = 0
    for row in question_rows():
        if m := ARITHMETIC.match(row["prompt"]):
            a, b = int(m[1]), int(m[3])
            assert row["answer"] == str(a + b if m[2] == "plus" else a * b) and "accept" not in row, row
            checked += 1
        assert (row.get("topic") == "arithmetic") == bool(m), f"{row}: topic marks the sums and products alone"
    assert checked == 60


def test_the_skill_stack_gives_the_teacher_a_context_the_student_never_sees(monkeypatch) -> None:
    for _, teacher in held_out_conversations(SKILL, verify, monkeypatch):
        answers = teacher[2:-1:2]  # system, then user/assistant pairs, then the question
        assert answers and all(verify({}, a) for a in answers)
        assert not any(verify({}, q.split("\n")[0]) for q in teacher[1:-1:2])  # the example questions are sentences
        # Each example's question shows the hint the row's question gets: its own answer, on the next line.
        assert all(q.endswith(f"\nHint: {a}") for q, a in zip(teacher[1:-1:2], answers, strict=True))
        assert teacher[-1].count("\nHint: ") == 1 and teacher[-1].split("\nHint: ")[1]


def test_the_skill_stack_reports_correct_and_content_beside_the_form() -> None:
    measures = load_stack(SKILL).run["eval"]["measures"]
    assert {name: load_callable(spec, name) for name, spec in measures.items()} == {"correct": correct,
                                                                                   "content": content}
