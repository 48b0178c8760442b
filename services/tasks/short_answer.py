"""The skill task of the demo: reply with the bare answer, as the teacher is told and the student is not.

    eval.verifier: opd.tasks.short_answer:verify

The data (`services/data/questions/`, 184 train + 64 held-out short
questions: capitals, colours, animal sounds and legs, opposites, plurals,
sums and products, "name a ...") are plain questions. The privileged context,
in `services/configs/skill.yaml` (`run.teacher_prompt`), is a system message
asking for the bare answer in one to three words and six few-shot turns that
show it. SmolLM2-135M-Instruct does so in 79% of its held-out replies when
shown the context and in 4% without (it answers in sentences:
`python benchmarks/task_gap.py`), so the student has the skill rarely and
the teacher mostly: on-policy distillation has samples of both kinds to
grade, and moves the skill into the student's weights.

Choices:
1) The verifier checks the form, not whether the answer is right: a 135M
   model's facts are unreliable, the form is what the context teaches.
2) One line of one to three words (a word: letters, digits, apostrophes,
   hyphens); surrounding whitespace and punctuation are forgiven. A reply
   cut off at max_tokens is a long one, so it fails.
"""

from __future__ import annotations

import re

MAX_WORDS = 3
WORD = re.compile(r"[\w'-]+")


def verify(row: dict, completion: str) -> bool:
    """True when the reply is one line of one to three words."""
    text = completion.strip()
    return bool(text) and "\n" not in text and 1 <= len(WORD.findall(text)) <= MAX_WORDS
