"""Keeps `opd up`'s services running: a crash is reported at once and the service restarted.

    supervisor = Supervisor(stack.procs, config.restart, report=console.print, api_key=key, startup_timeout_s=900)
    supervisor.start()                      # a thread; every child is ready by now
    supervisor.generation("trainer")        # how many times the trainer came back
    supervisor.failure                      # set once a service crashed more often than allowed
    supervisor.close(); stop_all(stack.procs, grace=10, hurry=lambda: interrupts.hurry)

Choices:
1) One thread polls every child (every 0.2 s). An exit nobody asked for is
   reported at once: which service, its exit code or signal, the last lines
   of its log.
2) The service is started again with the same arguments after a backoff
   (restart.backoff_s, doubled for each restart of that service, at most
   restart.max_backoff_s). A restart that exits, or is not ready within the
   start-up timeout, is a crash again and counts.
3) The stack itself heals what a restart loses: the trainer notices a
   restarted student (it serves its base model) and loads the current policy
   again; a restarted trainer gets the run again from `opd up`, which watches
   `generation()`, and resumes from its last checkpoint. Teacher calls wait.
4) The n+1-th crash of a service with max_restarts=n (or any crash with
   policy "no") sets `failure`, naming the service: `opd up` stops everything.
5) `hold()` ends restarting (a stop is under way): crashes are still reported.
6) `stop_all` sends SIGTERM to every group at once and SIGKILL to what is left
   after the grace period, or at once when asked to hurry (a second Ctrl-C).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from opd.common.process import ServiceProcess, StartupFailed
from opd.up.config import RestartPolicy

POLL_S = 0.2
ACCESS_LOG = re.compile(r'"(GET|POST|PUT|DELETE) \S+ HTTP/[\d.]+" \d{3}')  # uvicorn's request lines say nothing of a crash


@dataclass
class Watched:
    proc: ServiceProcess
    state: str = "up"  # up, waiting (for its restart), starting, down (held or beyond the limit)
    crashes: int = 0
    restarts: int = 0
    generation: int = 0  # times it became ready again after a crash
    due: float = 0.0  # waiting: when to start it; starting: when to give up on it


class Supervisor:
    def __init__(
        self, procs: list[ServiceProcess], policy: RestartPolicy, *, report: Callable[[str], None],
        api_key: str | None = None, startup_timeout_s: float = 900.0,
    ) -> None:
        self.policy, self.report, self.api_key, self.startup_timeout_s = policy, report, api_key, startup_timeout_s
        self.watched = {p.name: Watched(p) for p in procs}
        self.failure: str | None = None
        self._held = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="opd-up-supervisor", daemon=True)

    # ------------------------------------------------------------ what opd up asks
    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def generation(self, name: str) -> int:
        return self.watched[name].generation

    def up(self, name: str) -> bool:
        return self.watched[name].state == "up"

    def restarts(self) -> dict[str, int]:
        return {name: w.restarts for name, w in self.watched.items()}

    def hold(self) -> None:
        """No more restarts from now on (a stop is under way)."""
        self._held.set()

    def close(self) -> None:
        self._held.set()
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(30)

    # ------------------------------------------------------------ the watch
    def _run(self) -> None:
        while not self._closed.wait(POLL_S):
            for watched in self.watched.values():
                if self._closed.is_set():
                    return
                with self._lock:
                    self._check(watched)

    def _check(self, w: Watched) -> None:
        now = time.monotonic()
        if w.state == "up" and not w.proc.alive():
            self._crashed(w, f"{w.proc.exit_description()} (pid {w.proc.proc.pid if w.proc.proc else '?'})")
        elif w.state == "waiting" and self._held.is_set():
            w.state = "down"
        elif w.state == "waiting" and now >= w.due:
            try:
                w.proc.start()
            except StartupFailed as exc:
                self._crashed(w, f"could not be started again: {exc}")
                return
            w.state, w.due = "starting", now + self.startup_timeout_s
        elif w.state == "starting":
            if not w.proc.alive():
                self._crashed(w, f"{w.proc.exit_description()} while starting again")
            elif w.proc.ready(self.api_key, timeout=2.0):
                w.state, w.generation = "up", w.generation + 1
                self.report(f"[green]{w.proc.name} is ready again[/green] (restart {w.restarts} of "
                            f"{self.policy.max_restarts})")
            elif now > w.due and not self._held.is_set():  # held: stop_all ends it
                w.proc.stop(grace=5)
                self._crashed(w, f"was not ready {self.startup_timeout_s:.0f}s after its restart")

    def _crashed(self, w: Watched, how: str) -> None:
        w.proc.stop(grace=0)  # the rest of its group goes too; its log is complete after this
        w.crashes += 1
        name = w.proc.name
        tail = "\n".join(f"    {line}" for line in log_lines(w.proc))
        where = f"last lines of {w.proc.log_file}:\n{tail}" if tail else "it wrote no log"
        if self._held.is_set():
            w.state = "down"
            self.report(f"[yellow]{name} {how}; not restarted, the stack is stopping[/yellow]")
            return
        limit = self.policy.max_restarts if self.policy.policy == "on-failure" else 0
        if w.restarts >= limit:
            w.state = "down"
            self.failure = (
                f"{name} {how} and keeps crashing: {w.crashes} crash(es), beyond the restart limit "
                f"(restart.policy={self.policy.policy}, restart.max_restarts={self.policy.max_restarts}); "
                f"stopping everything. See {w.proc.log_file}"
            )
            self.report(f"[red]{name} {how}[/red]; {where}")
            return
        w.restarts += 1
        delay = min(self.policy.backoff_s * 2 ** (w.restarts - 1), self.policy.max_backoff_s)
        w.state, w.due = "waiting", time.monotonic() + delay
        self.report(f"[yellow]{name} {how}[/yellow]; {where}\n"
                    f"restarting {name} in {delay:.1f}s (restart {w.restarts} of {limit})")


def log_lines(proc: ServiceProcess, count: int = 8) -> list[str]:
    """The last lines of a service's log, uvicorn's request lines left out unless there is nothing else."""
    lines = proc.log_tail(400)
    return ([x for x in lines if not ACCESS_LOG.search(x)] or lines)[-count:]


def stop_all(procs: list[ServiceProcess], grace: float, hurry: Callable[[], bool]) -> None:
    """SIGTERM to every process group at once; SIGKILL to what is left after `grace`, or as soon as `hurry()`."""
    for proc in procs:
        if proc.alive():
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in procs) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for proc in procs:
        proc.stop(grace=0)
