"""The teacher's logprobs (hf.token_logprobs with exact_normaliser, hf.py choice 3) do not depend on the order of
the vocabulary: a model with its vocabulary permuted scores bit for bit as the plain one."""

from __future__ import annotations

import random

import pytest
import torch

from opd.common.hf import float64_log_softmax, token_logprobs
from opd.common.vocab_variants import permute_weights

VOCAB = 8192


@pytest.fixture(scope="module")
def plain_and_permuted() -> tuple[torch.nn.Module, torch.nn.Module, list[int]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    plain = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits of a trained model's spread, so that the normaliser sums very unequal terms
        plain.lm_head.weight.mul_(40.0)
    perm = random.Random(0).sample(range(VOCAB), VOCAB)
    permuted = LlamaForCausalLM(config).eval()
    permuted.load_state_dict(permute_weights(plain.state_dict(), perm, tied=False))
    return plain, permuted, perm


def scores(model: torch.nn.Module, seqs: list[list[int]], exact: bool) -> list:
    with torch.inference_mode():
        return token_logprobs(model, seqs, [1] * len(seqs), top_k=5, ranks=True, exact_normaliser=exact)


def test_the_teachers_logprobs_do_not_depend_on_the_vocabulary_order(plain_and_permuted) -> None:
    plain, permuted, perm = plain_and_permuted
    seqs = [[random.Random(s).randrange(VOCAB) for _ in range(24)] for s in range(4)]
    a = scores(plain, seqs, exact=True)
    b = scores(permuted, [[perm[i] for i in seq] for seq in seqs], exact=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.logprobs, y.logprobs), (x.logprobs - y.logprobs).abs().max()
        assert torch.equal(x.top_values, y.top_values) and torch.equal(x.ranks, y.ranks)
        assert [[perm[i] for i in row] for row in x.top_ids.tolist()] == y.top_ids.tolist()
    # the float32 log_softmax the trainer differentiates gives the same values but for the last bits
    for x, z in zip(a, scores(plain, seqs, exact=False), strict=True):
        assert torch.allclose(x.logprobs, z.logprobs, atol=5e-5, rtol=0) and torch.equal(x.top_ids, z.top_ids)
        assert torch.equal(x.ranks, z.ranks)


def test_the_exact_normaliser_is_the_teachers_only(plain_and_permuted) -> None:
    plain, _, _ = plain_and_permuted
    with pytest.raises(AssertionError, match="full distribution"):
        token_logprobs(plain, [[1, 2, 3]], [1], top_p=0.9, exact_normaliser=True)


def test_the_vllm_teachers_log_softmax_is_the_hf_teachers_and_ignores_the_order(plain_and_permuted) -> None:
    """float64_log_softmax (what opd's vLLM plugin computes in the teacher's engine) gives, over 300 positions (two
    parts of 256), bitwise the hf teacher's logprobs, and the same values under the permuted vocabulary."""
    plain, permuted, perm = plain_and_permuted
    seq = [random.Random(9).randrange(VOCAB) for _ in range(301)]
    with torch.inference_mode():
        logits = plain(torch.tensor([seq])).logits[0, :-1].float()
        permuted_logits = permuted(torch.tensor([[perm[i] for i in seq]])).logits[0, :-1].float()
        hf = token_logprobs(plain, [seq], [1], exact_normaliser=True)[0].logprobs
    full = float64_log_softmax(logits)
    assert full.dtype == torch.float32 and full.shape == logits.shape
    assert torch.equal(full.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1), hf)
    assert torch.equal(float64_log_softmax(permuted_logits)[:, perm], full)
    assert float64_log_softmax(logits[:0]).shape == (0, VOCAB)
