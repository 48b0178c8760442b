"""The vLLM- and SGLang-compatible routes in-process (real hf engine, ASGI transport):
scores equal /logprobs, the response shapes, generation refused, bad input, limits, auth, metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from opd.common.settings import TeacherSettings
from opd.teacher.app import build_app
from opd.teacher.engine import HFScoringEngine, ScoreJob

IDS = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]


@pytest.fixture
def client(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine):
    settings = teacher_settings.model_copy(update={"max_sequences": 4, "max_request_tokens": 400})
    with TestClient(build_app(settings, engine=hf_engine)) as c:
        yield c


def reference(client: TestClient, ids: list[list[int]], top_k: int = 0, start: int = 1) -> list[dict]:
    body = {"sequences": [{"token_ids": x, "start": start} for x in ids], "top_k": top_k}
    r = client.post("/logprobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_models_lists_the_served_model(client: TestClient, hf_engine: HFScoringEngine) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in data["data"]] == [
        (hf_engine.model_name, "model", hf_engine.max_model_len)
    ]


def test_prompt_logprobs_equal_logprobs(client: TestClient, hf_engine: HFScoringEngine) -> None:
    body = {"model": hf_engine.model_name, "prompt": IDS, "max_tokens": 0, "prompt_logprobs": 3, "return_token_ids": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "text_completion" and answer["model"] == hf_engine.model_name
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    for choice, ids, ref in zip(answer["choices"], IDS, reference(client, IDS, top_k=3), strict=True):
        assert choice["prompt_token_ids"] == ids and choice["token_ids"] == [] and choice["finish_reason"] == "length"
        rows = choice["prompt_logprobs"]
        assert rows[0] is None and len(rows) == len(ids)
        for j, row in enumerate(rows[1:]):
            first, *alternatives = row.items()  # the actual token first, then the top 3 by rank
            assert first[0] == str(ids[j + 1]) and first[1]["logprob"] == ref["logprobs"][j]
            top = [(int(t), e["logprob"]) for t, e in sorted(row.items(), key=lambda kv: kv[1]["rank"])][:3]
            assert top == [(t["token_id"], t["logprob"]) for t in ref["top_logprobs"][j]]
            ranks = sorted(e["rank"] for e in row.values())
            assert ranks[:3] == [1, 2, 3] and first[1]["rank"] >= 1
            assert all(e["decoded_token"] == hf_engine.tokenizer.decode([int(t)]) for t, e in row.items())


def test_echo_logprobs_and_one_greedy_token(client: TestClient, hf_engine: HFScoringEngine) -> None:
    """The legacy block: echoed prompt tokens (first one null), then the greedy next token with its alternatives."""
    tok = hf_engine.tokenizer
    text = "the boy went home"
    ids = tok.encode(text)
    body = {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    nxt = hf_engine.score_sync([ScoreJob(ids + [0], len(ids))], top_k=2)[0]
    greedy, greedy_lp = nxt.top_logprobs[0][0]
    legacy = choice["logprobs"]
    assert choice["text"] == text + tok.decode([greedy])
    assert legacy["tokens"] == [tok.decode([t]) for t in ids + [greedy]]
    # One more position changes the padded width, so float32 sums may differ in the last bits.
    expected = reference(client, [ids])[0]["logprobs"] + [greedy_lp]
    assert legacy["token_logprobs"][0] is None and legacy["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    assert legacy["top_logprobs"][0] is None and all(1 <= len(d) <= 3 for d in legacy["top_logprobs"][1:])
    assert legacy["text_offset"][0] == 0 and legacy["text_offset"][1] == len(legacy["tokens"][0])
    assert choice["prompt_logprobs"] is not None  # echo + logprobs scores the prompt, as in vLLM


def test_generate_matches_logprobs_single_and_batch(client: TestClient) -> None:
    single = {"input_ids": IDS[0], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
              "logprob_start_len": 2, "top_logprobs_num": 2}
    out = client.post("/generate", json=single).json()
    ref = reference(client, [IDS[0]], top_k=2, start=3)[0]
    meta = out["meta_info"]
    assert out["text"] == "" and out["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["prompt_tokens"] == 6 and meta["completion_tokens"] == 0 and meta["output_token_logprobs"] == []
    assert meta["input_token_logprobs"] == [[None, 7, None]] + [[lp, t, None] for lp, t in zip(ref["logprobs"], IDS[0][3:])]
    assert meta["input_top_logprobs"][0] is None
    assert meta["input_top_logprobs"][1:] == [[[t["logprob"], t["token_id"], None] for t in pos] for pos in ref["top_logprobs"]]

    batch = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 0}, "return_logprob": [True, False], "rid": "r"}
    outs = client.post("/generate", json=batch).json()
    assert [o["meta_info"]["id"] for o in outs] == ["r-0", "r-1"]
    assert [e[1] for e in outs[0]["meta_info"]["input_token_logprobs"]] == [IDS[0][-1]]  # default start: the last token
    assert "input_token_logprobs" not in outs[1]["meta_info"]


def test_generate_text_input_uses_the_teacher_tokenizer(client: TestClient, hf_engine: HFScoringEngine) -> None:
    body = {"text": ["the boy went home", "a man"], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0, "return_text_in_logprobs": True}
    for out, text in zip(client.post("/generate", json=body).json(), body["text"], strict=True):
        ids = hf_engine.tokenizer.encode(text)
        entries = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == ids and [e[2] for e in entries] == [hf_engine.tokenizer.decode([t]) for t in ids]
        # Scored in a batch of two here and alone in the reference: padding moves float32 sums by ~5e-7.
        assert [e[0] for e in entries[1:]] == pytest.approx(reference(client, [ids])[0]["logprobs"], abs=1e-5)


GENERATION = [
    ("completions default max_tokens", "/v1/completions", {"prompt": [1, 2]}, 400, "max_tokens 16"),
    ("completions max_tokens 5", "/v1/completions", {"prompt": [1, 2], "max_tokens": 5}, 400, "/logprobs"),
    ("completions n 2", "/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "n": 2}, 400, "'n'"),
    ("completions stream", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0, "stream": True}, 400, "'stream'"),
    ("completions suffix", "/v1/completions", {"prompt": "a", "max_tokens": 0, "suffix": "b"}, 400, "'suffix'"),
    ("generate default max_new_tokens", "/generate", {"input_ids": [1, 2]}, 400, "max_new_tokens 128"),
    ("generate max_new_tokens 8", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 8}}, 400, "/logprobs"),
    ("generate stream", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}, "stream": True}, 400, "'stream'"),
]
BAD = [
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": [1, 2], "max_tokens": 0}, 404, "GET /v1/models"),
    ("unknown field", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0, "prompt_logprob": 1}, 422, "unknown field"),
    ("empty prompt", "/v1/completions", {"prompt": [], "max_tokens": 0}, 422, "'prompt' is empty"),
    ("empty text", "/v1/completions", {"prompt": "", "max_tokens": 0}, 422, "'prompt' is empty"),
    ("empty batch item", "/v1/completions", {"prompt": [[1, 2], []], "max_tokens": 0}, 422, "prompt[1] is empty"),
    ("prompt_logprobs 21", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0, "prompt_logprobs": 21}, 422, "prompt_logprobs"),
    ("prompt_logprobs -1", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0, "prompt_logprobs": -1}, 422, "prompt_logprobs"),
    ("bool for int", "/v1/completions", {"prompt": [1, 2], "max_tokens": True}, 422, "max_tokens"),
    ("out of vocabulary", "/v1/completions", {"prompt": [1, 512], "max_tokens": 0, "prompt_logprobs": 0}, 422, "prompt[0] holds token id 512"),
    ("too long", "/v1/completions", {"prompt": [1] * 513, "max_tokens": 0}, 422, "maximum length is 512"),
    ("too many prompts", "/v1/completions", {"prompt": [[1, 2]] * 5, "max_tokens": 0}, 413, "5 prompt in one request"),
    ("too many tokens", "/v1/completions", {"prompt": [[1] * 300] * 2, "max_tokens": 0}, 413, "more than 400 tokens"),
    ("text and ids", "/generate", {"text": "a", "input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, 422, "exactly one"),
    ("no input", "/generate", {"sampling_params": {"max_new_tokens": 0}}, 422, "exactly one"),
    ("empty input_ids", "/generate", {"input_ids": [], "sampling_params": {"max_new_tokens": 0}}, 422, "empty"),
    ("unknown sampling param", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_token": 0}}, 422, "unknown field"),
    ("start too large", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                                      "logprob_start_len": 2}, 422, "logprob_start_len 2"),
    ("start below -1", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}, "logprob_start_len": -2},
     422, "logprob_start_len -2"),
    ("top_logprobs_num 21", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0},
                                          "top_logprobs_num": 21}, 422, "top_logprobs_num"),
    ("per-item list length", "/generate", {"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 0},
                                           "return_logprob": [True]}, 400, "'return_logprob' has 1 values for 2 items"),
    ("out of vocabulary", "/generate", {"input_ids": [[1, 2], [3, 600]], "sampling_params": {"max_new_tokens": 0}},
     422, "input_ids[1] holds token id 600"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "fragment"), GENERATION + BAD, ids=[b[0] for b in GENERATION + BAD])
def test_generation_and_bad_input_are_4xx(client: TestClient, name, path, body, status, fragment) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    # vLLM's error object too: what the openai package and SGLang clients show their users.
    assert r.json()["error"]["message"] == r.json()["detail"] and r.json()["error"]["code"] == status
    assert client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": 0}).status_code == 200


def test_metrics_count_every_endpoint(client: TestClient) -> None:
    client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 0, "prompt_logprobs": 0})
    client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                                   "logprob_start_len": 0})
    client.post("/generate", json={"input_ids": [5, 600], "sampling_params": {"max_new_tokens": 0}})
    metrics = client.get("/metrics").text
    assert 'opd_teacher_endpoint_requests_total{endpoint="/v1/completions"} 1.0' in metrics
    assert 'opd_teacher_endpoint_requests_total{endpoint="/generate"} 2.0' in metrics
    assert 'opd_teacher_requests_total{outcome="ok"} 2.0' in metrics
    assert 'opd_teacher_requests_total{outcome="rejected"} 1.0' in metrics
    assert "opd_teacher_scored_tokens_total 4.0" in metrics


def test_auth_on_the_compatible_routes(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine) -> None:
    with TestClient(build_app(teacher_settings.model_copy(update={"api_key": "s3cret"}), engine=hf_engine)) as c:
        calls = [("GET", "/v1/models", None),
                 ("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0}),
                 ("POST", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}})]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer nope"}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"], path
            assert c.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
