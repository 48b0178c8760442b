"""POST /render: the ids a prompt renders to are exactly the prompt part of what /logprobs scores after, bad input
is a 4xx that says what to fix, and both clients call it over HTTP (a real hf teacher process)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from opd.common.client import AsyncTeacherClient, TeacherClient
from opd.common.settings import TeacherSettings
from opd.teacher.app import build_app
from opd.teacher.engine import HFScoringEngine
from tests.utils.services import running

MESSAGES = {"messages": [{"role": "system", "content": "Answer in one short line."},
                         {"role": "user", "content": "Where did the boy go?"}]}
TEXT = {"text": "The man said: where did the boy go?"}
IDS = {"token_ids": [5, 6, 7]}


@pytest.fixture
def client(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine):
    settings = teacher_settings.model_copy(update={"max_sequences": 4, "max_body_bytes": 20_000})
    with TestClient(build_app(settings, engine=hf_engine)) as c:
        yield c


def rendered(client: TestClient, prompts: list[dict]) -> list[list[int]]:
    r = client.post("/render", json={"prompts": prompts})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def test_render_is_the_prompt_part_of_the_scores(client: TestClient, hf_engine: HFScoringEngine) -> None:
    completion = hf_engine.tokenizer.encode(" home.", add_special_tokens=False)
    prompts = [MESSAGES, TEXT, IDS]
    r = client.post("/logprobs", json={"sequences": [{"prompt": x, "completion": completion} for x in prompts]})
    assert r.status_code == 200, r.text
    scored = [res["token_ids"][:res["start"]] for res in r.json()["results"]]
    answer = client.post("/render", json={"prompts": prompts}).json()
    assert answer == {"model": client.get("/info").json()["model"], "token_ids": scored}
    assert scored[2] == IDS["token_ids"] and len(scored[0]) > len(scored[1]) > 3


@pytest.fixture(scope="module")
def empty_template_client(teacher_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny teacher with a chat template that renders nothing."""
    folder = tmp_path_factory.mktemp("models") / "teacher-empty-template"
    shutil.copytree(teacher_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for message in messages %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    settings = TeacherSettings(model=str(folder), engine="hf", dtype="float32", device="cpu")
    with TestClient(build_app(settings, engine=HFScoringEngine(settings))) as c:
        yield c


BAD = [
    ("no prompts", {"prompts": []}, 422, "prompts"),
    ("no body", None, 422, "body"),
    ("too many prompts", {"prompts": [TEXT] * 5}, 413, "5 prompts in one request; the limit is 4"),
    ("out of vocabulary", {"prompts": [TEXT, {"token_ids": [1, 512]}]}, 422, "prompts[1] holds token id 512"),
    ("two prompt kinds", {"prompts": [{"text": "a", "token_ids": [1]}]}, 422, "exactly one"),
    ("empty text", {"prompts": [{"text": ""}]}, 422, "empty"),
    ("unknown field", {"prompts": [TEXT], "top_k": 2}, 422, "unknown field"),
    ("body too large", {"prompts": [{"text": "a" * 30_000}]}, 413, "over the limit"),
]


@pytest.mark.parametrize(("name", "body", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_and_the_service_keeps_serving(client: TestClient, name, body, status, fragment) -> None:
    r = client.post("/render", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert rendered(client, [TEXT])[0]


def test_a_prompt_that_renders_to_nothing_is_named(empty_template_client: TestClient) -> None:
    r = empty_template_client.post("/render", json={"prompts": [TEXT, MESSAGES]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "prompts[1] renders to no tokens: give a non-empty prompt"
    assert rendered(empty_template_client, [TEXT])[0]


def test_auth(teacher_settings: TeacherSettings, hf_engine: HFScoringEngine) -> None:
    with TestClient(build_app(teacher_settings.model_copy(update={"api_key": "s3cret"}), engine=hf_engine)) as c:
        assert c.post("/render", json={"prompts": [TEXT]}).status_code == 401
        assert c.post("/render", json={"prompts": [TEXT]}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        op = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()["paths"]["/render"]["post"]
        assert op["security"] == [{"HTTPBearer": []}] and {"401", "413", "422"} <= op["responses"].keys()


@pytest.mark.slow
def test_both_clients_render_over_http(teacher_model: Path, client: TestClient, tmp_path: Path) -> None:
    expected = rendered(client, [MESSAGES, TEXT])
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    with running("teacher-render", args, log_dir=tmp_path, api_key="k") as proc:
        with TeacherClient(proc.url, api_key="k") as teacher:
            assert teacher.render([MESSAGES, TEXT]).token_ids == expected

        async def render() -> list[list[int]]:
            teacher = AsyncTeacherClient(proc.url, api_key="k")
            try:
                return (await teacher.render([MESSAGES, TEXT])).token_ids
            finally:
                await teacher.aclose()

        assert asyncio.run(render()) == expected
