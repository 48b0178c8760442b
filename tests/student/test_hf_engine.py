"""The hf engine: sampling logprobs against a plain transformers forward, seeds,
how completions end, and both kinds of swap.

Tolerance: batched, left-padded generation and a single unpadded forward of
the float32 tiny student agree to within ATOL per token logprob.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd.common.settings import StudentSettings
from opd.student.engine import Sample, Sampling
from opd.student.hf_engine import HFRolloutEngine
from tests.student.conftest import Reference

ATOL = 1e-4


def as_rollouts(prompts: list[list[int]], groups: list[list[Sample]]) -> list[dict]:
    return [
        {"prompt_token_ids": p, "token_ids": s.token_ids, "logprobs": s.logprobs,
         "finish_reason": s.finish_reason, "text": s.text}
        for p, group in zip(prompts, groups, strict=True)
        for s in group
    ]


@pytest.fixture
def fresh(student_settings: StudentSettings) -> HFRolloutEngine:
    """An engine of its own, for tests that swap weights."""
    return HFRolloutEngine(student_settings)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_plain_forward(hf_engine: HFRolloutEngine, prompts, reference: Reference, temperature: float) -> None:
    groups = hf_engine.sample_sync(prompts, Sampling(n=3, max_tokens=12, temperature=temperature, seed=0))
    rollouts = as_rollouts(prompts, groups)
    assert len(rollouts) == 9 and all(len(r["logprobs"]) == len(r["token_ids"]) > 0 for r in rollouts)
    assert reference.max_error("base", rollouts, temperature) < ATOL
    # ... and not at another temperature: the logprobs are those of the distribution sampled from.
    assert reference.max_error("base", rollouts, 1.0 if temperature != 1.0 else 0.5) > 10 * ATOL


def test_top_p_logprobs_are_renormalised_over_the_nucleus(hf_engine: HFRolloutEngine, prompts, reference: Reference) -> None:
    rollouts = as_rollouts(prompts, hf_engine.sample_sync(prompts, Sampling(n=2, max_tokens=8, top_p=0.5, seed=1)))
    for r in rollouts:
        raw = reference.logprobs("base", r["prompt_token_ids"], r["token_ids"])
        # Half the mass is cut away, so each kept token's logprob rises by about log 2.
        gain = torch.tensor(r["logprobs"]) - raw
        assert gain.min() > 0.5 and gain.max() < 0.8


def test_seeded_rollouts_are_reproducible(hf_engine: HFRolloutEngine, prompts) -> None:
    sampling = Sampling(n=2, max_tokens=10, seed=42)
    first = hf_engine.sample_sync(prompts, sampling)
    assert hf_engine.sample_sync(prompts, sampling) == first
    other = hf_engine.sample_sync(prompts, Sampling(n=2, max_tokens=10, seed=43))
    assert [s.token_ids for g in other for s in g] != [s.token_ids for g in first for s in g]
    tokens = [s.token_ids for g in first for s in g]
    assert len({tuple(t) for t in tokens}) == len(tokens)  # the n samples of a prompt differ


def test_a_request_split_in_two_samples_what_the_whole_does(
    student_settings: StudentSettings, hf_engine: HFRolloutEngine, prompts
) -> None:
    """Rollout j of prompt i is seeded seed + i*n + j: the last prompt asked alone with seed + 2n, on an engine whose
    micro-batches hold one row, gets the rollouts it got inside the whole request (student replicas rely on it)."""
    whole = hf_engine.sample_sync(prompts, Sampling(n=2, max_tokens=12, seed=7))
    narrow = HFRolloutEngine(student_settings.model_copy(update={"micro_batch_tokens": 16}))
    head = narrow.sample_sync(prompts[:2], Sampling(n=2, max_tokens=12, seed=7))
    tail = narrow.sample_sync(prompts[2:], Sampling(n=2, max_tokens=12, seed=7 + 2 * 2))
    assert [[s.token_ids for s in g] for g in head + tail] == [[s.token_ids for s in g] for g in whole]
    for got, want in zip([s for g in head + tail for s in g], [s for g in whole for s in g], strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=ATOL)
    shifted = narrow.sample_sync(prompts[2:], Sampling(n=2, max_tokens=12, seed=7))
    assert [s.token_ids for s in shifted[0]] != [s.token_ids for s in whole[2]], "another seed, other rollouts"


def test_stop_strings_end_completions(hf_engine: HFRolloutEngine, prompts) -> None:
    tok = hf_engine.tokenizer
    stops = ("e", "a")
    rollouts = as_rollouts(prompts, hf_engine.sample_sync(prompts, Sampling(n=4, max_tokens=24, seed=5, stop=stops)))
    stopped = [r for r in rollouts if r["finish_reason"] == "stop"]
    assert len(stopped) >= 8
    for r in rollouts:
        full = tok.decode(r["token_ids"], skip_special_tokens=True)
        assert not any(s in r["text"] for s in stops) and full.startswith(r["text"])
        if r["finish_reason"] == "stop":  # the last token completes the stop string
            assert any(s in full for s in stops)
            assert not any(s in tok.decode(r["token_ids"][:-1], skip_special_tokens=True) for s in stops)
        else:
            assert len(r["token_ids"]) == 24 and r["text"] == full


def test_completions_end_with_eos_kept(fresh: HFRolloutEngine, checkpoint_root: Path, prompts, reference: Reference) -> None:
    """EOS is the last token, with its logprob; the text leaves it out."""
    import asyncio

    asyncio.run(fresh.load_full(checkpoint_root / "eos"))
    eos = fresh.tokenizer.eos_token_id
    rollouts = as_rollouts(prompts, fresh.sample_sync(prompts, Sampling(n=4, max_tokens=30, seed=3)))
    ended = [r for r in rollouts if r["finish_reason"] == "stop"]
    assert len(ended) >= 10
    for r in ended:
        assert r["token_ids"][-1] == eos and eos not in r["token_ids"][:-1]
        assert r["text"] == fresh.tokenizer.decode(r["token_ids"][:-1])
    assert reference.max_error("eos", rollouts) < ATOL


@pytest.mark.parametrize("lora_mode", ["merge", "adapter"])
def test_swaps_change_outputs_and_match_the_new_weights(
    student_settings: StudentSettings, checkpoint_root: Path, prompts, reference: Reference, lora_mode: str
) -> None:
    import asyncio

    from peft import PeftModel

    fresh = HFRolloutEngine(student_settings.model_copy(update={"lora_mode": lora_mode}))

    sampling = Sampling(n=2, max_tokens=16, seed=11, temperature=0.8)

    def sample_and_check(version: str) -> list[list[int]]:
        rollouts = as_rollouts(prompts, fresh.sample_sync(prompts, sampling))
        assert reference.max_error(version, rollouts, 0.8) < ATOL, version
        return [r["token_ids"] for r in rollouts]

    seen = {"base": sample_and_check("base")}
    for kind, folder, version in [
        ("lora", "lora-a", "lora-a"),
        ("lora", "lora-b", "lora-b"),  # replaces lora-a, does not stack on it
        ("full", "full-a", "full-a"),  # drops the adapter
        ("lora", "lora-a", "full-a+lora-a"),  # an adapter applies on the weights serving
    ]:
        if kind == "lora":
            asyncio.run(fresh.load_lora(checkpoint_root / folder, version=len(seen)))
            # merged: a plain model at plain speed; otherwise peft's adapter layers
            assert isinstance(fresh.model, PeftModel) == (lora_mode == "adapter")
        else:
            asyncio.run(fresh.load_full(checkpoint_root / folder))
        seen[version] = sample_and_check(version)
    assert len({str(t) for t in seen.values()}) == len(seen)  # every version samples differently


def test_model_generation_defaults_do_not_leak_in(
    student_model: Path, student_settings: StudentSettings, prompts, reference: Reference, tmp_path: Path
) -> None:
    """A model folder's generation_config.json (a repetition penalty, top-k) must not change the distribution."""
    import json
    import shutil

    folder = shutil.copytree(student_model, tmp_path / "student")
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 2, "repetition_penalty": 5.0, "top_k": 3, "temperature": 0.2, "no_repeat_ngram_size": 1})
    )
    engine = HFRolloutEngine(student_settings.model_copy(update={"model": str(folder)}))
    rollouts = as_rollouts(prompts, engine.sample_sync(prompts, Sampling(n=2, max_tokens=12, seed=0)))
    assert reference.max_error("base", rollouts) < ATOL


