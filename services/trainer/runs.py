"""Runs inside the trainer service: each in its own thread, at most `max_runs` at once.

Choices:
1) A run is a `Trainer` in a daemon thread; its state (starting, running,
   stopping, completed, stopped, failed) and metrics are read from the trainer
   while it runs, so GET never waits for a step.
2) A run posted without an `output_dir` writes under `runs_dir/<id>`.
3) Stop sets the trainer's stop event: the run ends at the next step boundary
   (or leaves a wait for a service) and checkpoints its last whole step.
4) Shutdown stops every run and waits for it, so no checkpoint is cut short
   (two minutes on one process; under torchrun until torchrun's own deadline).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from opd.common import protocol as p
from opd.common.errors import Conflict, NotFound
from opd.common.settings import TrainerSettings
from opd.trainer.config import RunConfig
from opd.trainer.loop import Trainer

log = logging.getLogger("opd.trainer")
NUMERIC = (int, float)


def numbers(record: dict | None) -> dict[str, float] | None:
    if record is None:
        return None
    return {k: float(v) for k, v in record.items() if isinstance(v, NUMERIC) and not isinstance(v, bool)}


class RunHandle:
    def __init__(self, run_id: str, config: RunConfig) -> None:
        self.id = run_id
        self.config = config
        self.stop = threading.Event()
        self.trainer = Trainer(config, stop=self.stop)
        self.state: p.RunStateName = "starting"
        self.error: str | None = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"run-{run_id}", daemon=True)

    def _run(self) -> None:
        try:
            if self.state == "starting":
                self.state = "running"
            outcome = self.trainer.run()
            self.state = "completed" if outcome == "completed" else "stopped"
        except Exception as exc:  # the run's end, reported through GET /runs/{id}
            log.exception("run %s failed", self.id)
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_at = time.time()

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def request_stop(self) -> None:
        if self.active:
            self.state = "stopping"
            self.stop.set()

    @property
    def alignment(self) -> dict[str, str] | None:
        """How each teacher scores (ids or bytes), once the run is set up; None before."""
        return self.trainer.remote.alignment

    def status(self) -> p.RunStatus:
        metrics = self.trainer.metrics
        return p.RunStatus(
            id=self.id, name=self.config.name, state=self.state, step=self.trainer.step, steps=self.config.steps,
            policy_version=self.trainer.version or None, output_dir=self.config.output_dir,
            latest=numbers(metrics.latest("train")) if metrics else None,
            latest_eval=numbers(metrics.latest("eval")) if metrics else None,
            error=self.error, waiting_for=self.trainer.remote.waiting_for, alignment=self.alignment,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )

    def records(self) -> list[dict]:
        metrics = self.trainer.metrics
        return list(metrics.records) if metrics else []


class RunManager:
    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()

    def start(self, config: RunConfig) -> RunHandle:
        with self._lock:
            active = [r.id for r in self.runs.values() if r.active]
            if len(active) >= self.settings.max_runs:
                raise Conflict(
                    f"{len(active)} run(s) in progress ({', '.join(active)}; limit {self.settings.max_runs}): "
                    "wait for it, or POST /runs/{id}/stop first"
                )
            run_id = f"{config.name}-{uuid.uuid4().hex[:8]}"
            updates: dict = {}
            if "output_dir" not in config.model_fields_set:
                updates["output_dir"] = str(Path(self.settings.runs_dir) / run_id)
            if config.api_key is None and self.settings.api_key:
                updates["api_key"] = self.settings.api_key
            handle = RunHandle(run_id, config.model_copy(update=updates))
            self.runs[run_id] = handle
        handle.thread.start()
        log.info("run %s started: %s", run_id, handle.config.output_dir)
        return handle

    def get(self, run_id: str) -> RunHandle:
        handle = self.runs.get(run_id)
        if handle is None:
            raise NotFound(f"no run {run_id!r}: GET /runs lists the runs of this service")
        return handle

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stops every run and waits up to `timeout` for each; under torchrun without a limit of its own:
        torchrun kills the ranks after its own grace (distributed.SHUTDOWN_S), and a run thread left behind
        would share the control group with the "exit" that follows."""
        from opd.trainer import distributed

        for handle in self.runs.values():
            handle.request_stop()
        for handle in self.runs.values():
            handle.thread.join(None if distributed.current() is not None else timeout)
