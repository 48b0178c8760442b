"""Kill a service's vLLM engine core and watch the service answer and exit (tests/{student,teacher}/test_engine_death.py).

Unlike `ServiceProcess.proc`, which a supervisor replaces when it starts the service again, the helpers follow the
process whose engine was killed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from opd.common.engine_watch import EXIT_CODE
from opd.common.process import ServiceProcess
from tests.utils.services import engine_core, outcome


def kill_engine_and_watch(proc: ServiceProcess, request: Callable[[], httpx.Response], within: float = 60.0):
    """SIGKILLs the service's vLLM engine core, then sends `request`, GET /health and GET /ready over and over until
    that service process exits (even if a supervisor starts another meanwhile). Returns (its exit code, every
    (status, body) it answered meanwhile); fails if it still runs after `within` seconds."""
    popen = proc.proc
    assert popen is not None
    core = engine_core(popen.pid)
    core.kill()
    core.wait(10)
    answers = []
    deadline = time.monotonic() + within
    while popen.poll() is None:
        assert time.monotonic() < deadline, f"the service still runs {within}s after its engine died: {answers[-4:]}"
        answers.append(outcome(request))
        for probe in ("/health", "/ready"):
            answers.append(outcome(lambda: httpx.get(proc.url + probe, timeout=10)))
        time.sleep(0.1)
    return popen.returncode, answers


def assert_exited_for_its_engine(proc: ServiceProcess, request: Callable[[], httpx.Response], service: str,
                                 result_key: str, within: float = 60.0) -> None:
    """Kills the engine core (kill_engine_and_watch): the service exits with engine_watch.EXIT_CODE, answering
    meanwhile 503 naming the cause or closing the connection, never a 500 nor a result (`result_key` in a body),
    and its log says why."""
    code, answers = kill_engine_and_watch(proc, request, within)
    assert code == EXIT_CODE, f"exit code {code}; answers: {answers}"
    assert all(status in (200, 503, "closed") for status, _ in answers), answers  # never a 500
    assert not any(status == 200 for status, body in answers if result_key in body), answers
    assert all("engine died" in body for status, body in answers if status == 503), answers
    deadline = time.monotonic() + 10  # the thread that copies its output to the log may lag behind its exit
    while True:
        log = proc.log_file.read_text() if proc.log_file and proc.log_file.exists() else ""
        if f"the {service}'s engine died" in log and "is exiting" in log:
            return
        assert time.monotonic() < deadline, f"its log does not say that the {service}'s engine died: {log[-2000:]}"
        time.sleep(0.1)
