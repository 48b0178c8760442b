"""The skill task of the demo: reply with the bare answer, as the teacher is told and the student is not.

    eval.verifier: opd.tasks.short_answer:verify              # form: held-out `accuracy`
    eval.measures: {correct: opd.tasks.short_answer:correct,  # `accuracy_correct`
                    content: opd.tasks.short_answer:content}  # `accuracy_content`

The data (`services/data/questions/`, 184 train + 64 held-out short
questions: capitals, colours, animal sounds and legs, opposites, plurals,
sums and products, "name a ...") are plain questions. The privileged context,
in `services/configs/skill.yaml` (`run.teacher_prompt`), is a system message
asking for the bare answer in one to three words, six few-shot turns that
show it, and the row's reference answer as a hint after its question
(`hint: "Hint: {answer}"`, which the few-shot questions show too).
SmolLM2-135M-Instruct does so in 96% of its held-out replies when shown the
context and in 4% without (it answers in sentences), and gives the right
answer in 77% and 19% (`python benchmarks/task_gap.py`), so the student has
the skill rarely and the teacher mostly: on-policy distillation has samples
of both kinds to grade, and moves the skill into the student's weights.

Each row carries a reference answer (`answer`, and `accept` variants), so
three measures are reported:
- form (`verify`): one line of one to three words, the skill the context teaches;
- correct: the form, and the reply gives the reference answer;
- content: the reply gives the reference answer, in any form
  ("The capital of Thailand is Bangkok." counts).
What "gives" means (case, articles, punctuation, numbers as digits or
words, echoes of the question) is in answers.py.

Choices:
1) The verifier checks the form, not whether the answer is right: the form
   is what the context teaches; `correct` and `content` watch the facts,
   which a 135M model holds unreliably and distillation may lose.
2) One line of one to three words (a word: letters, digits, apostrophes,
   hyphens); surrounding whitespace and punctuation are forgiven. A reply
   cut off at max_tokens is a long one, so it fails.
"""

from __future__ import annotations

import re

from opd.tasks.answers import mentions

MAX_WORDS = 3
WORD = re.compile(r"[\w'-]+")


def verify(row: dict, completion: str) -> bool:
    """True when the reply is one line of one to three words."""
    text = completion.strip()
    return bool(text) and "\n" not in text and 1 <= len(WORD.findall(text)) <= MAX_WORDS


def content(row: dict, completion: str) -> bool:
    """True when the reply gives the row's reference answer, in whatever form."""
    return mentions(row, completion)


def correct(row: dict, completion: str) -> bool:
    """True when the reply has the form and gives the row's reference answer."""
    return verify(row, completion) and mentions(row, completion)
