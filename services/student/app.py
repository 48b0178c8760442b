"""The student service: `POST /rollouts` samples from the current policy,
`POST /weights` swaps to a newer one without a restart.

`build_app(settings)` wires everything; the engine is built in the lifespan
(or passed in, for tests that share one engine between apps). A vLLM engine
that died cannot come back: every route then answers 503 and the service
exits, so that its supervisor restarts it (services/common/engine_watch.py).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from opd.common import protocol as p
from opd.common.engine_watch import EngineWatch, install_engine_watch
from opd.common.errors import NotReady
from opd.common.server import Authorized, install_common, until_disconnect
from opd.common.settings import StudentSettings
from opd.student.engine import RolloutEngine, build_engine
from opd.student.serving import StudentMetrics, StudentService

ERRORS = {
    400: {"model": p.ErrorBody, "description": "the request cannot be served as asked"},
    401: {"model": p.ErrorBody, "description": "missing or wrong API key"},
    413: {"model": p.ErrorBody, "description": "over the prompts or rollouts limit"},
    422: {"model": p.ErrorBody, "description": "invalid field, out-of-vocabulary id, or too long"},
    503: {"model": p.ErrorBody, "description": "loading, overloaded or the engine died; retry after Retry-After seconds"},
}
WEIGHT_ERRORS = {
    400: {"model": p.ErrorBody, "description": "path outside the checkpoint root, or LoRA disabled"},
    401: ERRORS[401],
    404: {"model": p.ErrorBody, "description": "no checkpoint at that path"},
    409: {"model": p.ErrorBody, "description": "version not newer than the serving one"},
    422: {"model": p.ErrorBody, "description": "the checkpoint does not fit the student model"},
    503: {"model": p.ErrorBody, "description": "the engine died (while loading, say): the student is exiting"},
}


def get_service(request: Request) -> StudentService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the student is still loading its model; retry shortly")
    return service


Service = Annotated[StudentService, Depends(get_service)]


def build_app(settings: StudentSettings, engine: RolloutEngine | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = engine is None
        eng = build_engine(settings) if own else engine
        app.state.service = StudentService(eng, settings, StudentMetrics(registry))
        try:
            async with watch.watching():
                yield
        finally:
            app.state.service = None
            if own:
                await eng.close()

    app = FastAPI(
        title="opd student",
        version="1",
        summary="Samples rollouts from the current student policy, with per-token sampling logprobs; swaps policies live.",
        lifespan=lifespan,
    )
    app.state.service = None

    def limits():
        service = app.state.service
        if service is None:
            return None
        return {
            "RolloutRequest": {
                "max_tokens": {"maximum": service.max_tokens, "default": service.default_max_tokens},
                "prompts": {"maxItems": settings.max_prompts},
            },
            "Prompt": {"token_ids": {"items": {"maximum": service.engine.vocab_size - 1}}},
        }

    registry = install_common(
        app, api_key=settings.api_key, max_pending=settings.max_pending, max_body_bytes=settings.max_body_bytes,
        ready=lambda: app.state.service is not None and app.state.service.engine.healthy(), limits=limits,
    )
    watch = EngineWatch("student", alive=lambda: app.state.service is None or app.state.service.engine.healthy())
    install_engine_watch(app, watch)

    @app.post("/rollouts", dependencies=[Authorized], responses=ERRORS, tags=["student"])
    async def rollouts(body: p.RolloutRequest, service: Service, request: Request) -> p.RolloutResponse:
        """`n` completions per prompt from the serving policy version, with the logprob of every sampled token.

        `temperature` 0 decodes greedily. A request whose client disconnects is cancelled.
        """
        with request.app.state.admission.slot():
            return await until_disconnect(request, service.rollouts(body))

    @app.post("/weights", dependencies=[Authorized], responses=WEIGHT_ERRORS, tags=["student"])
    async def weights(body: p.WeightsRequest, service: Service) -> p.WeightsResponse:
        """Serve a newer policy version: a LoRA adapter or a full checkpoint, relative to the checkpoint root.

        Waits for the rollouts in flight; rollouts asked for meanwhile run on the new version.
        """
        return await service.load_weights(body)

    @app.get("/info", dependencies=[Authorized], tags=["student"])
    async def info(service: Service) -> p.ServiceInfo:
        """Model, engine, vocabulary size, tokenizer fingerprint, maximum length, policy version, limits."""
        return service.info()

    return app
