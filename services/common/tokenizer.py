"""Tokenizer helpers: the fingerprint services compare, and prompt rendering.

The fingerprint is a SHA-256 over the vocabulary (token -> id), the added and
special tokens, and the BOS/EOS/PAD ids. Two models that share it tokenize
identically, so a student's token ids mean the same thing to the teacher; the
trainer refuses to distill across different fingerprints.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from opd.common.errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from opd.common.protocol import Prompt


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    blob = json.dumps({"vocab": vocab, "special": special, "ids": ids}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: ids as given, text encoded, messages through the chat template."""
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if prompt.text is not None:
        return list(tokenizer.encode(prompt.text, add_special_tokens=True))
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template: send 'text' or 'token_ids' instead of 'messages'")
    messages = [m.model_dump() for m in prompt.messages or []]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)
