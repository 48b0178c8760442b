"""Scoring limits measured with the prompt the teacher scores after: a privileged context makes the teacher's
prompt longer than the student's, so a completion that fits after the student's prompt may not fit after the
teacher's (rollouts.py choice 4, remote.py choice 7). The teacher is a real hf process over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.common import protocol as p
from opd.common.client import TeacherClient
from opd.common.errors import InvalidInput
from opd.common.tokenizer import load_tokenizer, render_prompt
from opd.trainer.config import TeacherPromptConfig, build_config
from opd.trainer.context import with_teacher_prompts
from opd.trainer.data import to_prompts
from opd.trainer.remote import Remote, RenderedLengths, ScoreLimits
from opd.trainer.rollouts import Sample, chunks, kl_summary, prompt_lengths, score
from tests.utils.services import running
from tests.utils.tiny_models import WORDS

CONTEXT = TeacherPromptConfig(system=" ".join(WORDS[:40]))  # some 40 tokens the student never sees
ROWS = [{"prompt": "Where did the boy go"}, {"prompt": "Name a thing"}]


def samples(tokenizer, config: TeacherPromptConfig, completion: list[int]) -> list[Sample]:
    rows = with_teacher_prompts(to_prompts(ROWS, "chat", "test"), config)
    return [Sample(i, render_prompt(tokenizer, row.prompt), list(completion), [-1.0] * len(completion), "", "stop",
                   row.row, teacher_prompt=row.teacher) for i, row in enumerate(rows)]


def remote_for(url: str, student_model: Path) -> Remote:
    return Remote(build_config({"student": {"model": str(student_model)}, "teacher_urls": [url],
                                "student_url": "http://127.0.0.1:9", "dataset": {"path": "unused.jsonl"}}, environ={}))


def renders(log: Path) -> int:
    return log.read_text().count('"POST /render HTTP/1.1" 200')


@pytest.mark.slow
def test_a_completion_that_fits_after_the_students_prompt_is_cut_to_fit_after_the_teachers(
    teacher_model: Path, student_model: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(str(student_model))
    completion = tokenizer.encode(" ".join(WORDS[50:70]), add_special_tokens=False)[:20]
    privileged = samples(tokenizer, CONTEXT, completion)
    teacher_len = max(len(render_prompt(tokenizer, s.teacher_prompt)) for s in privileged)
    max_len = teacher_len + 5  # room for 5 tokens of the completion after the longest teacher prompt
    assert all(len(s.prompt_ids) + len(completion) <= max_len for s in privileged), "fits after the student's prompt"
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu",
            "--max-model-len", str(max_len)]
    with running("teacher-short", args, log_dir=tmp_path) as proc:
        remote = remote_for(proc.url, student_model)
        remote.teachers[remote.default_teacher].limits = ScoreLimits.of([TeacherClient(proc.url).info()])
        plain = samples(tokenizer, TeacherPromptConfig(), completion)
        score(remote, plain)  # no teacher prompt: the student's ids, as before, and no /render
        assert all(s.teacher_prompt is None and s.trimmed == 0 for s in plain) and renders(proc.log_file) == 0

        score(remote, privileged)
        assert renders(proc.log_file) == 1, "one request for the distinct teacher prompts"
        for s in privileged:
            n = len(render_prompt(tokenizer, s.teacher_prompt))
            assert len(s.token_ids) == max_len - n == len(s.teacher_logprobs) and s.finish_reason == "length"
            assert s.trimmed == len(completion) - len(s.token_ids) > 0
        assert kl_summary(privileged)["trimmed_tokens"] == sum(s.trimmed for s in privileged) >= 15

        again = samples(tokenizer, CONTEXT, completion)  # the same rows in a later epoch: measured already
        score(remote, again)
        assert renders(proc.log_file) == 1
        assert [s.teacher_logprobs for s in again] == [s.teacher_logprobs for s in privileged]

        long = samples(tokenizer, TeacherPromptConfig(system=" ".join(WORDS[:max_len])), completion)[:1]
        n = len(render_prompt(tokenizer, long[0].teacher_prompt))
        with pytest.raises(InvalidInput, match=rf"the teacher's prompt, {n} tokens as it renders, leaves no room for "
                                               rf"its completion under the teacher's maximum length of {max_len}"):
            score(remote, long)
        assert proc.alive()


def test_chunks_are_cut_by_the_teachers_prompt_lengths(student_model: Path) -> None:
    """Lengths the teacher measured (here already known to the trainer, so no request) split requests that the
    student's prompt lengths would not."""
    tokenizer = load_tokenizer(str(student_model))
    todo = samples(tokenizer, CONTEXT, [5, 6, 7])
    remote = remote_for("http://127.0.0.1:9", student_model)
    teacher = remote.teachers[remote.default_teacher]
    for s in todo:
        teacher.rendered.put(teacher.rendered.key(s.teacher_prompt), 60)
    student = [len(s.prompt_ids) + 3 for s in todo]
    lengths = [n + 3 for n in prompt_lengths(remote, remote.default_teacher, todo)]
    limits = ScoreLimits(max_sequences=8, max_request_tokens=100)
    assert lengths == [63, 63] and sum(student) <= 100
    assert chunks(student, limits) == [[0, 1]] and chunks(lengths, limits) == [[0], [1]]


def test_the_lengths_kept_are_bounded() -> None:
    kept = RenderedLengths(size=2)
    a, b, c = (kept.key(p.Prompt(text=t)) for t in "abc")
    kept.put(a, 1), kept.put(b, 2)
    assert kept.get(a) == 1  # a used last: b goes first
    kept.put(c, 3)
    assert (kept.get(a), kept.get(b), kept.get(c), len(kept)) == (1, None, 3, 2)
