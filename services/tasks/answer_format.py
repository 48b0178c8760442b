"""The skill task shipped with opd: answer in a fixed format the teacher is told and the student is not.

    eval.verifier: opd.tasks.answer_format:verify

The data (`services/data/questions/`, 185 train + 64 held-out short
questions: capitals, colours, animal sounds and legs, opposites, plurals,
sums and products, "name a ...") are plain questions. The privileged context,
in `services/configs/skill.yaml` (`run.teacher_prompt`), is a system message
asking for replies of the form `ANSWER: <answer>` and three few-shot turns
that show it. SmolLM2-135M-Instruct follows it most of the time when shown
it and never without (benchmarks/task_gap.py; figures in docs/results.md), so
distilling with the context moves the format into the student's weights.

Choices:
1) The verifier checks the format only, not whether the answer is right: a
   135M model's facts are unreliable, the format is what the context teaches.
2) Leading whitespace is forgiven; the tag itself must be exact (upper case,
   colon), as the context asks.
"""

from __future__ import annotations

TAG = "ANSWER:"


def verify(row: dict, completion: str) -> bool:
    """True when the completion begins with `ANSWER:`."""
    return completion.lstrip().startswith(TAG)
