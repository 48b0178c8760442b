"""EngineWatch on a small app in this process: once the engine is found dead every route, the probes
included, answers 503 naming the cause, and the server is asked to stop once. (The real thing, a vLLM
engine core SIGKILLed under a service process, is tests/{student,teacher}/test_engine_death.py.)"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from opd.common.engine_watch import EngineWatch, install_engine_watch
from opd.common.errors import OPDError
from opd.common.server import install_common


def test_a_dead_engine_answers_503_everywhere_and_stops_the_server() -> None:
    engine = {"alive": True, "dying": False}
    stops = []
    app = FastAPI()
    install_common(app, api_key=None, max_pending=4, ready=lambda: engine["alive"])
    watch = EngineWatch("student", alive=lambda: engine["alive"])
    watch.on_death = lambda: stops.append(1)
    install_engine_watch(app, watch)

    @app.get("/work")
    async def work() -> dict:
        if engine["dying"]:  # the engine dies under this request: vLLM raises, and reports errored from then on
            engine["alive"] = False
            raise RuntimeError("EngineCore encountered an issue")
        return {"ok": True}

    @app.get("/broken")
    async def broken() -> dict:
        raise OPDError("a bug unrelated to the engine")

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/health").status_code == 200 and client.get("/work").status_code == 200
    assert client.get("/broken").status_code == 500  # a live engine's 500 stays one
    assert not stops
    engine["dying"] = True
    r = client.get("/work")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["detail"].startswith("the student's engine died (RuntimeError): the student is exiting")
    for path in ("/health", "/ready", "/work", "/broken", "/metrics"):
        r = client.get(path)
        assert r.status_code == 503 and "is exiting so that its supervisor" in r.json()["detail"], (path, r.text)
    assert stops == [1]
