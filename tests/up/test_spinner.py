"""A Ctrl-C that lands while `opd up` starts a spinner (rich's status display) stops the spinner too.

`opd up`'s handler raises KeyboardInterrupt wherever the main thread is (services/up/interrupts.py). Landing
inside rich's `Live.start` (after it took the console's live display and hid the cursor, before its refresh
thread ran) it left a spinner half started that nothing stopped: the console kept a live display, the
refresh thread went on drawing, the terminal's cursor stayed hidden. The signal here is raised at exactly
that point of rich's start.
"""

from __future__ import annotations

import io
import signal
import threading

import pytest
from rich.console import Console
from rich.live import _RefreshThread

from opd.up.interrupts import Interrupts
from opd.up.runner import status


def refresh_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, _RefreshThread) and t.is_alive()]


def test_ctrl_c_inside_the_spinners_start_stops_the_spinner(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = _RefreshThread.start

    def signal_then_start(self: _RefreshThread) -> None:
        signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, inside rich's Live.start
        real_start(self)

    monkeypatch.setattr(_RefreshThread, "start", signal_then_start)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    before = refresh_threads()
    entered = False
    with Interrupts(), pytest.raises(KeyboardInterrupt):
        with status(console, "loading the teacher and the student"):
            entered = True
    assert not entered, "the interrupt stops the work the spinner shows"
    assert console._live_stack == [], "the console's live display was given back"
    for thread in refresh_threads():
        if thread not in before:
            thread.join(timeout=5)
    assert [t for t in refresh_threads() if t not in before] == [], "no refresh thread left drawing"
    shown = out.getvalue()
    assert shown.rfind("\x1b[?25h") > shown.rfind("\x1b[?25l") >= 0, "the cursor is shown again"
