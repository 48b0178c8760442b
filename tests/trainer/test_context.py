"""Privileged context: the teacher scores exactly the student's completion tokens
after its own prompt (its context, rendered with its own chat template).

The teacher here is the tiny teacher with a chat template unlike the student's
(same vocabulary), served by a real process (hf engine, float32) over HTTP;
what it answers is checked against a direct transformers forward of the
teacher prompt the test renders itself plus the student's completion ids.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from opd.common import protocol as p
from opd.trainer.config import ConfigError, TeacherPromptConfig, build_config
from opd.trainer.context import teacher_prompt, with_teacher_prompts
from opd.trainer.data import DatasetError, PromptRow, to_prompts
from opd.trainer.remote import Remote
from opd.trainer.rollouts import Sample, score
from tests.utils.services import running

OTHER_TEMPLATE = (  # the teacher's own format: nothing like the student's ChatML
    "{% for message in messages %}{{ '### ' + message['role'] + ':\n' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)
CONTEXT = TeacherPromptConfig(
    system="Answer in one short line.",
    examples=({"role": "user", "content": "The man"}, {"role": "assistant", "content": "A man."}),
)


def prompt_rows(rows: list[dict], fmt: str = "chat") -> list[PromptRow]:
    return to_prompts(rows, fmt, "test")


def roles_and_texts(prompt: p.Prompt) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in prompt.messages or []]


def test_the_teacher_conversation_is_context_then_the_row() -> None:
    rows = prompt_rows([
        {"prompt": "Name a year"},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
         "teacher_context": "The answer is 1969."},
        {"prompt": "Hi", "teacher_messages": [{"role": "user", "content": "Hi (answer in French)"}]},
    ])
    plain, merged, own = (teacher_prompt(r, CONTEXT) for r in rows)
    assert roles_and_texts(plain) == [("system", "Answer in one short line."), ("user", "The man"),
                                      ("assistant", "A man."), ("user", "Name a year")]
    assert roles_and_texts(merged)[0] == ("system", "Answer in one short line.\n\nThe answer is 1969.\n\nbe kind")
    assert roles_and_texts(merged)[-1] == ("user", "hi") and len(merged.messages) == 4
    assert roles_and_texts(own)[-1] == ("user", "Hi (answer in French)")
    # No context anywhere: the teacher scores the student's own prompt ids ...
    assert teacher_prompt(rows[0], TeacherPromptConfig()) is None
    # ... unless it renders every prompt itself (a teacher with another chat template).
    assert roles_and_texts(teacher_prompt(rows[0], TeacherPromptConfig(render="teacher"))) == [("user", "Name a year")]
    # A per-row context alone applies to its row only.
    only_row = with_teacher_prompts(rows, TeacherPromptConfig())
    assert only_row[0].teacher is None and roles_and_texts(only_row[1].teacher)[0][1].startswith("The answer is 1969.")
    text = prompt_rows([{"prompt": "Name a year"}], fmt="text")[0]
    assert teacher_prompt(text, TeacherPromptConfig(system="Be brief.")).text == "Be brief.\n\nName a year"


def test_a_hint_fills_each_rows_own_fields_into_its_last_user_turn() -> None:
    rows = prompt_rows([
        {"prompt": "Capital of Peru?", "answer": "Lima"},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "Five?"}, {"role": "user", "content": "Sure?"}], "answer": 4,
         "teacher_context": "Count on your fingers."},
    ])
    cfg = TeacherPromptConfig(system="Answer in one word.", hint="Hint: {answer}",
                              examples=({"role": "user", "content": "Capital of Chad?\nHint: N'Djamena"},
                                        {"role": "assistant", "content": "N'Djamena"}))
    peru, sums = with_teacher_prompts(rows, cfg)
    assert roles_and_texts(peru.teacher) == [("system", "Answer in one word."), ("user", "Capital of Chad?\nHint: N'Djamena"),
                                             ("assistant", "N'Djamena"), ("user", "Capital of Peru?\nHint: Lima")]
    assert roles_and_texts(sums.teacher) == [
        ("system", "Answer in one word.\n\nCount on your fingers.\n\nbe kind"), *roles_and_texts(peru.teacher)[1:3],
        ("user", "2+2?"), ("assistant", "Five?"), ("user", "Sure?\nHint: 4")]
    assert rows[0].prompt.messages[-1].content == "Capital of Peru?", "the student's own prompt is untouched"
    # A hint alone is a context: the row is no longer scored on the student's own prompt ids.
    alone = with_teacher_prompts(rows[:1], TeacherPromptConfig(hint="It is {answer}."))[0].teacher
    assert roles_and_texts(alone) == [("user", "Capital of Peru?\nIt is Lima.")]
    text = prompt_rows([{"prompt": "Capital of Peru?", "answer": "Lima"}], fmt="text")[0]
    assert teacher_prompt(text, TeacherPromptConfig(system="Be brief.", hint="Hint: {answer}")).text == (
        "Be brief.\n\nCapital of Peru?\nHint: Lima")
    with pytest.raises(DatasetError, match="row 0: teacher_prompt.hint goes at the end of the last user turn"):
        with_teacher_prompts(prompt_rows([{"prompt": "x", "answer": "y", "teacher_messages": [
            {"role": "system", "content": "only this"}]}]), TeacherPromptConfig(hint="Hint: {answer}"))


def test_a_hint_naming_a_missing_or_bad_field_says_what_to_fix() -> None:
    rows = prompt_rows([{"prompt": "Capital of Peru?", "answer": "Lima"}, {"prompt": "Name a fruit."}])
    with pytest.raises(DatasetError, match=r"eval row 1: teacher_prompt.hint names the field 'answer', which the row "
                                           r"lacks \(it has 'prompt'\)"):
        with_teacher_prompts(rows, TeacherPromptConfig(hint="Hint: {answer}"), "eval")
    base = {"student": {"model": "m"}, "teacher_urls": "http://t", "student_url": "http://s", "dataset": {"path": "d.jsonl"}}
    for hint, says in [("The answer is {}", "{} is not a row field's name"),
                       ("The answer is {0}", "{0} is not a row field's name"),
                       ("The answer is {answer", "not a template"),
                       ("The answer is known", "names no row field")]:
        with pytest.raises(ConfigError, match=f"teacher_prompt.hint.*{re.escape(says)}"):
            build_config(base, [f"teacher_prompt.hint={json.dumps(hint)}"], environ={})
    assert build_config(base, ["teacher_prompt.hint='Use {answer}, {{not this}}'"], environ={}).teacher_prompt.hint


def test_bad_context_rows_and_configs_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train row 0: 'teacher_context' must be a text"):
        with_teacher_prompts(prompt_rows([{"prompt": "x", "teacher_context": 3}]), TeacherPromptConfig())
    with pytest.raises(DatasetError, match="'teacher_messages': must be a non-empty list"):
        with_teacher_prompts(prompt_rows([{"prompt": "x", "teacher_messages": "hi"}]), TeacherPromptConfig())
    base = {"student": {"model": "m"}, "teacher_urls": "http://t", "student_url": "http://s",
            "dataset": {"path": "d.jsonl", "prompt_format": "text"}}
    with pytest.raises(ConfigError, match="few-shot turns need dataset.prompt_format 'chat'"):
        build_config(base, ["teacher_prompt.examples=[{role: user, content: hi}]"], environ={})
    with pytest.raises(ConfigError, match="teacher_prompt.sytem"):
        build_config(base, ["teacher_prompt.sytem=hi"], environ={})



@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_a_stock_teacher_refuses_a_privileged_prompt(protocol: str) -> None:
    """A stock server is sent token ids only: a run whose rows carry a teacher prompt is refused at start."""
    base = {"student": {"model": "m"}, "teacher_urls": "http://t", "student_url": "http://s", "dataset": {"path": "d.jsonl"}}
    rows = prompt_rows([{"prompt": "Name a year"}, {"prompt": "Hi", "teacher_context": "Answer in French."}])
    stock = Remote(build_config(base, [f"teacher_protocol={protocol}"], environ={}))
    stock.check_stock_teacher(rows[:1])  # no teacher prompt: token ids serve
    with pytest.raises(ConfigError, match=f"teacher_protocol {protocol}: a stock server scores token ids only"):
        stock.check_stock_teacher(with_teacher_prompts(rows, TeacherPromptConfig()))
    Remote(build_config(base, [], environ={})).check_stock_teacher(with_teacher_prompts(rows, TeacherPromptConfig()))

@pytest.fixture(scope="module")
def other_template_teacher(teacher_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher's weights and vocabulary with a chat template of its own."""
    folder = tmp_path_factory.mktemp("models") / "teacher-other-template"
    shutil.copytree(teacher_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = OTHER_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    return folder


def direct_logprobs(model, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion) - 1)
    return logp[positions, torch.tensor(completion)]