async def test_a_long_request_does_not_hold_back_a_short_one(student_settings: StudentSettings, prompts) -> None:
    """Requests take turns of a few tokens: a short request asked for while a long one decodes ends long before it."""
    import asyncio
    import threading
    import time

    engine = HFRolloutEngine(student_settings.model_copy(update={"turn_tokens": 8}))
    decoding = threading.Event()  # set by the long request's first turn of decoding
    decode = engine._decode

    def watched(d, steps: int) -> None:
        decoding.set()
        decode(d, steps)

    engine._decode = watched
    began = time.monotonic()
    long = asyncio.create_task(engine.sample(prompts, Sampling(n=4, max_tokens=240, seed=0)))
    assert await asyncio.to_thread(decoding.wait, 60), "the long request never began decoding"
    short = await engine.sample([prompts[0]], Sampling(n=1, max_tokens=4, seed=1))
    short_done = time.monotonic()
    assert not long.done(), "the long request ended before the short one: it held the engine"
    groups = await long
    long_seconds = time.monotonic() - began
    assert len(short[0][0].token_ids) in range(1, 5) and len(groups) == 3
    assert short_done - began < 0.5 * long_seconds
    await engine.close()


def test_the_fixed_size_cache_decodes_what_the_growing_one_does(
    fresh: HFRolloutEngine, hf_engine: HFRolloutEngine, prompts, reference: Reference
) -> None:
    """The CUDA graph path's cache and masks (services/student/cuda_graphs.py), run eagerly on the CPU."""
    from opd.student.cuda_graphs import GraphPool

    fresh.graphs = GraphPool(capture=False)
    sampling = Sampling(n=3, max_tokens=12, temperature=1.0, seed=3)
    fixed = fresh.sample_sync(prompts, sampling)
    growing = hf_engine.sample_sync(prompts, sampling)
    assert [[s.token_ids for s in g] for g in fixed] == [[s.token_ids for s in g] for g in growing]
    assert reference.max_error("base", as_rollouts(prompts, fixed)) < ATOL
    assert len(fresh.graphs.idle) == 1  # the decoder came back for the next request
