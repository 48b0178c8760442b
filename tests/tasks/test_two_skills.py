"""The two-skill task: its forms on hand-made replies, and its stack sending each row to the teacher with that skill."""

from __future__ import annotations

import pytest

from opd.tasks import short_answer
from opd.tasks.two_skills import content, correct, verify
from opd.trainer.config import build_config, deep_merge
from opd.trainer.context import with_teachers
from opd.trainer.data import load_prompts
from opd.trainer.rollouts import load_callable
from opd.up.config import DEFAULT_CONFIG, load_stack, teachers_entry
from tests.tasks.stacks import REPO

TWO_SKILLS = DEFAULT_CONFIG.parent / "two_skills.yaml"
SUM = {"prompt": "What is 11 plus 5?", "answer": "16", "topic": "arithmetic"}
CAPITAL = {"prompt": "What is the capital of Thailand?", "answer": "Bangkok"}


@pytest.mark.parametrize(("row", "reply", "form", "right", "anywhere"), [
    (SUM, "16", True, True, True),
    (SUM, " 16.", True, True, True),
    (SUM, "17", True, False, False),
    (SUM, "sixteen", False, False, True),          # the other teacher's form: a word, not digits
    (SUM, "16 apples", False, False, True),
    (SUM, "11 plus 5 is 16.", False, False, True),
    (SUM, "", False, False, False),
    (CAPITAL, "Bangkok", True, True, True),
    (CAPITAL, "The capital of Thailand is Bangkok.", False, False, True),
    (CAPITAL, "Bangaklesaraya", True, False, False),
])
def test_each_skill_has_its_own_form(row: dict, reply: str, form: bool, right: bool, anywhere: bool) -> None:
    assert (verify(row, reply), correct(row, reply), content(row, reply)) == (form, right, anywhere)


def test_the_stack_sends_sums_to_the_arithmetic_teacher_and_the_rest_to_the_answers_teacher(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the stack's dataset paths are relative to the repository
    stack = load_stack(TWO_SKILLS)
    assert stack.teachers is not None and set(stack.teachers) == {"answers", "arithmetic"}
    run = build_config(deep_merge(stack.run, {"student": {"model": "m"}, "student_url": "http://s",
                                              **teachers_entry({"answers": "http://a", "arithmetic": "http://b"})}),
                       environ={})
    assert load_callable(run.eval.verifier, "eval.verifier") is verify
    train, held = load_prompts(run.dataset, run.seed)
    for rows, where in ((train, "train"), (held, "eval")):
        routed = with_teachers(rows, run, where)
        groups = {name: [r for r in routed if r.teacher_name == name] for name in ("answers", "arithmetic")}
        assert len(groups["arithmetic"]) >= 10 and len(groups["answers"]) >= 3 * len(groups["arithmetic"])
        for name, group in groups.items():
            for r in group:
                assert (r.row.get("topic") == "arithmetic") == (name == "arithmetic")
                student = [m.content for m in r.prompt.messages]
                teacher = [m.content for m in r.teacher.messages]
                assert student == [r.row["prompt"]] and teacher[-1] == r.row["prompt"] and len(teacher) > 2
                shown = teacher[2:-1:2]  # the few-shot answers of this teacher's context
                if name == "arithmetic":
                    assert all(verify(SUM, a) for a in shown) and "digits" in teacher[0]
                else:
                    assert all(short_answer.verify({}, a) for a in shown) and not all(verify(SUM, a) for a in shown)


def test_the_stack_reports_correct_and_content_beside_the_form() -> None:
    measures = load_stack(TWO_SKILLS).run["eval"]["measures"]
    assert {name: load_callable(spec, name) for name, spec in measures.items()} == {"correct": correct,
                                                                                   "content": content}

