"""The published OpenAPI document says what the running service accepts: auth
only with a key, limits known at run time, Retry-After on every 503."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from opd.common import protocol as p
from opd.common.server import Authorized, install_common

ERRORS = {401: {"model": p.ErrorBody, "description": "no key"}, 503: {"model": p.ErrorBody, "description": "busy"}}


def app_with(api_key: str | None, limits) -> FastAPI:
    app = FastAPI(title="t", version="1")
    install_common(app, api_key=api_key, max_pending=2, ready=lambda: True, limits=limits)

    @app.post("/rollouts", dependencies=[Authorized], responses=ERRORS)
    async def rollouts(body: p.RolloutRequest, request: Request) -> p.RolloutResponse:
        raise NotImplementedError

    return app


def document(app: FastAPI) -> dict:
    with TestClient(app) as client:
        r = client.get("/openapi.json")
        assert r.status_code == 200
        return r.json()


def test_without_a_key_no_operation_asks_for_one() -> None:
    doc = document(app_with(None, None))
    assert "securitySchemes" not in doc.get("components", {})
    for path, item in doc["paths"].items():
        for op in item.values():
            assert "security" not in op and "401" not in op["responses"], path


def test_with_a_key_every_operation_but_health_asks_for_it() -> None:
    doc = document(app_with("k", None))
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in doc["paths"]["/health"]["get"]
    for path in ("/rollouts", "/ready", "/metrics"):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] == [{"HTTPBearer": []}], path
        assert "401" in op["responses"], path


def test_limits_and_retry_after() -> None:
    asked = []

    def limits():
        asked.append(1)
        if len(asked) == 1:
            return None  # still loading: no limits yet, and the document is built again next time
        return {"RolloutRequest": {"max_tokens": {"maximum": 77}, "seed": {"maximum": 5}},
                "Prompt": {"token_ids": {"items": {"maximum": 511}}}}

    app = app_with(None, limits)
    with TestClient(app) as client:
        first = client.get("/openapi.json").json()
        assert "maximum" not in first["components"]["schemas"]["RolloutRequest"]["properties"]["max_tokens"]
        doc = client.get("/openapi.json").json()
        assert client.get("/openapi.json").json() == doc and len(asked) == 2  # built once, then kept
    schemas = doc["components"]["schemas"]
    props = schemas["RolloutRequest"]["properties"]
    assert props["max_tokens"]["maximum"] == 77 and props["max_tokens"]["minimum"] == 1
    assert props["seed"]["anyOf"][0]["maximum"] == 5  # an optional field: on its non-null type
    ids = schemas["Prompt"]["properties"]["token_ids"]["anyOf"][0]
    assert ids["items"] == {"type": "integer", "minimum": 0, "maximum": 511}
    for path in ("/rollouts", "/ready"):
        op = next(iter(doc["paths"][path].values()))
        assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True, path


PROMPTS = [
    {"text": "hi"}, {"token_ids": [1, 2]}, {"messages": [{"role": "user", "content": "hi"}]},
    {"text": None, "messages": [{"role": "user", "content": "hi"}]},  # null is not given (schemathesis ST201)
    {"token_ids": [3], "text": None, "messages": None},
    {}, {"text": None}, {"text": "a", "token_ids": [1]}, {"text": "a", "messages": None, "token_ids": [2]},
]
SEQUENCES = [
    {"token_ids": [1, 2], "start": 1}, {"prompt": {"text": "a"}, "completion": [1]},
    {"token_ids": None, "prompt": {"text": "a"}, "completion": [1]}, {"token_ids": [1, 2], "prompt": None, "completion": None},
    {"prompt": {"text": "a"}}, {"token_ids": [1, 2], "prompt": {"text": "a"}, "completion": [1]},
]


def test_the_documents_one_of_accepts_what_the_models_accept() -> None:
    """The JSON schema each model publishes and the model's own validation agree on which fields make a form."""
    import jsonschema
    from pydantic import ValidationError

    for model, bodies in ((p.Prompt, PROMPTS), (p.ScoreSequence, SEQUENCES)):
        schema = model.model_json_schema()
        for body in bodies:
            try:
                model.model_validate(body)
                served = True
            except ValidationError:
                served = False
            documented = jsonschema.Draft202012Validator(schema).is_valid(body)
            assert served == documented, (model.__name__, body, served)
