"""Ctrl-C and SIGTERM for `opd up`: the first asks for a clean stop, the next one stops at once.

    with Interrupts() as interrupts:
        interrupts.graceful = True           # a run is in progress: a first Ctrl-C only asks
        ... interrupts.stop_requested ...
        interrupts.cleaning = True           # from here on, signals only hurry the clean-up

Choices:
1) The handlers are installed explicitly, whatever `opd up` inherited: a
   process started in the background by a non-interactive shell starts with
   SIGINT ignored, and Ctrl-C must still work.
2) While a run is in progress (`graceful`), the first SIGINT or SIGTERM only
   sets `stop_requested`: the caller asks the trainer to stop at its next safe
   point, which checkpoints. Any other time, and for the second signal, the
   handler raises `KeyboardInterrupt` wherever the main thread is (preparing
   models, waiting for a service, an HTTP call): everything stops at once.
3) Once the clean-up has begun (`cleaning`, set by the handler itself when
   it raises, and by the caller otherwise), a signal never raises, so it
   cannot cut the clean-up short and leave a child running: it sets `hurry`,
   and the clean-up kills what is left without waiting.
4) The handler only sets plain flags that the main thread polls: it runs in
   the main thread between two bytecodes, where taking a lock the main thread
   may already hold (a threading.Event's) could deadlock.
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self) -> None:
        self.graceful = False
        self.cleaning = False
        self.count = 0
        self.last_signal: int | None = None
        self.stop_requested = False  # the first signal while `graceful`
        self.hurry = False  # stop without a grace period
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.last_signal or signal.SIGINT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last_signal = signum
        if self.cleaning:
            self.hurry = True
            return
        if self.graceful and not self.stop_requested:
            self.stop_requested = True
            return
        self.hurry = self.cleaning = True  # what follows is the clean-up: it must not be cut short
        raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
