"""The teacher as a real process over real HTTP: hf and vllm engines.

Tolerance: on the float32 tiny teacher, vLLM's CPU kernels and transformers
agree to within VLLM_ATOL per token logprob.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from opd.common.client import AsyncTeacherClient, TeacherClient
from opd.common.errors import ServiceError
from opd.teacher.engine import HFScoringEngine, ScoreJob
from tests.utils.services import assert_becomes_idle, hang_up, running, wait_for_metric

pytestmark = pytest.mark.slow
VLLM_ATOL = 2e-3
KEY = "test-key"


def as_sequences(jobs: list[ScoreJob]) -> list[dict]:
    return [{"token_ids": j.token_ids, "start": j.start} for j in jobs]


@pytest.fixture(scope="module")
def vllm_teacher(teacher_model: Path, tmp_path_factory):
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "vllm", "--dtype", "float32"]
    with running("teacher-vllm", args, log_dir=tmp_path_factory.mktemp("logs"), api_key=KEY,
                 env={"OPD_TEACHER_MAX_PENDING": "4"}) as proc:
        yield proc


def test_hf_process_equals_in_process(teacher_model: Path, hf_engine: HFScoringEngine, jobs, tmp_path) -> None:
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    with running("teacher-hf", args, log_dir=tmp_path) as proc:
        remote = TeacherClient(proc.url).logprobs(as_sequences(jobs), top_k=3)
    local = hf_engine.score_sync(jobs, top_k=3)
    for r, l in zip(remote.results, local, strict=True):
        assert r.logprobs == l.logprobs
        assert [[(t.token_id, t.logprob) for t in pos] for pos in r.top_logprobs] == l.top_logprobs


def test_vllm_matches_hf_engine(vllm_teacher, hf_engine: HFScoringEngine, jobs) -> None:
    client = TeacherClient(vllm_teacher.url, api_key=KEY)
    info = client.info()
    assert info.engine == "vllm" and info.tokenizer_fingerprint == hf_engine.fingerprint
    assert info.vocab_size == hf_engine.vocab_size
    remote = client.logprobs(as_sequences(jobs), top_k=4)
    local = hf_engine.score_sync(jobs, top_k=4)
    agree = total = 0
    for r, l in zip(remote.results, local, strict=True):
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(l.logprobs), atol=VLLM_ATOL)
        for rpos, lpos in zip(r.top_logprobs, l.top_logprobs, strict=True):
            assert torch.allclose(torch.tensor([t.logprob for t in rpos]), torch.tensor([v for _, v in lpos]), atol=VLLM_ATOL)
            agree += [t.token_id for t in rpos] == [t for t, _ in lpos]
            total += 1
    assert agree / total > 0.95  # near-ties may swap order within the tolerance


def test_concurrent_clients_get_serial_answers(vllm_teacher, jobs) -> None:
    """Many clients at once (continuous batching, 503s retried) get what one client gets alone."""
    client = TeacherClient(vllm_teacher.url, api_key=KEY, backoff=0.1)
    serial = [client.logprobs(as_sequences([j])).results[0].logprobs for j in jobs]

    async def burst() -> list[list[float]]:
        aclient = AsyncTeacherClient(vllm_teacher.url, api_key=KEY, backoff=0.1, retries=50)
        try:
            outs = await asyncio.gather(*(aclient.logprobs(as_sequences([j])) for j in jobs * 3))
        finally:
            await aclient.aclose()
        return [o.results[0].logprobs for o in outs]

    concurrent = asyncio.run(burst())
    for i, lp in enumerate(concurrent):
        assert torch.allclose(torch.tensor(lp), torch.tensor(serial[i % len(jobs)]), atol=1e-4)
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda j: client.logprobs(as_sequences([j])).results[0].logprobs, jobs))
    for a, b in zip(threaded, serial, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_overload_answers_503_with_retry_after(vllm_teacher, jobs) -> None:
    big = {"sequences": as_sequences(jobs * 4)}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            return await asyncio.gather(*(http.post(vllm_teacher.url + "/logprobs", json=big) for _ in range(12)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1
    assert 503 in statuses, "12 concurrent requests against max_pending=4 should overflow"
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1" and "limit 4" in rejected.json()["detail"]
    assert TeacherClient(vllm_teacher.url, api_key=KEY).logprobs(as_sequences(jobs[:1])).results


def test_vllm_bad_input_and_auth(vllm_teacher) -> None:
    client = TeacherClient(vllm_teacher.url, api_key=KEY)
    with pytest.raises(ServiceError) as err:
        client.logprobs([{"token_ids": [1, 2, 3]}], temperature=0.5)
    assert err.value.status_code == 422 and "--engine hf" in err.value.message
    with pytest.raises(ServiceError) as err:
        client.logprobs([{"token_ids": [1, 99999]}])
    assert err.value.status_code == 422 and "vocabulary" in err.value.message
    # vLLM needs one position for the token it generates: max_model_len tokens are one too many.
    with pytest.raises(ServiceError) as err:
        client.logprobs([{"token_ids": [1] * 512}])
    assert err.value.status_code == 422 and "maximum length is 511" in err.value.message
    assert client.info().limits["max_sequence_len"] == 511
    assert len(client.logprobs([{"token_ids": [1] * 511, "start": 500}]).results[0].logprobs) == 11
    r = httpx.post(vllm_teacher.url + "/logprobs", json={"sequences": [{"token_ids": [1, 2]}]})
    assert r.status_code == 401
    assert httpx.get(vllm_teacher.url + "/health").status_code == 200
    assert len(client.logprobs([{"token_ids": [1, 2, 3]}]).results[0].logprobs) == 2


def test_client_waits_for_a_service_that_is_starting(teacher_model: Path, tmp_path) -> None:
    """The client retries connection errors with backoff until the service is up."""
    from opd.common.process import ServiceProcess, free_port

    port = free_port()
    proc = ServiceProcess("late", ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--port", str(port)],
                          port, log_file=tmp_path / "late.log")
    proc.start()
    try:
        info = TeacherClient(proc.url, retries=8, backoff=0.5).info()
        assert info.engine == "hf"
    finally:
        proc.stop()
    assert not proc.alive()


def test_vllm_shared_prompts_score_like_hf(vllm_teacher, hf_engine: HFScoringEngine) -> None:
    """G completions per prompt (the trainer's batches): prompt blocks come from vLLM's
    prefix cache, and every logprob still matches the reference. (Cache hits that reach
    past `start`, which need longer shared completions, are in test_vllm_engine.py.)"""
    rng = random.Random(3)
    jobs = []
    for length in (200, 37, 300):
        prompt = [rng.randrange(512) for _ in range(length)]
        shared = [rng.randrange(512) for _ in range(40)]
        for g in range(4):
            completion = shared + [rng.randrange(512) for _ in range(10)] if g < 2 else [rng.randrange(512) for _ in range(25)]
            jobs.append(ScoreJob(prompt + completion, length))
    client = TeacherClient(vllm_teacher.url, api_key=KEY)
    for _ in range(2):  # the second time, everything is in the cache
        remote = client.logprobs(as_sequences(jobs), top_k=2)
        for r, l in zip(remote.results, hf_engine.score_sync(jobs, top_k=2), strict=True):
            assert len(r.logprobs) == len(l.logprobs)
            assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(l.logprobs), atol=VLLM_ATOL)


def test_vllm_compatible_endpoints_match_hf(vllm_teacher, hf_engine: HFScoringEngine, jobs) -> None:
    """The openai package on /v1/completions and slime's payload on /generate, served by the vllm
    engine, agree with the hf reference within VLLM_ATOL; a wrong key is refused on the new routes."""
    import openai

    full = [ScoreJob(j.token_ids, 1) for j in jobs]
    reference = hf_engine.score_sync(full)
    client = openai.OpenAI(base_url=vllm_teacher.url + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    answer = client.completions.create(model=model, prompt=[j.token_ids for j in full], max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    for choice, job, ref in zip(answer.choices, full, reference, strict=True):
        got = [row[str(t)]["logprob"] for row, t in zip(choice.prompt_logprobs[1:], job.token_ids[1:], strict=True)]
        assert torch.allclose(torch.tensor(got), torch.tensor(ref.logprobs), atol=VLLM_ATOL)
        assert choice.finish_reason == "length"
    slime = {"sampling_params": {"temperature": 1.0, "max_new_tokens": 0, "skip_special_tokens": False},
             "return_logprob": True, "logprob_start_len": 0}
    for job, ref in zip(full[:4], reference, strict=False):
        r = httpx.post(vllm_teacher.url + "/generate", json={"input_ids": job.token_ids, **slime},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        got = [item[0] for item in r.json()["meta_info"]["input_token_logprobs"][1:]]
        assert torch.allclose(torch.tensor(got), torch.tensor(ref.logprobs), atol=VLLM_ATOL)
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=vllm_teacher.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert "API key" in str(err.value)
    assert httpx.post(vllm_teacher.url + "/generate", json={"input_ids": [1, 2], **slime}).status_code == 401


def test_a_client_that_goes_away_stops_its_scoring(teacher_model: Path, tmp_path) -> None:
    """A request of 512 sequences (one micro-batch each) whose client hangs up is cancelled within a micro-batch."""
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    rng = random.Random(5)
    body = {"sequences": [{"token_ids": [rng.randrange(512) for _ in range(500)]} for _ in range(512)]}
    with running("teacher-hf", args, log_dir=tmp_path, env={"OPD_TEACHER_MICRO_BATCH_TOKENS": "512"}) as proc:
        hang_up(proc.url + "/logprobs", body, after=2.0)
        metrics = wait_for_metric(proc.url, 'opd_teacher_requests_total{outcome="cancelled"} 1.0')
        assert "opd_queue_depth 0.0" in metrics
        assert_becomes_idle(proc.proc.pid)  # once the micro-batch that was running ends
        assert len(TeacherClient(proc.url).logprobs([{"token_ids": [5, 6, 7]}]).results[0].logprobs) == 2
