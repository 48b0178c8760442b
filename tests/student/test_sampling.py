"""Greedy decoding and numerically safe sampling: the token choice on hand-made
logits, the hf engine against a plain transformers forward, and the app at
every temperature the protocol admits.

Greedy rollouts report the model's logprob at temperature 1 of each chosen
token (vLLM's rule); a temperature below the floor (0.01) is greedy, so a tiny
positive one such as 5e-324 never turns probabilities into inf or nan.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient

from opd.common import protocol as p
from opd.common.settings import StudentSettings
from opd.student.app import build_app
from opd.student.engine import Sampling
from opd.student.hf_engine import HFRolloutEngine
from opd.student.sampling import next_tokens
from tests.student.conftest import Reference
from tests.student.test_hf_engine import as_rollouts

ATOL = 1e-4
TINY = [0.0, 5e-324, 1e-300, 0.009]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_tokens_are_finite_at_every_admitted_temperature(dtype: torch.dtype) -> None:
    logits = torch.tensor([[30.0, 29.5, -40.0, 0.0], [-1e4, 1e4, 5e3, 0.0]], dtype=dtype)
    for temperature in [*TINY, p.MIN_TEMPERATURE, 0.5, 1.0, 10.0]:
        for top_p in (1e-9, 0.5, 1.0):
            token, logprob = next_tokens(logits, temperature, top_p, torch.rand(2, generator=torch.Generator().manual_seed(0)))
            assert token.tolist()[1] == 1 or temperature >= 0.5, (temperature, top_p)
            assert torch.isfinite(logprob).all() and (logprob <= 0).all(), (temperature, top_p, logprob)
    greedy_token, greedy_logprob = next_tokens(logits, 0.0, 0.5)
    assert greedy_token.tolist() == [0, 1]
    assert greedy_logprob[0].item() == pytest.approx(torch.log_softmax(logits[0].float(), -1)[0].item())
    # At the floor the logits are scaled 100-fold: the runner-up (0.5 behind) is e^-50 as likely.
    _, cold = next_tokens(logits[:1], p.MIN_TEMPERATURE, 1.0, torch.tensor([0.5]))
    assert cold.item() == pytest.approx(0.0, abs=1e-12)


def test_each_token_is_drawn_as_often_as_its_probability() -> None:
    """Inverse-transform draws (one uniform number per row): frequencies follow the distribution, a token
    outside the nucleus or of probability 0 is never drawn, even for u at 0 or just below 1."""
    logits = torch.tensor([[2.0, float("-inf"), 1.5, 1.0, -3.0]]).expand(20_000, -1)
    uniforms = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    uniforms[:2] = torch.tensor([0.0, 1.0 - 2**-24])
    tokens, logprobs = next_tokens(logits, 1.0, 1.0, uniforms)
    expected = torch.softmax(logits[0], -1)
    freq = torch.bincount(tokens, minlength=5) / 20_000
    assert (freq - expected).abs().max() < 0.015, (freq, expected)
    assert freq[1] == 0 and torch.isfinite(logprobs).all()
    nucleus_only, _ = next_tokens(logits, 1.0, 0.6, uniforms)  # keeps the two best tokens: 0.47 + 0.29 >= 0.6
    assert set(nucleus_only.tolist()) == {0, 2}
    assert next_tokens(logits[:3], 1.0, 1.0, torch.tensor([0.3, 0.3, 0.99]))[0].tolist() == [0, 0, 3]


@pytest.mark.parametrize("temperature", TINY)
def test_greedy_rollouts_follow_the_argmax_with_temperature_1_logprobs(
    hf_engine: HFRolloutEngine, prompts, reference: Reference, temperature: float
) -> None:
    request = p.RolloutRequest(prompts=[{"token_ids": q} for q in prompts], n=2, max_tokens=12, temperature=temperature, top_p=0.5)
    sampling = Sampling.from_request(request)
    assert sampling.temperature == 0.0
    groups = hf_engine.sample_sync(prompts, sampling)
    eos = hf_engine.tokenizer.eos_token_id
    for prompt, group in zip(prompts, groups, strict=True):
        expected = reference.greedy("base", prompt, 12, eos)
        assert [s.token_ids for s in group] == [expected, expected]  # the same whatever the seed
    # Logprobs: the model's at temperature 1, without top-p.
    assert reference.max_error("base", as_rollouts(prompts, groups), 1.0) < ATOL


def test_every_admitted_temperature_is_served(student_settings: StudentSettings, hf_engine: HFRolloutEngine) -> None:
    with TestClient(build_app(student_settings, engine=hf_engine)) as client:
        outs = {}
        for temperature in [*TINY, p.MIN_TEMPERATURE, 1.0, 10.0]:
            body = {"prompts": [{"text": "The boy"}], "n": 2, "max_tokens": 8, "temperature": temperature, "seed": 1}
            r = client.post("/rollouts", json=body)
            assert r.status_code == 200, (temperature, r.text)
            rollouts = r.json()["rollouts"]
            assert all(math.isfinite(x) and x <= 0 for ro in rollouts for x in ro["logprobs"]), temperature
            outs[temperature] = [ro["token_ids"] for ro in rollouts]
        assert outs[0.0] == outs[5e-324] == outs[0.009] and outs[0.0][0] == outs[0.0][1]
        assert outs[10.0][0] != outs[10.0][1]
        assert client.get("/health").status_code == 200
