"""A service whose engine died exits, so that whoever supervises it starts it again.

vLLM runs its engine core in a child process. When that process dies (killed
by the OOM killer or by hand) AsyncLLM is `errored` for good: every request
fails from then on. A service that stayed up would answer errors forever
while its /health said alive, and neither `opd up`'s supervisor nor docker
compose's healthcheck would restart it. vLLM's own server exits in that case;
so do the teacher and the student:

1) `EngineWatch.check` asks the engine (`alive()`: false only once it died;
   true while loading and after an orderly shutdown began). `watching()`, run
   in the app's lifespan, checks every POLL_S; a request whose answer is a
   server error checks at once, so the first request to hit the dead engine
   finds out.
2) From then on every route, /health and /ready included, answers 503 with a
   message naming the cause (never a 500), and one error line is logged.
3) The server is asked to stop (`on_death`, set by `server.serve`): uvicorn
   ends the requests in flight (on a dead engine they fail at once), the
   lifespan closes the engine, the exit handlers run, and the process ends
   with EXIT_CODE without the interpreter's teardown (`_exit_now`): that
   teardown, in a process that imported torch and vLLM, took 6 to 19 s on a
   busy 2-core machine, and no Python thread runs during it. Should the
   shutdown hang before, a timer ends the process with that code after
   HARD_EXIT_S. Without `serve` (an app in a test's own process) nothing
   exits: the app only answers 503.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from opd.common.errors import OPDError
from opd.common.server import error_response

log = logging.getLogger("opd")
POLL_S = 0.5
HARD_EXIT_S = 15.0
EXIT_CODE = 70  # sysexits' EX_SOFTWARE; uvicorn exits 3 when start-up fails


class EngineDied(OPDError):
    """The engine is dead for good; the service is exiting so that its supervisor restarts it (503)."""

    status_code = 503


class EngineWatch:
    def __init__(self, service: str, alive: Callable[[], bool]) -> None:
        self.service = service
        self.alive = alive
        self.cause: str | None = None  # set once the engine died
        self.on_death: Callable[[], None] | None = None

    def message(self, detail: str = "") -> str:
        why = f" ({detail})" if detail else ""
        return (f"the {self.service}'s engine died{why}: the {self.service} is exiting so that its supervisor "
                f"(opd up, docker compose) restarts it; retry once it is ready again")

    def check(self, detail: str = "") -> bool:
        """Whether the engine is dead; the first time it is found so, says why and asks the server to stop."""
        if self.cause is None and not self.alive():
            self.cause = self.message(detail)
            log.error("%s (exit code %d)", self.cause, EXIT_CODE)
            if self.on_death is not None:
                self.on_death()
        return self.cause is not None

    @asynccontextmanager
    async def watching(self):
        """Checks the engine every POLL_S while the block runs (the app's lifespan)."""

        async def poll() -> None:
            while not self.check():
                await asyncio.sleep(POLL_S)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            task.cancel()


def install_engine_watch(app: FastAPI, watch: EngineWatch) -> None:
    """Every route answers 503 naming the cause once the engine died (see the module's docstring)."""
    app.state.engine_watch = watch

    def dead(request: Request):
        return error_response(request, 503, watch.cause or "", {"Retry-After": "5"})

    @app.middleware("http")
    async def _engine_dead(request: Request, call_next):
        if watch.check():
            return dead(request)
        try:
            response = await call_next(request)
        except Exception as exc:  # nobody handled it: vLLM's EngineDeadError, say
            if watch.check(type(exc).__name__):
                return dead(request)
            raise
        if response.status_code >= 500 and watch.check() and response.status_code != 503:
            return dead(request)  # a 503 already names its cause (EngineDied while loading a checkpoint, say)
        return response


def exit_when_dead(app: FastAPI, stop: Callable[[], None]) -> EngineWatch | None:
    """Makes an engine's death call `stop` (the server's orderly exit) and end the process after HARD_EXIT_S."""
    watch: EngineWatch | None = getattr(app.state, "engine_watch", None)
    if watch is None:
        return None

    def on_death() -> None:
        stop()
        atexit.register(_exit_now)  # registered last, so the first to run at exit
        timer = threading.Timer(HARD_EXIT_S, os._exit, args=(EXIT_CODE,))
        timer.daemon = True
        timer.start()

    watch.on_death = on_death
    return watch


_exiting = False


def _exit_now() -> None:
    """At exit, once the engine died: runs the other exit handlers, then ends the process with EXIT_CODE without
    the interpreter's teardown (see the module's docstring)."""
    global _exiting
    if _exiting:  # _run_exitfuncs below calls it again
        return
    _exiting = True
    atexit._run_exitfuncs()  # logging's flush, multiprocessing's and the others, as at any exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_CODE)
