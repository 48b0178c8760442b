"""The student app in-process (hf engine, ASGI transport): contract, prompt
forms, bad input, weight swaps and their refusals, auth, metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from opd.common.settings import StudentSettings
from opd.student.app import build_app
from opd.student.hf_engine import HFRolloutEngine
from tests.student.conftest import Reference

ATOL = 1e-4
GOOD = {"prompts": [{"token_ids": [5, 6, 7]}, {"text": "the boy"}], "n": 2, "max_tokens": 6, "seed": 9}


@pytest.fixture
def client(student_settings: StudentSettings):
    """An app with an engine of its own (swaps change the engine's weights)."""
    settings = student_settings.model_copy(
        update={"max_prompts": 4, "max_rollouts": 8, "max_body_bytes": 20_000, "max_tokens": 128}
    )
    with TestClient(build_app(settings, engine=HFRolloutEngine(settings))) as c:
        yield c


def rollouts(client: TestClient, body: dict = GOOD) -> dict:
    r = client.post("/rollouts", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_contract_info_and_metrics(client: TestClient, hf_engine: HFRolloutEngine, reference: Reference) -> None:
    info = client.get("/info").json()
    assert info["service"] == "student" and info["engine"] == "hf" and info["policy_version"] == 0
    assert info["tokenizer_fingerprint"] == hf_engine.fingerprint and info["vocab_size"] == 512
    assert info["max_model_len"] == 512 and info["limits"]["max_rollouts"] == 8
    assert client.get("/health").json() == {"status": "ok"} and client.get("/ready").status_code == 200
    body = rollouts(client)
    assert body["policy_version"] == 0 and [r["prompt_index"] for r in body["rollouts"]] == [0, 0, 1, 1]
    for r in body["rollouts"]:
        assert len(r["token_ids"]) == len(r["logprobs"]) and r["finish_reason"] in ("stop", "length")
        assert r["prompt_token_ids"] == ([5, 6, 7] if r["prompt_index"] == 0 else hf_engine.tokenizer.encode("the boy"))
    generated = sum(len(r["token_ids"]) for r in body["rollouts"])
    assert body["usage"] == {"sequences": 4, "input_tokens": 3 + len(hf_engine.tokenizer.encode("the boy")),
                             "scored_tokens": 0, "generated_tokens": generated}
    assert reference.max_error("base", body["rollouts"]) < ATOL
    metrics = client.get("/metrics").text
    assert "opd_student_rollouts_total 4.0" in metrics and f"opd_student_generated_tokens_total {generated}.0" in metrics
    assert 'opd_student_requests_total{outcome="ok"} 1.0' in metrics and "opd_student_tokens_per_second " in metrics
    assert "opd_student_tokens_per_second 0.0" not in metrics and "opd_student_policy_version 0.0" in metrics


def test_prompt_forms_give_the_same_rollouts(client: TestClient, hf_engine: HFRolloutEngine) -> None:
    tok = hf_engine.tokenizer
    messages = [{"role": "user", "content": "Where did he go?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    outs = [
        rollouts(client, {"prompts": [form], "n": 2, "max_tokens": 5, "seed": 3})["rollouts"]
        for form in ({"messages": messages}, {"text": rendered}, {"token_ids": ids})
    ]
    assert outs[0][0]["prompt_token_ids"] == ids
    assert outs[0] == outs[1] == outs[2]


BAD = [
    ("no body", None, 422, "body"),
    ("malformed JSON", "{not json", 422, "not valid JSON"),
    ("no prompts", {"prompts": []}, 422, "prompts"),
    ("empty token_ids", {"prompts": [{"token_ids": []}]}, 422, "is empty"),
    ("empty text", {"prompts": [{"text": ""}]}, 422, "is empty"),
    ("empty messages", {"prompts": [{"messages": []}]}, 422, "is empty"),
    ("two prompt forms", {"prompts": [{"text": "a", "token_ids": [1]}]}, 422, "exactly one"),
    ("negative id", {"prompts": [{"token_ids": [1, -2]}]}, 422, "prompts[0].token_ids[1]"),
    ("out of vocabulary", {"prompts": [{"token_ids": [1, 512]}]}, 422, "outside the student's vocabulary of 512"),
    ("unknown field", {"prompts": [{"token_ids": [1]}], "best_of": 2}, 422, "unknown field"),
    ("unknown prompt field", {"prompts": [{"token_ids": [1], "role": "user"}]}, 422, "unknown field"),
    ("n zero", {"prompts": [{"token_ids": [1]}], "n": 0}, 422, "n:"),
    ("max_tokens zero", {"prompts": [{"token_ids": [1]}], "max_tokens": 0}, 422, "max_tokens"),
    ("negative temperature", {"prompts": [{"token_ids": [1]}], "temperature": -0.5}, 422, "temperature"),
    ("temperature as text", {"prompts": [{"token_ids": [1]}], "temperature": "0.5"}, 422, "temperature: Input should be a valid number"),
    ("bool token id", {"prompts": [{"token_ids": [5, True]}]}, 422, "prompts[0].token_ids[1]: Input should be a valid integer"),
    ("float token id", {"prompts": [{"token_ids": [5.0]}]}, 422, "prompts[0].token_ids[0]: Input should be a valid integer"),
    ("bool n", {"prompts": [{"token_ids": [1]}], "n": True}, 422, "n: Input should be a valid integer"),
    ("float max_tokens", {"prompts": [{"token_ids": [1]}], "max_tokens": 4.0}, 422, "max_tokens: Input should be a valid integer"),
    ("max_tokens over the limit", {"prompts": [{"token_ids": [1]}], "max_tokens": 129}, 422, "max_tokens 129 is over this student's limit of 128"),
    ("top_p over 1", {"prompts": [{"token_ids": [1]}], "top_p": 1.5}, 422, "top_p"),
    ("empty stop", {"prompts": [{"token_ids": [1]}], "stop": [""]}, 422, "stop[0]"),
    ("negative seed", {"prompts": [{"token_ids": [1]}], "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ("huge seed", {"prompts": [{"token_ids": [1]}], "seed": 2**64}, 422, "seed: Input should be less than or equal to"),
    ("too long", {"prompts": [{"token_ids": [1] * 500}], "max_tokens": 13}, 422, "513 is over the student's maximum length"),
    ("too many prompts", {"prompts": [{"token_ids": [1]}] * 5}, 413, "5 prompts in one request; the limit is 4"),
    ("too many rollouts", {"prompts": [{"token_ids": [1]}] * 3, "n": 3}, 413, "= 9 rollouts; the limit is 8"),
    ("body too large", {"prompts": [{"token_ids": [1] * 15000}]}, 413, "over the limit"),
]


@pytest.mark.parametrize(("name", "body", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_rollout_requests_are_4xx_and_service_keeps_serving(client: TestClient, name, body, status, fragment) -> None:
    if isinstance(body, str):
        r = client.post("/rollouts", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/rollouts", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert len(rollouts(client)["rollouts"]) == 4


def test_swaps_carry_the_new_version(client: TestClient, reference: Reference) -> None:
    before = rollouts(client)
    for version, kind, path, expected in [(1, "lora", "lora-a", "lora-a"), (3, "full", "full-a", "full-a"),
                                          (7, "lora", "lora-b", "full-a+lora-b")]:
        r = client.post("/weights", json={"version": version, "kind": kind, "path": path})
        assert r.status_code == 200, r.text
        assert r.json()["policy_version"] == version and r.json()["kind"] == kind and r.json()["seconds"] > 0
        after = rollouts(client)
        assert after["policy_version"] == version and client.get("/info").json()["policy_version"] == version
        assert after["rollouts"] != before["rollouts"]
        assert reference.max_error(expected, after["rollouts"]) < ATOL
        before = after
    metrics = client.get("/metrics").text
    assert 'opd_student_swaps_total{kind="lora",outcome="ok"} 2.0' in metrics
    assert 'opd_student_swap_seconds_count{kind="full"} 1.0' in metrics and "opd_student_policy_version 7.0" in metrics


def test_a_swap_sent_again_is_a_success_that_loads_nothing(client: TestClient) -> None:
    """A trainer whose POST /weights timed out after the swap went through sends it again: same version,
    kind and path is that swap, answered 200 without a second load; another path at that version stays a 409."""
    swap = {"version": 2, "kind": "lora", "path": "lora-a"}
    first = client.post("/weights", json=swap)
    assert first.status_code == 200 and first.json()["seconds"] > 0
    serving = rollouts(client)
    again = client.post("/weights", json=swap)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "seconds": 0.0}
    assert rollouts(client) == serving
    assert 'opd_student_swaps_total{kind="lora",outcome="ok"} 1.0' in client.get("/metrics").text
    for other in ({**swap, "path": "lora-b"}, {**swap, "kind": "full", "path": "full-a"}, {**swap, "version": 1}):
        r = client.post("/weights", json=other)
        assert r.status_code == 409 and "not newer than the serving version 2" in r.json()["detail"], other


BAD_WEIGHTS = [
    ("same version", {"version": 1, "kind": "full", "path": "full-a"}, 409, "not newer than the serving version 1"),
    ("older version", {"version": 0, "kind": "full", "path": "full-a"}, 422, "version"),
    ("missing", {"version": 2, "kind": "full", "path": "nope"}, 404, "no checkpoint at 'nope'"),
    ("dot dot", {"version": 2, "kind": "full", "path": "../full-a"}, 400, "contains '..'"),
    ("absolute", {"version": 2, "kind": "lora", "path": "/tmp"}, 400, "is absolute"),
    ("symlink out", {"version": 2, "kind": "full", "path": "escape"}, 400, "leads out of the checkpoint root"),
    ("file symlinked out", {"version": 2, "kind": "full", "path": "sneaky"}, 400, "leads out of the checkpoint root"),
    ("wrong shapes", {"version": 2, "kind": "full", "path": "wide"}, 422, "wrong shapes"),
    ("other architecture", {"version": 2, "kind": "full", "path": "mistral"}, 422, "MistralForCausalLM"),
    ("truncated", {"version": 2, "kind": "full", "path": "truncated"}, 422, "not a readable safetensors file"),
    ("lora as full", {"version": 2, "kind": "full", "path": "lora-a"}, 422, "config.json is missing"),
    ("full as lora", {"version": 2, "kind": "lora", "path": "full-a"}, 422, "adapter_config.json is missing"),
    ("lora wrong shapes", {"version": 2, "kind": "lora", "path": "lora-wide"}, 422, "needs [r, 256]"),
    ("lora rank", {"version": 2, "kind": "lora", "path": "lora-rank32"}, 422, "ranks up to 16"),
    ("unknown kind", {"version": 2, "kind": "delta", "path": "full-a"}, 422, "kind"),
    ("unknown field", {"version": 2, "kind": "full", "path": "full-a", "force": True}, 422, "unknown field"),
]


def test_bad_weights_are_4xx_and_the_old_version_keeps_serving(client: TestClient) -> None:
    assert client.post("/weights", json={"version": 1, "kind": "lora", "path": "lora-a"}).status_code == 200
    serving = rollouts(client)
    for name, body, status, fragment in BAD_WEIGHTS:
        r = client.post("/weights", json=body)
        assert r.status_code == status, (name, r.text)
        assert fragment in r.json()["detail"], name
        assert rollouts(client) == serving, name  # same version, same seeded outputs
    assert 'opd_student_swaps_total{kind="full",outcome="rejected"}' in client.get("/metrics").text


def test_lora_can_be_switched_off(student_settings: StudentSettings) -> None:
    settings = student_settings.model_copy(update={"enable_lora": False})
    with TestClient(build_app(settings, engine=HFRolloutEngine(settings))) as c:
        r = c.post("/weights", json={"version": 1, "kind": "lora", "path": "lora-a"})
        assert r.status_code == 400 and "without LoRA" in r.json()["detail"]
        assert c.post("/weights", json={"version": 1, "kind": "full", "path": "full-a"}).status_code == 200


def test_auth(student_settings: StudentSettings, hf_engine: HFRolloutEngine) -> None:
    with TestClient(build_app(student_settings.model_copy(update={"api_key": "s3cret"}), engine=hf_engine)) as c:
        assert c.get("/health").status_code == 200
        for path in ("/info", "/ready", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path, body in (("/rollouts", GOOD), ("/weights", {"version": 1, "kind": "full", "path": "full-a"})):
            r = c.post(path, json=body, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        assert c.post("/rollouts", json=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200


async def test_racing_swaps_to_one_version_load_it_once(student_settings: StudentSettings) -> None:
    """Two swaps to the same version at once: one loads it, the other gets 409 after waiting for the first;
    the same swap sent twice at once loads once and succeeds twice."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from opd.common import protocol as p
    from opd.common.errors import Conflict
    from opd.student.serving import StudentMetrics, StudentService

    registry = CollectorRegistry()
    service = StudentService(HFRolloutEngine(student_settings), student_settings, StudentMetrics(registry))
    swaps = [service.load_weights(p.WeightsRequest(version=2, kind=kind, path=path))
             for kind, path in (("full", "full-a"), ("lora", "lora-a"))]
    results = await asyncio.gather(*swaps, return_exceptions=True)
    assert isinstance(results[0], p.WeightsResponse) and results[0].policy_version == 2
    assert isinstance(results[1], Conflict) and "not newer than the serving version 2" in str(results[1])
    assert service.version == 2 and service.kind == "full"
    same = p.WeightsRequest(version=3, kind="lora", path="lora-a")
    results = await asyncio.gather(service.load_weights(same), service.load_weights(same))
    assert [r.policy_version for r in results] == [3, 3] and sorted(r.seconds > 0 for r in results) == [False, True]
    assert registry.get_sample_value("opd_student_swaps_total", {"kind": "lora", "outcome": "ok"}) == 1
