"""The demo's skill task: its verifier, its data and its stack file fit together."""

from __future__ import annotations

from pathlib import Path

from services.tasks.short_answer import verify
from services.trainer.config import build_config, deep_merge
from services.trainer.context import with_teacher_prompts
from services.trainer.data import load_prompts
from services.trainer.rollouts import load_callable
from services.up.config import DEFAULT_CONFIG, load_stack

SKILL = DEFAULT_CONFIG.parent / "skill.yaml"
REPO = Path(__file__).resolve().parents[2]


def test_the_verifier_accepts_a_bare_answer_and_refuses_a_sentence() -> None:
    for reply in ("Rome", " Paris.", "Eight legs", "New York City", "Blue-green", "Baa!", "42"):
        assert verify({}, reply), reply
    for reply in ("The capital of Italy is Rome.", "", "   ", "...", "Rome\nItaly", "It is eight legs"):
        assert not verify({}, reply), reply


def test_the_skill_stack_gives_the_teacher_a_context_the_student_never_sees(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the stack file's dataset paths are relative to the repository
    stack = load_stack(SKILL)
    run = build_config(deep_merge(stack.run, {"student": {"model": "m"}, "teacher_urls": ["http://t"],
                                              "student_url": "http://s"}), environ={})
    assert load_callable(run.eval.verifier, "eval.verifier") is verify
    train, held = load_prompts(run.dataset, run.seed)
    assert len(train) >= 150 and len(held) >= 32
    assert not {r.row["prompt"] for r in train} & {r.row["prompt"] for r in held}
    for row in with_teacher_prompts(held, run.teacher_prompt, "eval"):
        student = [m.content for m in row.prompt.messages]
        teacher = [m.content for m in row.teacher.messages]
        assert student == [row.row["prompt"]] and teacher[-1] == row.row["prompt"]
        answers = teacher[2:-1:2]  # system, then user/assistant pairs, then the question
        assert answers and all(verify({}, a) for a in answers)
        assert not any(verify({}, q) for q in teacher[1:-1:2])  # the example questions are sentences
