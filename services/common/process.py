"""Runs opd services as child processes: start, wait for /ready, stop.

Used by `opd up`, the demos and the tests. Each child runs in its own process
group (vLLM starts workers of its own), its output is prefixed with the
service name and kept in a log file, and `stop()` ends the whole group:
SIGTERM, then SIGKILL after a grace period. Ports are checked before start.
A stopped (or crashed) child can be started again with the same arguments;
`exit_description()` and `log_tail()` say how it ended.

Ctrl-C and SIGTERM wait while a child is spawned (`signals_deferred`): a
handler that raises (opd up's) would otherwise cut `Popen` short after the
fork, and the child would run on with nobody holding its pid to stop it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from opd.common.errors import OPDError


DEFERRED = (signal.SIGINT, signal.SIGTERM)


class StartupFailed(OPDError):
    status_code = 500


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_GIVEN: set[int] = set()
_RANDOM = random.SystemRandom()  # unmoved by a test's random.seed


def _ephemeral_start() -> int:
    """The lowest port the kernel hands out as the local end of outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port_range() -> tuple[int, int]:
    """[low, top) that free_port picks from: OPD_FREE_PORTS ("20000-26000"), else the 12,000 ports below the
    ephemeral range. Processes that pick ports side by side (pytest-xdist workers) get disjoint ranges."""
    given = os.environ.get("OPD_FREE_PORTS", "")
    if given:
        try:
            low, top = (int(x) for x in given.split("-"))
        except ValueError:
            raise ValueError(f"OPD_FREE_PORTS={given!r}: expected LOW-HIGH, for example 20000-26000") from None
        if not 1024 <= low < top <= 65536:
            raise ValueError(f"OPD_FREE_PORTS={given!r}: expected 1024 <= LOW < HIGH <= 65536")
        return low, top
    top = min(_ephemeral_start(), 65536)
    return max(1024, top - 12000), top


def free_port() -> int:
    """A port free now, for a server started soon after, below the ephemeral range: a port the kernel picked
    (bind to 0) could be taken meanwhile as the local end of any outgoing connection, and the server then
    fails with "address already in use". Never the same port twice in one process."""
    low, top = _free_port_range()
    for _ in range(200 if top - low >= 10 else 0):
        port = _RANDOM.randrange(low, top)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # the range is full: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block reach their handlers when it ends (main thread only).

    Once the block ends, a deferring handler forwards at once: a signal arriving while the handlers are
    swapped back still reaches its own handler, and none is left swapped."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread: nothing interrupts this one
        return
    previous = {sig: signal.getsignal(sig) for sig in DEFERRED}
    caught: list[int] = []
    done = False

    def defer(signum: int, frame: FrameType | None) -> None:
        if done:
            deliver(previous[signum], signum, frame)
        else:
            caught.append(signum)

    try:
        for sig in DEFERRED:
            signal.signal(sig, defer)
        yield
    finally:
        done = True
        for sig in DEFERRED:
            signal.signal(sig, previous[sig])  # type: ignore[arg-type]
        for sig in caught:
            deliver(previous[sig], sig, None)


def deliver(handler: object, signum: int, frame: FrameType | None) -> None:
    """Runs a Python handler, or lets the default action happen; an ignored signal stays ignored."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.raise_signal(signum)


class ServiceProcess:
    """One `python -m opd ARGS...` child with a prefixed, logged output.

    `module` runs another server instead (a stock vLLM server in tests), ready
    when `ready_path` answers 200.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        *,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        echo: IO[str] | None = None,
        module: str = "opd",
        ready_path: str = "/ready",
    ) -> None:
        self.name, self.args, self.host, self.port = name, args, host, port
        self.module, self.ready_path = module, ready_path
        self.log_file, self.echo = log_file, echo
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        if not port_free(self.host, self.port):
            raise StartupFailed(f"{self.name}: port {self.port} on {self.host} is taken: stop what uses it or pick another port")
        cmd = [sys.executable, "-m", self.module, *self.args]
        with signals_deferred():  # once Popen has forked, self.proc must hold the child
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                env=self.env, start_new_session=True,
            )
            self._pump = threading.Thread(target=self._copy_output, daemon=True)
            self._pump.start()
        return self

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = open(self.log_file, "a") if self.log_file else None  # noqa: SIM115
        try:
            for line in self.proc.stdout:
                if sink:
                    sink.write(line)
                    sink.flush()
                if self.echo:
                    self.echo.write(f"[{self.name}] {line}")
        finally:
            if sink:
                sink.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, api_key: str | None = None, timeout: float = 5.0, http: httpx.Client | None = None) -> bool:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            if http is None:
                return httpx.get(self.url + self.ready_path, headers=headers, timeout=timeout).status_code == 200
            return http.get(self.url + self.ready_path, headers=headers, timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 600.0, api_key: str | None = None, interval: float = 0.2) -> None:
        """Polls /ready every `interval` seconds over one connection pool (a client per poll costs an SSL
        context, tens of ms of CPU) until it answers 200; fails at once when the process exits."""
        deadline = time.monotonic() + timeout
        with httpx.Client() as http:
            while time.monotonic() < deadline:
                if not self.alive():
                    where = f"; see {self.log_file}" if self.log_file else ""
                    raise StartupFailed(f"{self.name} {self.exit_description()} before it was ready{where}")
                if self.ready(api_key, http=http):
                    return
                time.sleep(interval)
        raise StartupFailed(f"{self.name} was not ready after {timeout:.0f}s")

    def exit_description(self) -> str:
        """'exited with code 1' or 'was killed by SIGKILL' (or 'is running')."""
        code = self.proc.poll() if self.proc else None
        if code is None:
            return "is running" if self.proc else "was never started"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = 8) -> list[str]:
        """The last non-empty lines of its log file (once it has stopped, everything it wrote)."""
        if not self.log_file or not self.log_file.is_file():
            return []
        with self.log_file.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            text = fh.read().decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def send_signal(self, sig: int) -> None:
        """Sends `sig` to the child's whole process group, if any of it is left."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.send_signal(signal.SIGKILL)  # whatever the group still holds (vLLM workers) goes too
        self.proc.wait()
        if self._pump:
            self._pump.join(timeout=5)
