"""Two skills from two teachers: bare answers for the questions, bare digits for the sums and products.

    eval.verifier: opd.tasks.two_skills:verify              # form, per row's skill: held-out `accuracy`
    eval.measures: {correct: opd.tasks.two_skills:correct,  # the form and the reference answer
                    content: opd.tasks.two_skills:content}  # the reference answer, in any form

The data are the demo's questions (`services/data/questions/`); the sums and
products carry `topic: arithmetic`, which `services/configs/two_skills.yaml`
uses as each row's teacher (`dataset.teacher_field: topic`): teacher
`arithmetic` is told to reply with the result in digits ("16"), and every
other row goes to the default teacher `answers`, told to reply with the bare
answer in one to three words (the demo's context, whose examples spell
numbers as words: "Seven"). The two teachers disagree on the sums, so the
student can only satisfy both by telling the groups apart.

Choices:
1) The arithmetic form is the reply's digits alone: surrounding whitespace and
   a final full stop are forgiven, a word or a second number is not.
2) The other rows keep the demo's form (short_answer.verify), and `correct`
   and `content` are the demo's for every row (answers.py reads digits and
   number words alike).
"""

from __future__ import annotations

import re

from opd.tasks import short_answer

ARITHMETIC = "arithmetic"
DIGITS = re.compile(r"\d+")


def is_arithmetic(row: dict) -> bool:
    return row.get("topic") == ARITHMETIC


def verify(row: dict, completion: str) -> bool:
    """Digits alone for a sum or product; one to three words on one line for any other question."""
    if is_arithmetic(row):
        return DIGITS.fullmatch(completion.strip().removesuffix(".").strip()) is not None
    return short_answer.verify(row, completion)


def content(row: dict, completion: str) -> bool:
    """The reply gives the row's reference answer, in whatever form."""
    return short_answer.content(row, completion)


def correct(row: dict, completion: str) -> bool:
    """The reply has its skill's form and gives the reference answer."""
    return verify(row, completion) and content(row, completion)
