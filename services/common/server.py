"""What every service's FastAPI app shares: auth, errors, admission, probes.

- Auth: with an API key configured, every route but /health needs
  `Authorization: Bearer <key>` (401 otherwise).
- Errors: named `OPDError`s map to their status code; validation errors become
  a 422 whose `detail` names each bad field in one readable line. Under the
  paths in `error_envelope` (the teacher's vLLM- and SGLang-compatible routes)
  the body also carries vLLM's `{"error": {"message", "type", "code"}}`, which
  is what the openai package and other vLLM/SGLang clients show their users.
- Admission: at most `max_pending` requests in flight or waiting; the next
  one gets 503 with Retry-After instead of joining an unbounded queue.
- Probes: /health (process alive), /ready (model loaded), /metrics
  (Prometheus text from the app's own registry, so apps in one process do
  not share counters).
- A dead engine: every route answers 503 and `serve` exits non-zero, so a
  supervisor restarts the service (services/common/engine_watch.py).
- Disconnects: `until_disconnect` runs a handler's work and cancels it when
  the client goes away, so the engine stops working for nobody (uvicorn
  does not cancel a handler by itself).
- The OpenAPI document says what the service accepts (services/common/openapi.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from contextlib import contextmanager, suppress
from http import HTTPStatus
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from opd.common.errors import ClientGone, OPDError, Overloaded
from opd.common.openapi import Limits, publish
from opd.common.protocol import Health

log = logging.getLogger("opd")
T = TypeVar("T")
_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    key = getattr(request.app.state, "api_key", None)
    if not key:
        return
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send 'Authorization: Bearer <OPD_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_api_key)


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def describe_validation_errors(errors: list[dict]) -> str:
    lines = []
    for e in errors:
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field: remove it (see the OpenAPI document at /docs)"
        elif e.get("type") == "json_invalid":
            msg = "the body is not valid JSON: " + str(e.get("ctx", {}).get("error", ""))
        lines.append(f"{_field_path(tuple(e.get('loc', ())))}: {msg}")
    return "; ".join(lines)


def error_response(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict = {"detail": detail}
    if request.url.path.startswith(getattr(request.app.state, "error_envelope", ())):
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:  # 499, nginx's code for a client that went away
            phrase = "Client Closed Request"
        kind = phrase.title().replace(" ", "").replace("-", "") + "Error"
        body["error"] = {"message": detail, "type": kind, "param": None, "code": status}
    return JSONResponse(body, status_code=status, headers=headers)


class Admission:
    """Bounds the requests a service holds at once; counts them for /metrics."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.pending = 0
        self._gauge = gauge

    @contextmanager
    def slot(self):
        if self.pending >= self.limit:
            raise Overloaded(f"{self.pending} requests pending (limit {self.limit}); retry shortly")
        self.pending += 1
        self._gauge.set(self.pending)
        try:
            yield
        finally:
            self.pending -= 1
            self._gauge.set(self.pending)


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientGone after cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone(f"the client of {request.method} {request.url.path} went away; its work was cancelled")
    return task.result()


def install_common(
    app: FastAPI, *, api_key: str | None, max_pending: int, ready: Callable[[], bool], max_body_bytes: int = 64 * 2**20,
    limits: Callable[[], Limits | None] | None = None, error_envelope: tuple[str, ...] = (),
) -> CollectorRegistry:
    """Adds error handlers, admission control, a body size limit and the probe routes; returns the metrics registry.

    `limits` gives the OpenAPI document the bounds only the running service knows (None while loading).
    """
    registry = CollectorRegistry()
    publish(app, api_key=api_key, limits=limits)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return error_response(
                request, 413, f"request body of {size} bytes is over the limit of {max_body_bytes}: split the request"
            )
        return await call_next(request)

    app.state.api_key = api_key
    app.state.error_envelope = error_envelope
    app.state.registry = registry
    app.state.admission = Admission(max_pending, Gauge("opd_queue_depth", "Requests in flight or waiting", registry=registry))

    @app.exception_handler(OPDError)
    async def _opd_error(request: Request, exc: OPDError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status_code == 503 else None
        if exc.status_code >= 499:
            log.warning("%s: %s", type(exc).__name__, exc)
        return error_response(request, exc.status_code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, describe_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/health", tags=["probes"])
    async def health() -> Health:
        """The process is alive (no auth)."""
        return Health(status="ok")

    @app.get("/ready", tags=["probes"], dependencies=[Authorized], responses={503: {"description": "still loading"}})
    async def is_ready() -> Health:
        """The model is loaded and requests are served."""
        if not ready():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})  # type: ignore[return-value]
        return Health(status="ok")

    @app.get("/metrics", tags=["probes"], dependencies=[Authorized], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Runs the app until a signal, or until its engine dies: then exits with engine_watch.EXIT_CODE."""
    import sys

    import uvicorn

    from opd.common.engine_watch import EXIT_CODE, exit_when_dead

    configure_logging(log_level)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10))
    watch = exit_when_dead(app, lambda: setattr(server, "should_exit", True))
    with suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    if watch is not None and watch.cause is not None:
        sys.exit(EXIT_CODE)
    if not server.started:
        sys.exit(3)  # uvicorn.run's exit code when the app did not start
