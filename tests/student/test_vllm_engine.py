"""The vLLM engine in-process (one AsyncLLM for the module, on one event loop):
sampling logprobs against a plain transformers forward, seeds, how
completions end, LoRA and full swaps, and swaps racing rollouts through the
service layer.

Tolerance: on the float32 tiny student, vLLM's CPU kernels and a
transformers forward agree to within ATOL per token logprob (about 1e-6 seen).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from opd.common import protocol as p
from opd.common.errors import InvalidInput, OPDError
from opd.common.settings import StudentSettings
from opd.student.engine import Sampling
from opd.student.serving import StudentMetrics, StudentService
from tests.student.conftest import Reference
from tests.student.test_hf_engine import as_rollouts

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_settings(student_settings: StudentSettings) -> StudentSettings:
    # LoRA versions merged into the weights: the default on a machine without a GPU.
    return student_settings.model_copy(update={"engine": "vllm", "max_pending": 16, "lora_mode": "merge"})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vllm_settings: StudentSettings):
    from opd.student.vllm_engine import VLLMRolloutEngine

    eng = VLLMRolloutEngine(vllm_settings)
    yield eng
    await eng.close()


@pytest_asyncio.fixture(loop_scope="module")
async def base(engine, student_model: Path):
    """The engine back on the base weights, whatever the test before it loaded."""
    await engine.load_full(student_model)
    return engine


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_logprobs_match_a_plain_forward(base, prompts, reference: Reference, temperature: float) -> None:
    rollouts = as_rollouts(prompts, await base.sample(prompts, Sampling(n=3, max_tokens=12, temperature=temperature, seed=0)))
    assert len(rollouts) == 9 and all(len(r["logprobs"]) == len(r["token_ids"]) > 0 for r in rollouts)
    assert reference.max_error("base", rollouts, temperature) < ATOL
    assert reference.max_error("base", rollouts, 1.0 if temperature != 1.0 else 0.5) > 10 * ATOL


async def test_top_p_logprobs_are_renormalised_over_the_nucleus(base, prompts, reference: Reference) -> None:
    import torch

    rollouts = as_rollouts(prompts, await base.sample(prompts, Sampling(n=2, max_tokens=8, top_p=0.5, seed=1)))
    for r in rollouts:
        gain = torch.tensor(r["logprobs"]) - reference.logprobs("base", r["prompt_token_ids"], r["token_ids"])
        assert gain.min() > 0.5 and gain.max() < 0.8


async def test_seeds_make_each_rollout_reproducible(base, prompts) -> None:
    sampling = Sampling(n=2, max_tokens=10, seed=42)
    first = await base.sample(prompts, sampling)
    tokens = [s.token_ids for g in first for s in g]
    assert len({tuple(t) for t in tokens}) == len(tokens)  # every rollout has its own seed
    # The same request, alone or among others, gives the same rollouts (per-request seeded generators).
    crowd = await asyncio.gather(*(base.sample(prompts, Sampling(n=2, max_tokens=10, seed=s)) for s in (42, 7, 42, None)))
    assert crowd[0] == first and crowd[2] == first and crowd[1] != first
    unseeded = [s.token_ids for g in crowd[3] for s in g]
    assert unseeded != tokens


async def test_seeded_prompts_beyond_one_step_of_tokens(base) -> None:
    """Seeded prompts of 4,000 tokens in all, more than vLLM's CPU step budget of 2,048: vLLM 0.32's CPU build
    killed its engine when it split a seeded prompt's prefill across steps; the engine prefills whole prompts."""
    long = [[3 + (i * 7 + j) % 200 for j in range(400)] for i in range(10)]
    first = await base.sample(long, Sampling(n=2, max_tokens=4, seed=3))
    assert len(first) == 10 and all(len(s.token_ids) > 0 for g in first for s in g)
    again = await base.sample(long, Sampling(n=2, max_tokens=4, seed=3))  # now with cached prefixes
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in first]
    assert base.healthy()


