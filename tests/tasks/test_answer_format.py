"""The shipped skill task: its verifier, its data and its config fit together."""

from __future__ import annotations

from pathlib import Path

from services.tasks.answer_format import verify
from services.trainer.config import build_config, deep_merge
from services.trainer.context import with_teacher_prompts
from services.trainer.data import load_prompts
from services.trainer.rollouts import load_callable
from services.up.config import DEFAULT_CONFIG, load_stack

SKILL = DEFAULT_CONFIG.parent / "answer_format.yaml"


def test_the_verifier_checks_the_format() -> None:
    assert verify({}, "ANSWER: Paris")
    assert verify({}, "  ANSWER:Paris, of course")
    assert not verify({}, "The answer is ANSWER: Paris")
    assert not verify({}, "Answer: Paris") and not verify({}, "ANSWER Paris") and not verify({}, "")


def test_the_skill_stack_gives_the_teacher_a_context_the_student_never_sees(monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the config's dataset paths are relative to the repository
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
        assert "ANSWER:" in teacher[0] and sum(verify({}, t) for t in teacher[1:-1]) == len(teacher[1:-1]) // 2
