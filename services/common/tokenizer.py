"""Tokenizer helpers: the fingerprint services compare, and prompt rendering.

The fingerprint is a SHA-256 over the vocabulary (token -> id), the added and
special tokens, the BOS/EOS/PAD ids and, for a fast tokenizer, how it cuts
text (its normalizer, pre-tokenizer and BPE merges). Two models that share it
tokenize identically, so a student's token ids mean the same thing to the
teacher; across different fingerprints the trainer aligns the two
tokenizations on bytes (services/trainer/alignment.py).
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
    cutting = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the same vocabulary with other merges segments text differently
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        cutting = [spec.get("normalizer"), spec.get("pre_tokenizer"), model.get("type"), model.get("merges"),
                   model.get("ignore_merges")]
    blob = json.dumps({"vocab": vocab, "special": special, "ids": ids, "cutting": cutting}, ensure_ascii=False)
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