async def test_a_prompt_vllm_refuses_is_a_bad_request(base, prompts) -> None:
    """vLLM needs room for one generated token: a prompt of max_model_len tokens is the request's fault."""
    with pytest.raises(InvalidInput) as err:
        await base.sample([[7] * 512], Sampling(max_tokens=1))
    assert err.value.status_code == 422 and "prompts[0]" in str(err.value) and "maximum model length" in str(err.value)
    assert base.healthy() and len(await base.sample(prompts[:1], Sampling(max_tokens=2))) == 1


async def test_stop_strings_and_eos(base, checkpoint_root: Path, prompts, reference: Reference) -> None:
    tok = base.tokenizer
    rollouts = as_rollouts(prompts, await base.sample(prompts, Sampling(n=4, max_tokens=24, seed=5, stop=("e", "a"))))
    assert sum(r["finish_reason"] == "stop" for r in rollouts) >= 8
    for r in rollouts:
        full = tok.decode(r["token_ids"], skip_special_tokens=True)
        assert "e" not in r["text"] and "a" not in r["text"] and full.startswith(r["text"])
        if r["finish_reason"] == "stop":  # same rule as the hf engine: the last token completes the stop string
            assert not any(s in tok.decode(r["token_ids"][:-1], skip_special_tokens=True) for s in "ea")
    await base.load_full(checkpoint_root / "eos")
    rollouts = as_rollouts(prompts, await base.sample(prompts, Sampling(n=4, max_tokens=30, seed=3)))
    ended = [r for r in rollouts if r["finish_reason"] == "stop"]
    assert len(ended) >= 10
    for r in ended:  # EOS kept, with its logprob; the text leaves it out
        assert r["token_ids"][-1] == tok.eos_token_id and tok.eos_token_id not in r["token_ids"][:-1]
        assert r["text"] == tok.decode(r["token_ids"][:-1])
    assert reference.max_error("eos", rollouts) < ATOL


async def check_swaps(engine, checkpoint_root: Path, student_model: Path, prompts, reference: Reference) -> None:
    """Swaps through adapters and full versions; every rollout matches a plain forward of what should serve."""
    sampling = Sampling(n=2, max_tokens=16, seed=11, temperature=0.8)

    async def sample_and_check(version: str) -> list[list[int]]:
        rollouts = as_rollouts(prompts, await engine.sample(prompts, sampling))
        assert reference.max_error(version, rollouts, 0.8) < ATOL, version
        return [r["token_ids"] for r in rollouts]

    await engine.load_full(student_model)
    seen = {"base": await sample_and_check("base")}
    for kind, folder, version in [
        ("lora", "lora-a", "lora-a"),
        ("lora", "lora-b", "lora-b"),  # replaces lora-a, does not stack on it
        ("full", "full-a", "full-a"),  # reloads in place, drops the adapter
        ("lora", "lora-a", "full-a+lora-a"),  # an adapter applies on the weights serving
    ]:
        if kind == "lora":
            await engine.load_lora(checkpoint_root / folder, version=len(seen))
        else:
            await engine.load_full(checkpoint_root / folder)
        seen[version] = await sample_and_check(version)
    assert len({str(t) for t in seen.values()}) == len(seen)
    if not engine.merge:  # merged, the engine has no LoRA support at all
        assert set(await engine.llm.list_loras()) == {4}, "the earlier adapters were removed"
    await engine.load_full(student_model)
    assert [r for r in await sample_and_check("base")] == seen["base"]


async def test_swaps_change_outputs_and_match_the_new_weights(
    base, checkpoint_root: Path, student_model: Path, prompts, reference: Reference
) -> None:
    assert base.merge
    await check_swaps(base, checkpoint_root, student_model, prompts, reference)


