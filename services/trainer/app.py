"""The trainer service: training runs over HTTP.

    POST /runs             a run config (the YAML's content as JSON) -> the run's id
    GET  /runs             every run of this service
    GET  /runs/{id}        state, step, latest metrics
    GET  /runs/{id}/metrics  every metrics record so far
    POST /runs/{id}/stop   ends the run at the next step boundary
    GET  /info             version, trainer processes, runs dir, runs at once and in progress, limits,
                           and how each run's teachers score (ids or bytes)

One run at a time unless `OPD_TRAINER_MAX_RUNS` says otherwise (409 when
busy). An invalid config is a 422 whose detail names the field. Auth,
probes and error mapping are those of every opd service (`install_common`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from prometheus_client import Gauge

from opd.common import protocol as p
from opd.common.server import Authorized, install_common
from opd.common.settings import TrainerSettings
from opd.trainer.config import RunConfig
from opd.trainer.runs import RunManager

ERRORS = {
    401: {"model": p.ErrorBody, "description": "missing or wrong API key"},
    404: {"model": p.ErrorBody, "description": "no such run"},
    409: {"model": p.ErrorBody, "description": "as many runs in progress as allowed"},
    422: {"model": p.ErrorBody, "description": "invalid run config; the detail names the field"},
}


def get_runs(request: Request) -> RunManager:
    return request.app.state.runs


Runs = Annotated[RunManager, Depends(get_runs)]


def package_version() -> str | None:
    """The installed opd package's version; None from a source tree nobody installed."""
    try:
        return metadata.version("opd")
    except metadata.PackageNotFoundError:
        return None


def build_app(settings: TrainerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runs = RunManager(settings)
        try:
            yield
        finally:
            app.state.runs.shutdown()

    app = FastAPI(
        title="opd trainer",
        version="1",
        summary="On-policy distillation runs: the student samples, the teacher scores per token, the trainer updates.",
        lifespan=lifespan,
    )
    registry = install_common(
        app, api_key=settings.api_key, max_pending=settings.max_pending, max_body_bytes=settings.max_body_bytes,
        ready=lambda: getattr(app.state, "runs", None) is not None,
    )

    def active_runs() -> int:
        runs = getattr(app.state, "runs", None)
        return 0 if runs is None else sum(h.active for h in runs.runs.values())

    def alignments() -> dict[str, dict[str, str]]:
        """Each run in progress that is set up: how each of its teachers scores (ids or bytes)."""
        runs = getattr(app.state, "runs", None)
        return {} if runs is None else {i: dict(a) for i, h in runs.runs.items() if h.active and (a := h.alignment)}

    Gauge("opd_trainer_active_runs", "Runs in progress", registry=registry).set_function(active_runs)

    @app.post("/runs", status_code=201, dependencies=[Authorized], responses=ERRORS, tags=["trainer"])
    async def create_run(config: RunConfig, runs: Runs) -> p.RunCreated:
        """Starts a run of the given config; answers its id at once."""
        handle = runs.start(config)
        return p.RunCreated(id=handle.id, state=handle.state, output_dir=handle.config.output_dir)

    @app.get("/runs", dependencies=[Authorized], tags=["trainer"])
    async def list_runs(runs: Runs) -> p.RunList:
        """Every run of this service, oldest first."""
        return p.RunList(runs=[h.status() for h in runs.runs.values()])

    @app.get("/runs/{run_id}", dependencies=[Authorized], responses=ERRORS, tags=["trainer"])
    async def run_status(run_id: str, runs: Runs) -> p.RunStatus:
        """State, step, policy version and the latest training and evaluation metrics."""
        return runs.get(run_id).status()

    @app.get("/runs/{run_id}/metrics", dependencies=[Authorized], responses=ERRORS, tags=["trainer"])
    async def run_metrics(run_id: str, runs: Runs) -> p.RunMetrics:
        """Every metrics record so far: one per training step and one per evaluation."""
        return p.RunMetrics(id=run_id, records=runs.get(run_id).records())

    @app.post("/runs/{run_id}/stop", status_code=202, dependencies=[Authorized], responses=ERRORS, tags=["trainer"])
    async def stop_run(run_id: str, runs: Runs) -> p.RunStatus:
        """Asks the run to end at the next step boundary; it checkpoints its last whole step."""
        handle = runs.get(run_id)
        handle.request_stop()
        return handle.status()

    @app.get("/info", dependencies=[Authorized], tags=["trainer"])
    async def info() -> p.TrainerInfo:
        """Version, trainer processes, runs dir, runs at once and in progress, limits; per run in progress, how its
        teachers score (ids or bytes)."""
        return p.TrainerInfo(
            version=package_version(), nproc=settings.nproc, runs_dir=settings.runs_dir, max_runs=settings.max_runs,
            active_runs=active_runs(),
            limits={"max_pending": settings.max_pending, "max_body_bytes": settings.max_body_bytes},
            alignment=alignments(),
        )

    return app