@pytest.mark.slow
def test_privileged_context_scores_the_students_tokens_under_the_teachers_prompt(
    other_template_teacher: Path, student_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_tok = AutoTokenizer.from_pretrained(student_model)
    teacher_tok = AutoTokenizer.from_pretrained(other_template_teacher)
    rows = with_teacher_prompts(prompt_rows([
        {"prompt": "What is the word"},
        {"prompt": "Name a thing", "teacher_context": "The thing is a house."},
        {"prompt": "Say it", "teacher_messages": [{"role": "user", "content": "Say it twice"}]},
    ]), CONTEXT)
    samples = []
    for i, row in enumerate(rows):
        prompt_ids = student_tok.apply_chat_template([m.model_dump() for m in row.prompt.messages],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)
        completion = student_tok.encode(["Water is the same.", "A house", "It it"][i]) + [student_tok.eos_token_id]
        samples.append(Sample(i, list(prompt_ids), completion, [0.0] * len(completion), "", "stop", row.row,
                              teacher_prompt=row.teacher))
    plain = Sample(0, samples[0].prompt_ids, samples[0].token_ids, samples[0].sampling_logprobs, "", "stop", {})

    args = ["teacher", "serve", "--model", str(other_template_teacher), "--engine", "hf", "--dtype", "float32",
            "--device", "cpu"]
    with running("teacher-other-template", args, log_dir=tmp_path) as proc:
        config = build_config({"student": {"model": str(student_model)}, "teacher_urls": [proc.url],
                               "student_url": "http://127.0.0.1:9", "dataset": {"path": "unused.jsonl"}}, environ={})
        score(Remote(config), [*samples, plain])

    model = AutoModelForCausalLM.from_pretrained(other_template_teacher, dtype=torch.float32).eval()
    for s in samples:
        teacher_ids = teacher_tok.apply_chat_template([m.model_dump() for m in s.teacher_prompt.messages],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        assert "### system:\nAnswer in one short line." in teacher_tok.decode(teacher_ids)
        assert list(teacher_ids) != s.prompt_ids, "the teacher's prompt is its own, not the student's"
        expected = direct_logprobs(model, list(teacher_ids), s.token_ids)
        assert len(s.teacher_logprobs) == len(s.token_ids)
        assert torch.allclose(torch.tensor(s.teacher_logprobs), expected, atol=1e-5), s.row
    # Without a context the same completion is scored after the student's prompt ids: other numbers.
    assert torch.allclose(torch.tensor(plain.teacher_logprobs), direct_logprobs(model, plain.prompt_ids, plain.token_ids), atol=1e-5)
    assert max(abs(a - b) for a, b in zip(plain.teacher_logprobs, samples[0].teacher_logprobs, strict=True)) > 1e-2
