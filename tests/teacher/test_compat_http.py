"""Clients this project did not write, against the teacher as a real process (hf engine):
the official `openai` package on /v1/completions, slime's teacher call on /generate, and
the trainer's adapters for stock servers. On the hf engine every score equals /logprobs'.

slime's call is reproduced from slime/rollout/on_policy_distillation.py: `reward_func`
posts the payload with aiohttp (no API key: slime sends none), `post_process_rewards`
reads `meta_info.input_token_logprobs[1:]` into a float32 tensor and keeps the last
`response_length` values.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import openai
import pytest
import torch

from opd.common.client import TeacherClient
from opd.common.compat_client import async_teacher_client, teacher_client
from tests.utils.services import running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_teacher(teacher_model: Path, tmp_path_factory):
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    with running("teacher-hf-compat", args, log_dir=tmp_path_factory.mktemp("logs")) as proc:
        yield proc


@pytest.fixture(scope="module")
def samples() -> list[tuple[list[int], list[int]]]:
    """(prompt, response) token ids, as the student would have sampled them."""
    rng = random.Random(5)
    return [([rng.randrange(512) for _ in range(rng.randint(2, 40))], [rng.randrange(512) for _ in range(rng.randint(1, 30))])
            for _ in range(6)]


def slime_reward_func(url: str, tokens: list[int], temperature: float) -> dict:
    async def post() -> dict:
        payload = {
            "input_ids": tokens,
            "sampling_params": {"temperature": temperature, "max_new_tokens": 0, "skip_special_tokens": False},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        async with aiohttp.ClientSession() as session, session.post(url, json=payload) as resp:
            resp.raise_for_status()
            return await resp.json()

    return asyncio.run(post())


def slime_teacher_log_probs(rewards: list[dict], response_lengths: list[int]) -> list[torch.Tensor]:
    teacher_log_probs = [
        torch.tensor([item[0] for item in reward["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float32)
        for reward in rewards
    ]
    return [t[-n:] for t, n in zip(teacher_log_probs, response_lengths, strict=False)]


def test_slime_payload_scores_like_logprobs(hf_teacher, samples) -> None:
    rewards = [slime_reward_func(hf_teacher.url + "/generate", p + r, temperature=0.8) for p, r in samples]
    got = slime_teacher_log_probs(rewards, [len(r) for _, r in samples])
    teacher = TeacherClient(hf_teacher.url)
    # One sequence per request, as slime sends them: the same forward, so the same float32 values.
    ref = [teacher.logprobs([{"token_ids": p + r, "start": 1}]).results[0] for p, r in samples]
    for t, (p, r), res in zip(got, samples, ref, strict=True):
        assert t.tolist() == torch.tensor(res.logprobs[-len(r):], dtype=torch.float32).tolist()
        assert len(t) == len(r)


def test_openai_package_prompt_logprobs(hf_teacher, samples) -> None:
    client = openai.OpenAI(base_url=hf_teacher.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    prompts = [p + r for p, r in samples]
    answer = client.completions.create(model=model, prompt=prompts, max_tokens=0, extra_body={"prompt_logprobs": 2})
    ref = TeacherClient(hf_teacher.url).logprobs([{"token_ids": ids, "start": 1} for ids in prompts], top_k=2)
    assert [c.index for c in answer.choices] == list(range(len(prompts)))
    for choice, ids, res in zip(answer.choices, prompts, ref.results, strict=True):
        rows = choice.prompt_logprobs  # vLLM's extra field, kept by the openai package
        assert rows[0] is None and len(rows) == len(ids)
        assert [row[str(t)]["logprob"] for row, t in zip(rows[1:], ids[1:], strict=True)] == res.logprobs
        for row, top in zip(rows[1:], res.top_logprobs, strict=True):
            best = sorted(row.items(), key=lambda kv: kv[1]["rank"])[:2]
            assert [(int(t), e["logprob"]) for t, e in best] == [(x.token_id, x.logprob) for x in top]

    echoed = client.completions.create(model=model, prompt=prompts[0], max_tokens=0, echo=True, logprobs=1)
    legacy = echoed.choices[0].logprobs  # typed by the openai package
    alone = TeacherClient(hf_teacher.url).logprobs([{"token_ids": prompts[0], "start": 1}]).results[0]
    assert legacy.token_logprobs == [None] + alone.logprobs
    assert len(legacy.tokens) == len(prompts[0]) and legacy.top_logprobs[0] is None

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=prompts[0], max_tokens=32)
    assert "max_tokens 32" in str(err.value) and "/logprobs" in str(err.value)  # the message reaches the user
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="not-" + model, prompt=prompts[0], max_tokens=0)
    assert "GET /v1/models" in str(err.value)


@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_stock_server_adapters_score_like_logprobs(hf_teacher, samples, teacher_model: Path, protocol: str) -> None:
    """The trainer's adapters, pointed at our compatible endpoints, return exactly /logprobs' scores."""
    from transformers import AutoTokenizer

    sequences = [{"token_ids": p + r, "start": len(p)} for p, r in samples]
    client = teacher_client(protocol, hf_teacher.url)
    got = client.logprobs(sequences, top_k=3)
    # The openai adapter has the server score from position 1 (prompt_logprobs), sglang from `start`.
    starts = [1] * len(samples) if protocol == "openai" else [len(p) for p, _ in samples]
    ref = TeacherClient(hf_teacher.url).logprobs([{"token_ids": p + r, "start": s} for (p, r), s in zip(samples, starts)], top_k=3)
    for g, res, (p, r) in zip(got.results, ref.results, samples, strict=True):
        skip = len(p) - res.start
        assert g.start == len(p) and g.logprobs == res.logprobs[skip:] and len(g.logprobs) == len(r)
        assert [[(t.token_id, t.logprob) for t in pos] for pos in g.top_logprobs] == [
            [(t.token_id, t.logprob) for t in pos] for pos in res.top_logprobs[skip:]
        ]
    text = "the boy went home, 42 times!"
    assert client.tokenize(text) == AutoTokenizer.from_pretrained(teacher_model).encode(text)

    async def scored_async() -> list[list[float]]:
        aclient = async_teacher_client(protocol, hf_teacher.url)
        try:
            return [r.logprobs for r in (await aclient.logprobs(sequences, top_k=3)).results]
        finally:
            await aclient.aclose()

    assert asyncio.run(scored_async()) == [r.logprobs for r in got.results]
