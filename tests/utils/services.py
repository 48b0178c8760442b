"""Start opd services as real child processes for a test, and always stop them; watch what they do."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from opd.common.process import ServiceProcess, free_port


@contextmanager
def running(
    name: str, args: list[str], *, log_dir: Path, env: dict[str, str] | None = None,
    api_key: str | None = None, timeout: float = 300.0,
) -> Iterator[ServiceProcess]:
    port = free_port()
    full_env = dict(env or {})
    if api_key:
        full_env["OPD_API_KEY"] = api_key
    proc = ServiceProcess(name, [*args, "--port", str(port)], port, log_file=log_dir / f"{name}-{port}.log", env=full_env)
    proc.start()
    try:
        proc.wait_ready(timeout=timeout, api_key=api_key)
        yield proc
    except Exception:
        if proc.log_file and proc.log_file.exists():
            sys.stderr.write(proc.log_file.read_text()[-4000:])
        raise
    finally:
        proc.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hang_up(url: str, body: dict, after: float) -> None:
    """POST `body` and close the connection after `after` seconds without an answer (it must still be working)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(after, connect=10))


def wait_for_metric(url: str, line: str, timeout: float = 20.0, api_key: str | None = None) -> str:
    """The /metrics text once it holds `line`; fails after `timeout` seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", headers=headers).text
        if line in text:
            return text
        assert time.monotonic() < deadline, f"no {line!r} in /metrics after {timeout}s"
        time.sleep(0.2)


def assert_becomes_idle(pid: int, within: float = 4.0, seconds: float = 2.0, most: float = 0.5) -> None:
    """Within `within` seconds, the process starts a window of `seconds` in which it uses at most `most` CPU seconds:
    the work it was doing ended, and none goes on. Polls windows of `seconds` until one is idle or time is up."""
    deadline = time.monotonic() + within
    while True:
        before = cpu_seconds(pid)
        time.sleep(seconds)
        used = cpu_seconds(pid) - before
        if used <= most:
            return
        assert time.monotonic() < deadline, (
            f"the service still used {used:.2f} CPU seconds in {seconds}s, {within}s after its work should have ended")


def engine_core(pid: int):
    """The vLLM engine-core process among a service's descendants (a psutil.Process)."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no vLLM engine-core process under pid {pid}")


def outcome(send: Callable[[], httpx.Response]) -> tuple[int | str, str]:
    """(status code, body) of a request, or ("closed", why) when the service went away before answering."""
    try:
        r = send()
    except httpx.TransportError as exc:
        return "closed", type(exc).__name__
    return r.status_code, r.text
