"""The teacher service: `POST /logprobs` scores token sequences under the teacher;
`POST /render` answers the ids prompts render to, the prompt part of its scores.

It also answers the scoring subset of vLLM's OpenAI-compatible API
(`/v1/completions`, `/v1/models`) and of SGLang's `/generate`
(compat_routes.py), on the same engine.

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
from opd.common.settings import TeacherSettings
from opd.teacher import compat_routes
from opd.teacher.engine import ScoringEngine, build_engine
from opd.teacher.openai_compat import OpenAICompletions
from opd.teacher.serving import TeacherMetrics, TeacherService
from opd.teacher.sglang_compat import SGLangGenerate

ERRORS = {
    400: {"model": p.ErrorBody, "description": "the request cannot be served as asked"},
    401: {"model": p.ErrorBody, "description": "missing or wrong API key"},
    413: {"model": p.ErrorBody, "description": "over the sequences or tokens limit"},
    422: {"model": p.ErrorBody, "description": "invalid field, out-of-vocabulary id, or too long"},
    503: {"model": p.ErrorBody, "description": "loading, overloaded or the engine died; retry after Retry-After seconds"},
}


def get_service(request: Request) -> TeacherService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the teacher is still loading its model; retry shortly")
    return service


Service = Annotated[TeacherService, Depends(get_service)]


def build_app(settings: TeacherSettings, engine: ScoringEngine | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = engine is None
        eng = build_engine(settings) if own else engine
        app.state.service = service = TeacherService(eng, settings, TeacherMetrics(registry))
        app.state.openai, app.state.sglang = OpenAICompletions(service), SGLangGenerate(service)
        try:
            async with watch.watching():
                yield
        finally:
            app.state.service = app.state.openai = app.state.sglang = None
            if own:
                await eng.close()

    app = FastAPI(
        title="opd teacher",
        version="1",
        summary="Scores token sequences under the teacher model: per-token log-probabilities, optional top-k.",
        lifespan=lifespan,
    )
    app.state.service = app.state.openai = app.state.sglang = None

    def limits():
        service = app.state.service
        if service is None:
            return None
        largest_id = {"items": {"maximum": service.engine.vocab_size - 1}}
        return {
            "LogprobsRequest": {"sequences": {"maxItems": settings.max_sequences}},
            "RenderRequest": {"prompts": {"maxItems": settings.max_sequences}},
            "ScoreSequence": {"token_ids": {"maxItems": service.engine.max_model_len, **largest_id}, "completion": largest_id},
            "Prompt": {"token_ids": largest_id},
        }

    registry = install_common(
        app, api_key=settings.api_key, max_pending=settings.max_pending, max_body_bytes=settings.max_body_bytes,
        ready=lambda: app.state.service is not None and app.state.service.engine.healthy(), limits=limits,
        error_envelope=compat_routes.PATHS,
    )
    watch = EngineWatch("teacher", alive=lambda: app.state.service is None or app.state.service.engine.healthy())
    install_engine_watch(app, watch)

    @app.post("/logprobs", dependencies=[Authorized], responses=ERRORS, tags=["teacher"])
    async def logprobs(body: p.LogprobsRequest, service: Service, request: Request) -> p.LogprobsResponse:
        """Log-probability of every token from `start` on, under the teacher. A request whose client disconnects is cancelled."""
        with request.app.state.admission.slot():
            return await until_disconnect(request, service.logprobs(body))

    @app.post("/render", dependencies=[Authorized], responses=ERRORS, tags=["teacher"])
    async def render(body: p.RenderRequest, service: Service) -> p.RenderResponse:
        """The token ids each prompt renders to under the teacher's tokenizer and chat template: what /logprobs puts
        before a `prompt` + `completion` sequence's completion. No engine work: never queued behind scoring."""
        return service.render(body)

    @app.get("/info", dependencies=[Authorized], tags=["teacher"])
    async def info(service: Service) -> p.ServiceInfo:
        """Model, engine, vocabulary size, tokenizer fingerprint, maximum length, limits."""
        return service.info()

    app.include_router(compat_routes.router)
    return app
