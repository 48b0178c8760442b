"""The teacher app in-process (real engine, ASGI transport): contract, bad input, auth, limits."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from opd.common.settings import TeacherSettings
from opd.teacher.app import build_app
from opd.teacher.engine import HFScoringEngine


@pytest.fixture
def client(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine):
    settings = teacher_settings.model_copy(update={"max_sequences": 4, "max_request_tokens": 400, "max_body_bytes": 20_000})
    with TestClient(build_app(settings, engine=hf_engine)) as c:
        yield c


def good(client: TestClient) -> None:
    r = client.post("/logprobs", json={"sequences": [{"token_ids": [5, 6, 7], "start": 1}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["logprobs"]) == 2


def test_info_and_probes(client: TestClient, hf_engine: HFScoringEngine) -> None:
    info = client.get("/info").json()
    assert info["service"] == "teacher" and info["engine"] == "hf"
    assert info["vocab_size"] == hf_engine.vocab_size == 512
    assert info["tokenizer_fingerprint"] == hf_engine.fingerprint and len(info["tokenizer_fingerprint"]) == 16
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    good(client)
    metrics = client.get("/metrics").text
    assert 'opd_teacher_requests_total{outcome="ok"} 1.0' in metrics
    assert "opd_teacher_scored_tokens_total 2.0" in metrics


def test_prompt_forms_score_the_same_tokens(client: TestClient, hf_engine: HFScoringEngine) -> None:
    tok = hf_engine.tokenizer
    completion = tok.encode(" the boy went home.", add_special_tokens=False)
    messages = [{"role": "user", "content": "Where did he go?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(rendered, add_special_tokens=False)
    body = {
        "sequences": [
            {"prompt": {"messages": messages}, "completion": completion},
            {"prompt": {"text": rendered}, "completion": completion},
            {"prompt": {"token_ids": prompt_ids}, "completion": completion},
            {"token_ids": prompt_ids + completion, "start": len(prompt_ids)},
        ],
        "top_k": 2,
    }
    r = client.post("/logprobs", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert all(res["token_ids"] == prompt_ids + completion for res in results)
    assert all(res["start"] == len(prompt_ids) for res in results)
    assert all(res["logprobs"] == results[0]["logprobs"] for res in results)
    assert all(len(pos) == 2 for pos in results[0]["top_logprobs"])
    assert r.json()["usage"] == {
        "sequences": 4, "input_tokens": 4 * len(prompt_ids + completion),
        "scored_tokens": 4 * len(completion), "generated_tokens": 0,
    }


def test_temperature_changes_scores(client: TestClient) -> None:
    seq = {"sequences": [{"token_ids": [5, 6, 7, 8]}]}
    plain = client.post("/logprobs", json=seq).json()["results"][0]["logprobs"]
    hot = client.post("/logprobs", json={**seq, "temperature": 2.0}).json()["results"][0]["logprobs"]
    assert len(plain) == len(hot) == 3 and plain != hot


def test_the_lowest_temperature_scores_finite_numbers(client: TestClient) -> None:
    """At the floor (0.01) the logits are scaled 100-fold: finite logprobs, gaps between candidates 100 times those at 1."""
    import math

    def tops(temperature: float) -> list[list[float]]:
        body = {"sequences": [{"token_ids": [5, 6, 7, 8, 9, 10]}], "top_k": 3, "temperature": temperature}
        r = client.post("/logprobs", json=body)
        assert r.status_code == 200, r.text
        assert all(isinstance(x, float) and math.isfinite(x) for x in r.json()["results"][0]["logprobs"])
        return [[t["logprob"] for t in pos] for pos in r.json()["results"][0]["top_logprobs"]]

    cold, plain = tops(0.01), tops(1.0)
    assert all(math.isfinite(x) for pos in cold for x in pos)
    for c, p in zip(cold, plain, strict=True):
        assert c[0] - c[2] == pytest.approx(100 * (p[0] - p[2]), rel=1e-3)


BAD = [
    ("no body", None, 422, "body"),
    ("malformed JSON", "{not json", 422, "not valid JSON"),
    ("empty sequences", {"sequences": []}, 422, "sequences"),
    ("empty token_ids", {"sequences": [{"token_ids": []}]}, 422, "at least 2 tokens"),
    ("start out of range", {"sequences": [{"token_ids": [1, 2, 3], "start": 3}]}, 422, "'start' must be between 1 and"),
    ("start zero", {"sequences": [{"token_ids": [1, 2, 3], "start": 0}]}, 422, "start: Input should be greater than or equal to 1"),
    ("negative id", {"sequences": [{"token_ids": [1, -2, 3]}]}, 422, "sequences[0].token_ids[1]"),
    ("out of vocabulary", {"sequences": [{"token_ids": [1, 2, 512]}]}, 422, "outside the teacher's vocabulary"),
    ("unknown field", {"sequences": [{"token_ids": [1, 2]}], "topk": 3}, 422, "unknown field"),
    ("top_k too large", {"sequences": [{"token_ids": [1, 2]}], "top_k": 21}, 422, "top_k"),
    ("zero temperature", {"sequences": [{"token_ids": [1, 2]}], "temperature": 0}, 422, "temperature"),
    ("tiny temperature", {"sequences": [{"token_ids": [1, 2]}], "temperature": 5e-324}, 422, "greater than or equal to 0.01"),
    ("bool token id", {"sequences": [{"token_ids": [1, True]}]}, 422, "sequences[0].token_ids[1]: Input should be a valid integer"),
    ("float token id", {"sequences": [{"token_ids": [1.0, 2]}]}, 422, "sequences[0].token_ids[0]: Input should be a valid integer"),
    ("float start", {"sequences": [{"token_ids": [1, 2, 3], "start": 1.0}]}, 422, "start: Input should be a valid integer"),
    ("bool top_k", {"sequences": [{"token_ids": [1, 2]}], "top_k": True}, 422, "top_k: Input should be a valid integer"),
    ("both forms", {"sequences": [{"token_ids": [1, 2], "completion": [3]}]}, 422, "not both"),
    ("empty completion", {"sequences": [{"prompt": {"text": "hi"}, "completion": []}]}, 422, "'completion' is empty"),
    ("two prompt kinds", {"sequences": [{"prompt": {"text": "a", "token_ids": [1]}, "completion": [2]}]}, 422, "exactly one"),
    ("too long", {"sequences": [{"token_ids": [1] * 513}]}, 422, "maximum length is 512"),
    ("too many sequences", {"sequences": [{"token_ids": [1, 2]}] * 5}, 413, "the limit is 4"),
    ("too many tokens", {"sequences": [{"token_ids": [1] * 300}, {"token_ids": [1] * 300}]}, 413, "more than 400 tokens"),
    ("body too large", {"sequences": [{"token_ids": [1] * 15000}]}, 413, "over the limit"),
]


@pytest.mark.parametrize(("name", "body", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_and_service_keeps_serving(client: TestClient, name, body, status, fragment) -> None:
    if isinstance(body, str):
        r = client.post("/logprobs", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/logprobs", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    good(client)


def test_auth(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine) -> None:
    with TestClient(build_app(teacher_settings.model_copy(update={"api_key": "s3cret"}), engine=hf_engine)) as c:
        body = {"sequences": [{"token_ids": [1, 2]}]}
        assert c.get("/health").status_code == 200
        for path in ("/info", "/ready", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/logprobs", json=body)
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        assert c.post("/logprobs", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