async def test_adapter_swaps_through_vllms_lora_kernels(
    vllm_settings: StudentSettings, checkpoint_root: Path, student_model: Path, prompts, reference: Reference
) -> None:
    from opd.student.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(vllm_settings.model_copy(update={"lora_mode": "adapter"}))
    try:
        assert not engine.merge
        await check_swaps(engine, checkpoint_root, student_model, prompts, reference)
    finally:
        await engine.close()


@pytest.fixture
def service(base, vllm_settings: StudentSettings) -> StudentService:
    return StudentService(base, vllm_settings, StudentMetrics(CollectorRegistry()))


async def test_a_rollout_in_flight_during_a_swap_is_all_old_or_all_new(service: StudentService, reference: Reference) -> None:
    request = p.RolloutRequest(prompts=[{"text": "The old man"}, {"text": "Where is"}], n=8, max_tokens=200, seed=1)
    events: list[str] = []

    async def tagged(name: str, coro):
        result = await coro
        events.append(name)
        return result

    old = asyncio.create_task(tagged("old rollout", service.rollouts(request)))
    while service.lock.readers == 0:
        await asyncio.sleep(0.005)
    swap = asyncio.create_task(tagged("swap", service.load_weights(p.WeightsRequest(version=1, kind="full", path="full-a"))))
    while service.lock.writers_waiting == 0:
        await asyncio.sleep(0.005)
    new = asyncio.create_task(tagged("new rollout", service.rollouts(request)))
    await asyncio.sleep(0.05)
    assert not old.done() and not swap.done() and not new.done()  # the swap really raced a rollout in flight
    old_out, swapped, new_out = await asyncio.gather(old, swap, new)
    assert events == ["old rollout", "swap", "new rollout"]
    assert (old_out.policy_version, swapped.policy_version, new_out.policy_version) == (0, 1, 1)
    # Every token of each rollout comes from one version: within float error of it, far from the other.
    assert reference.max_error("base", old_out.rollouts) < ATOL < 0.1 < reference.max_error("full-a", old_out.rollouts)
    assert reference.max_error("full-a", new_out.rollouts) < ATOL < 0.1 < reference.max_error("base", new_out.rollouts)


BAD = [("full", "wide"), ("full", "mistral"), ("full", "truncated"), ("lora", "lora-wide"), ("lora", "lora-head"),
       ("lora", "lora-rank32"), ("lora", "full-a"), ("full", "escape")]


async def test_bad_checkpoints_never_reach_the_engine(service: StudentService) -> None:
    """Each of these would kill a vLLM engine if it were loaded; the service refuses them and keeps serving."""
    request = p.RolloutRequest(prompts=[{"token_ids": [5, 6, 7]}], n=2, max_tokens=8, seed=3)
    await service.load_weights(p.WeightsRequest(version=1, kind="lora", path="lora-a"))
    serving = await service.rollouts(request)
    for kind, path in BAD:
        with pytest.raises(OPDError) as caught:
            await service.load_weights(p.WeightsRequest(version=2, kind=kind, path=path))
        assert 400 <= caught.value.status_code < 500, (kind, path)
        assert service.engine.healthy() and await service.rollouts(request) == serving, (kind, path)


@pytest.mark.parametrize("temperature", [0.0, 5e-324])
async def test_greedy_matches_the_hf_engine_with_temperature_1_logprobs(
    base, hf_engine, prompts, reference: Reference, temperature: float
) -> None:
    """Below the temperature floor both engines decode greedily and report the model's logprobs at temperature 1."""
    request = p.RolloutRequest(prompts=[{"token_ids": q} for q in prompts], n=2, max_tokens=12, temperature=temperature, seed=4)
    sampling = Sampling.from_request(request)
    from_vllm = await base.sample(prompts, sampling)
    from_hf = await hf_engine.sample(prompts, sampling)
    assert [[s.token_ids for s in g] for g in from_vllm] == [[s.token_ids for s in g] for g in from_hf]
    assert all(g[0].token_ids == g[1].token_ids for g in from_vllm)
    assert reference.max_error("base", as_rollouts(prompts, from_vllm), 1.0) < ATOL
