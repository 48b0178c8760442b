"""ServiceProcess keeps hold of a child whatever signal lands while it is spawned."""

from __future__ import annotations

import signal
import subprocess

import pytest

from opd.common.process import ServiceProcess, free_port, signals_deferred

SLEEPER = ["-n", "1", "-r", "1", "import time; time.sleep(60)"]  # python -m timeit: a child that just waits


def test_ctrl_c_while_a_child_spawns_leaves_it_held_and_stoppable(monkeypatch) -> None:
    """Ctrl-C right after Popen forked: opd up's handler raises, and a child start() has not yet
    recorded would run on with nobody to stop it. The handler must run once the child is held."""
    real, spawned = subprocess.Popen, []

    def popen(*args, **kwargs):
        child = real(*args, **kwargs)
        spawned.append(child)
        signal.raise_signal(signal.SIGINT)  # inside Popen, after the fork: the real race's window
        return child

    monkeypatch.setattr(subprocess, "Popen", popen)
    proc = ServiceProcess("sleeper", SLEEPER, free_port(), module="timeit")
    # Python's own Ctrl-C handler, whatever this process inherited: started in the background by a
    # non-interactive shell, SIGINT comes ignored, and nothing would raise.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            proc.start()
        assert len(spawned) == 1 and proc.proc is spawned[0], "the child was spawned, then lost by start()"
        proc.stop(grace=0)
        assert spawned[0].poll() is not None
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)
        for child in spawned:
            child.kill()
            child.wait()


def test_signals_are_deferred_to_the_end_of_the_block_and_handled_once() -> None:
    heard: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            assert heard == []
        assert heard == [signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)  # the handler is back in place
        assert heard == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """A port from the ephemeral range can be taken by any outgoing connection before the server binds it."""
    import socket

    from opd.common.process import _ephemeral_start

    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(1024 <= port < _ephemeral_start() for port in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free


def test_free_ports_come_from_opd_free_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes that start services side by side (pytest-xdist workers) pick from disjoint ranges."""
    monkeypatch.setenv("OPD_FREE_PORTS", "21000-21050")
    ports = [free_port() for _ in range(10)]
    assert all(21000 <= port < 21050 for port in ports) and len(set(ports)) == 10, ports
    for bad, says in [("21000", "expected LOW-HIGH"), ("30-21000", "1024 <= LOW < HIGH"),
                      ("22000-21000", "1024 <= LOW < HIGH")]:
        monkeypatch.setenv("OPD_FREE_PORTS", bad)
        with pytest.raises(ValueError, match=says):
            free_port()
