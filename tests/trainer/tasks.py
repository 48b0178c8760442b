"""A task reward and a verifier for the tests, loaded by 'module:function' like a user's own."""

from __future__ import annotations


def prefers_short(row: dict, completion: str) -> float:
    """Fewer characters score higher: a reward that disagrees with nothing the teacher says."""
    return -len(completion) / 100.0


def mentions_a_word_of_the_prompt(row: dict, completion: str) -> bool:
    return any(word.lower() in completion.lower().split() for word in row["prompt"].split())


def begins_with_the_skill_word(row: dict, completion: str) -> bool:
    """The skill of tests/utils/skill_model.py: the answer begins with its word."""
    from tests.utils.skill_model import SKILL_WORD

    return completion.strip().lower().startswith(SKILL_WORD)


def is_short(row: dict, completion: str) -> bool:
    """A measure beside the verifier (eval.measures): at most three words."""
    return len(completion.split()) <= 3
