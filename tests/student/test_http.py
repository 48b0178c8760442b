"""The student as a real process over real HTTP: `opd student serve` with the
vllm engine in bfloat16 (as in production) and with the hf engine.

bf16 tolerance: the vLLM process runs the float32 tiny student in bfloat16;
its sampling logprobs are compared with a float32 transformers forward of
the same weights. Per token they agree to within BF16_MAX, on average to
within BF16_MEAN; the versions used here differ from each other by far more
than that, so "which version produced this rollout" stays decidable.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
import torch

from opd.common.client import AsyncStudentClient, StudentClient
from opd.common.errors import ServiceError
from opd.student.engine import Sampling
from opd.student.hf_engine import HFRolloutEngine
from tests.student.conftest import Reference
from tests.utils.services import assert_becomes_idle, hang_up, running, wait_for_metric

pytestmark = pytest.mark.slow
KEY = "test-key"
BF16_MAX, BF16_MEAN = 0.05, 0.015
CHAT = [{"role": "user", "content": "Where did the old man go?"}]


def errors(reference: Reference, version: str, rollouts, temperature: float = 1.0) -> tuple[float, float]:
    """(max, mean) |reported - float32 reference| over every token of every rollout."""
    diffs = torch.cat([
        (torch.tensor(r.logprobs) - reference.logprobs(version, r.prompt_token_ids, r.token_ids, temperature)).abs()
        for r in rollouts
    ])
    return diffs.max().item(), diffs.mean().item()


def within_bf16(reference: Reference, version: str, rollouts, temperature: float = 1.0) -> bool:
    worst, mean = errors(reference, version, rollouts, temperature)
    return worst < BF16_MAX and mean < BF16_MEAN


@pytest.fixture(scope="module")
def vllm_student(student_model: Path, checkpoint_root: Path, tmp_path_factory):
    args = ["student", "serve", "--model", str(student_model), "--engine", "vllm", "--dtype", "bfloat16",
            "--checkpoint-root", str(checkpoint_root), "--max-lora-rank", "16"]
    with running("student-vllm", args, log_dir=tmp_path_factory.mktemp("logs"), api_key=KEY) as proc:
        yield proc


def test_bf16_logprobs_and_seeds(vllm_student, hf_engine: HFRolloutEngine, reference: Reference) -> None:
    client = StudentClient(vllm_student.url, api_key=KEY)
    info = client.info()
    assert (info.service, info.engine, info.policy_version) == ("student", "vllm", 0)
    assert info.tokenizer_fingerprint == hf_engine.fingerprint and info.vocab_size == 512 and info.max_model_len == 512
    for temperature in (1.0, 0.7):
        body = {"prompts": [{"messages": CHAT}, {"text": "The boy"}], "n": 4, "max_tokens": 24,
                "temperature": temperature, "seed": 5}
        out = client.rollouts(body)
        assert len(out.rollouts) == 8 and out.usage.generated_tokens == sum(len(r.token_ids) for r in out.rollouts)
        rendered = hf_engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
        assert out.rollouts[0].prompt_token_ids == rendered
        assert within_bf16(reference, "base", out.rollouts, temperature), errors(reference, "base", out.rollouts, temperature)
        assert client.rollouts(body) == out  # seeded: reproducible over HTTP


async def metric_seen(http: httpx.AsyncClient, url: str, line: str, task: asyncio.Task) -> bool:
    """Polls /metrics until `line` shows (True), or until `task` has ended (False)."""
    async with asyncio.timeout(60):
        while line not in (await http.get(url + "/metrics")).text:
            if task.done():
                return False
            await asyncio.sleep(0.01)
    return True


async def test_swaps_over_http_never_mix_versions(vllm_student, reference: Reference) -> None:
    """A swap sent while a rollout runs waits for it: that rollout samples and reports the old version, one sent
    after the swap the new one. Every rollout of every try reports the version whose weights sampled it.

    Whether the swap arrives before the rollout ends depends on the machine's load (a loaded machine answers
    /metrics slowly). A try in which the rollout ended first proves nothing about waiting, so the next try sends
    twice the work; the test fails if no try overlapped."""
    client = AsyncStudentClient(vllm_student.url, api_key=KEY)
    serving, version, overlapped = "base", (await client.info()).policy_version, False
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for attempt, path in enumerate(["lora-a", "lora-b", "lora-a", "lora-b"]):
            long = {"prompts": [{"text": "The old man"}, {"text": "Where is"}] * 2**attempt, "n": 8, "max_tokens": 320,
                    "seed": 1}
            old = asyncio.create_task(client.rollouts(long))
            in_flight = await metric_seen(http, vllm_student.url, "opd_queue_depth 1.0", old)
            swap = asyncio.create_task(client.load_weights({"version": version + 1, "kind": "lora", "path": path}))
            waiting = in_flight and await metric_seen(http, vllm_student.url, "opd_student_swaps_waiting 1.0", swap)
            if waiting:  # the swap waits for `old`, the only rollout in flight; `new` comes after it
                new = asyncio.create_task(client.rollouts(long))
                old_out, swapped, new_out = await asyncio.gather(old, swap, new)
                assert (old_out.policy_version, swapped.policy_version, new_out.policy_version) == (
                    version, version + 1, version + 1)
                assert within_bf16(reference, path, new_out.rollouts) and not within_bf16(reference, serving, new_out.rollouts)
                overlapped = True
            else:  # the rollout ended before the swap was seen waiting: no overlap this time
                old_out, swapped = await asyncio.gather(old, swap)
                assert old_out.policy_version == version and swapped.policy_version == version + 1
            assert within_bf16(reference, serving, old_out.rollouts) and not within_bf16(reference, path, old_out.rollouts)
            serving, version = path, version + 1
            if overlapped:
                break
    await client.aclose()
    assert overlapped, "in no try did the swap arrive while a rollout was in flight"


def test_full_swap_and_refusals_over_http(vllm_student, reference: Reference) -> None:
    client = StudentClient(vllm_student.url, api_key=KEY, retries=0)
    body = {"prompts": [{"token_ids": [5, 6, 7, 8]}], "n": 4, "max_tokens": 16, "seed": 2}
    before = client.rollouts(body)
    version = client.info().policy_version + 1
    swapped = client.load_weights({"version": version, "kind": "full", "path": "full-a"})
    assert swapped.policy_version == version and swapped.kind == "full" and swapped.seconds > 0
    serving = client.rollouts(body)
    assert serving.policy_version == version and serving.rollouts != before.rollouts
    assert within_bf16(reference, "full-a", serving.rollouts)
    assert client.load_weights({"version": version, "kind": "full", "path": "full-a"}).seconds == 0.0  # sent again
    refusals = [
        ({"version": version, "kind": "full", "path": "full-b"}, 409, "not newer"),
        ({"version": version + 1, "kind": "full", "path": "wide"}, 422, "wrong shapes"),
        ({"version": version + 1, "kind": "lora", "path": "lora-wide"}, 422, "needs [r, 256]"),
        ({"version": version + 1, "kind": "full", "path": "mistral"}, 422, "MistralForCausalLM"),
        ({"version": version + 1, "kind": "full", "path": "escape"}, 400, "leads out of the checkpoint root"),
        ({"version": version + 1, "kind": "lora", "path": "nope"}, 404, "no checkpoint"),
    ]
    for request, status, fragment in refusals:
        with pytest.raises(ServiceError) as caught:
            client.load_weights(request)
        assert caught.value.status_code == status and fragment in caught.value.message, caught.value
        assert client.rollouts(body) == serving  # the engine survived and still serves the same version
    for bad, status, fragment in [
        ({"prompts": [{"token_ids": [1, 99999]}]}, 422, "vocabulary"),
        ({"prompts": [{"token_ids": [1] * 400}], "max_tokens": 200}, 422, "maximum length of 512"),
    ]:
        with pytest.raises(ServiceError) as caught:
            client.rollouts(bad)
        assert caught.value.status_code == status and fragment in caught.value.message
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(vllm_student.url + "/rollouts", json={**body, "temprature": 0.5}, headers=auth)
    assert r.status_code == 422 and "temprature: unknown field" in r.json()["detail"]
    assert httpx.post(vllm_student.url + "/rollouts", json=body).status_code == 401
    assert httpx.get(vllm_student.url + "/health").status_code == 200
    metrics = httpx.get(vllm_student.url + "/metrics", headers=auth).text
    assert re.search(r'opd_student_swaps_total\{kind="full",outcome="rejected"\} [1-9]', metrics)
    assert re.search(r'opd_student_swap_seconds_count\{kind="full"\} 1\.0', metrics)
    assert float(re.search(r"^opd_student_tokens_per_second (\S+)$", metrics, re.M).group(1)) > 0


def test_hf_process_equals_in_process(student_model: Path, checkpoint_root: Path, hf_engine: HFRolloutEngine, tmp_path) -> None:
    args = ["student", "serve", "--model", str(student_model), "--engine", "hf", "--dtype", "float32",
            "--device", "cpu", "--checkpoint-root", str(checkpoint_root)]
    body = {"prompts": [{"token_ids": [5, 6, 7]}, {"text": "The boy"}], "n": 2, "max_tokens": 12, "seed": 4}
    with running("student-hf", args, log_dir=tmp_path) as proc:
        client = StudentClient(proc.url)
        remote = client.rollouts(body)
        started = time.monotonic()
        assert client.load_weights({"version": 3, "kind": "full", "path": "full-a"}).policy_version == 3
        assert time.monotonic() - started < 30
        after = client.rollouts(body)
    prompts = [r.prompt_token_ids for r in remote.rollouts[::2]]
    local = hf_engine.sample_sync(prompts, Sampling(n=2, max_tokens=12, seed=4))
    assert [r.token_ids for r in remote.rollouts] == [s.token_ids for g in local for s in g]
    assert [r.logprobs for r in remote.rollouts] == [s.logprobs for g in local for s in g]
    assert after.policy_version == 3 and after.rollouts != remote.rollouts


def test_a_client_that_goes_away_stops_its_rollouts(student_model: Path, checkpoint_root: Path, tmp_path) -> None:
    """A long rollout request (64 micro-batches of 250 tokens) whose client hangs up is cancelled within a turn."""
    args = ["student", "serve", "--model", str(student_model), "--engine", "hf", "--dtype", "float32",
            "--device", "cpu", "--checkpoint-root", str(checkpoint_root)]
    with running("student-hf", args, log_dir=tmp_path, env={"OPD_STUDENT_MICRO_BATCH_TOKENS": "256"}) as proc:
        hang_up(proc.url + "/rollouts", {"prompts": [{"token_ids": [5, 6, 7]}], "n": 64, "max_tokens": 250}, after=2.0)
        metrics = wait_for_metric(proc.url, 'opd_student_requests_total{outcome="cancelled"} 1.0')
        assert "opd_queue_depth 0.0" in metrics
        assert_becomes_idle(proc.proc.pid)  # once the turn that was running ends
        out = StudentClient(proc.url).rollouts({"prompts": [{"token_ids": [5, 6, 7]}], "n": 2, "max_tokens": 4})
        assert len(out.rollouts) == 2
