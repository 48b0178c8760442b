"""Tokenizer fingerprints and prompt rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.common.errors import InvalidRequest
from opd.common.protocol import Prompt
from opd.common.tokenizer import load_tokenizer, render_prompt, tokenizer_fingerprint


def test_fingerprint_same_vocab_same_print(teacher_model: Path, student_model: Path, other_tokenizer_model: Path) -> None:
    teacher, student, other = (tokenizer_fingerprint(load_tokenizer(str(m))) for m in (teacher_model, student_model, other_tokenizer_model))
    assert teacher == student
    assert teacher != other


def test_fingerprint_sees_special_tokens(teacher_model: Path) -> None:
    tok = load_tokenizer(str(teacher_model))
    before = tokenizer_fingerprint(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_fingerprint(tok) != before


def test_render_prompt_forms(teacher_model: Path) -> None:
    tok = load_tokenizer(str(teacher_model))
    assert render_prompt(tok, Prompt(token_ids=[4, 5])) == [4, 5]
    assert render_prompt(tok, Prompt(text="the boy")) == tok.encode("the boy")
    ids = render_prompt(tok, Prompt(messages=[{"role": "user", "content": "hi"}]))
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        render_prompt(tok, Prompt(messages=[{"role": "user", "content": "hi"}]))
