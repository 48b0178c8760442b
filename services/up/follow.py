"""Follows `opd up`'s run to its end, through trainer restarts and stop requests.

    follower = RunFollower(trainer_url, api_key, run, supervisor, interrupts, console, grace_s=10)
    follower.submit()
    outcome = follower.follow()        # Outcome(state, status, reason)

Choices:
1) The trainer is polled once a second (GET /runs/{id} and its metrics) by a
   client that does not retry: a trainer that is down is the supervisor's
   business; the follower waits for it.
2) When the supervisor reports the trainer ready again, the run is posted
   again with `resume: true`: the trainer continues from its last checkpoint
   in the same output folder, and RunWatcher shows no step twice.
3) A stop (the first Ctrl-C, or a service beyond its restart limit) holds the
   supervisor, posts POST /runs/{id}/stop and waits for the run to end: at
   most `grace_s` plus the longest step (and evaluation) seen so far (before
   the first step: plus the time the run has taken so far), as the trainer
   stops at a step boundary or at once when it is waiting for a service. A trainer that is down, or the deadline, ends the wait: then
   `opd up` stops everything, and the last checkpoint stands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from opd.common.client import SyncClient
from opd.common.errors import OPDError
from opd.up.interrupts import Interrupts
from opd.up.report import DONE, RunWatcher
from opd.up.supervisor import Supervisor

POLL_S = 1.0  # how often the trainer is asked
TICK_S = 0.1  # how often a stop request is looked for


@dataclass
class Outcome:
    state: str  # the trainer's (completed, failed, stopped), or "interrupted" when opd up stopped waiting
    status: dict[str, Any] | None  # the trainer's last answer about the run
    reason: str | None = None  # why a stop was asked: "interrupted" or the supervisor's failure


class RunFollower:
    def __init__(
        self, trainer_url: str, api_key: str, run: dict[str, Any], supervisor: Supervisor,
        interrupts: Interrupts, console: Console, grace_s: float,
    ) -> None:
        self.client = SyncClient(trainer_url, api_key=api_key, timeout=10.0, retries=0)
        self.run, self.supervisor, self.interrupts = run, supervisor, interrupts
        self.console, self.grace_s = console, grace_s
        self.watcher = RunWatcher(console)
        self.run_id: str | None = None
        self.output_dir: str | None = None
        self.trainer_generation = supervisor.generation("trainer")
        self.deadline: float | None = None
        self.submitted_at = time.monotonic()
        self.reason: str | None = None
        self.status: dict[str, Any] | None = None

    def submit(self, resume: bool = False) -> None:
        """POST /runs; `resume` forces resume=true (a restarted trainer continues from its checkpoint)."""
        body = {**self.run, "resume": True} if resume else self.run
        created = self.client.request("POST", "/runs", body)
        self.run_id, self.output_dir = created["id"], created["output_dir"]
        self.submitted_at = time.monotonic()
        verb = "resumed" if resume else "started"
        self.console.print(f"run {self.run_id} {verb}: output in {self.output_dir}")

    def follow(self) -> Outcome:
        self.interrupts.graceful = True
        try:
            with self.watcher.live() as show:
                while True:
                    self._maybe_stop()
                    self._maybe_resubmit()
                    self._poll(show)
                    if self.status is not None and self.status["state"] in DONE:
                        return Outcome(self.status["state"], self.status, self.reason)
                    if self.deadline is not None and (time.monotonic() > self.deadline or not self.supervisor.up("trainer")):
                        return Outcome("interrupted", self.status, self.reason)
                    self._pause()
        finally:
            self.interrupts.graceful = False

    def _pause(self) -> None:
        """POLL_S, cut short by a stop request (the signal handler only sets a flag)."""
        until = time.monotonic() + POLL_S
        while time.monotonic() < until and not (self.deadline is None and self._stop_reason()):
            time.sleep(TICK_S)

    def _stop_reason(self) -> str | None:
        if self.interrupts.stop_requested:
            return "interrupted"
        return self.supervisor.failure

    def _maybe_stop(self) -> None:
        if self.deadline is not None or not (reason := self._stop_reason()):
            return
        self.reason = reason
        self.supervisor.hold()
        step = self.watcher.longest_step + self.watcher.longest_eval or time.monotonic() - self.submitted_at
        bound = self.grace_s + step
        self.deadline = time.monotonic() + bound
        if self.reason == "interrupted":
            self.console.print(f"[yellow]stopping: the trainer ends the run at its next safe point and checkpoints "
                               f"(at most {bound:.0f}s); Ctrl-C again stops everything at once[/yellow]")
        try:
            self.client.request("POST", f"/runs/{self.run_id}/stop")
        except OPDError:
            pass  # the trainer is down: there is nothing to wait for

    def _maybe_resubmit(self) -> None:
        generation = self.supervisor.generation("trainer")
        if generation == self.trainer_generation or self.deadline is not None:
            return
        try:
            self.submit(resume=True)
        except OPDError as exc:
            self.console.print(f"[yellow]could not give the run to the restarted trainer yet: {exc}[/yellow]")
            return
        self.trainer_generation = generation
        self.status = None

    def _poll(self, show: Any) -> None:
        try:
            status = self.client.request("GET", f"/runs/{self.run_id}")
            records = self.client.request("GET", f"/runs/{self.run_id}/metrics")["records"]
        except OPDError:
            return  # the trainer is down or restarting
        self.status = status
        show(status, records)
