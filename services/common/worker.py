"""Fair turns on an hf engine: one thread runs the engine's work, a turn at a time.

The hf engines cut every request into turns (the teacher: one micro-batch;
the student: a few decode steps of one micro-batch) and hand each turn to
`Worker.run`. Choices:
1) One thread, fed by a first-in first-out queue: the model runs one turn at a
   time, and a request asks for its next turn only when its last one is done,
   so it goes to the back of the queue. Requests in flight therefore take
   turns round robin: a short request waits at most one turn of each request
   ahead of it, however long those are.
2) A turn that is still queued when its request is cancelled (the client went
   away) never runs; a turn already running finishes, and nothing after it is
   asked for. So a cancelled request stops costing work within one turn.
3) The thread is the executor's, not the event loop's: apps on different event
   loops may share one engine (tests), and the loop stays free for I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Worker:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the worker thread, after every turn asked for before it."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def later(self, fn: Callable[..., object], *args: Any) -> None:
        """`fn(*args)` on the worker thread after every turn asked for before it, without waiting for it
        (clean-up that must not overlap a turn still running, even when its request was cancelled)."""
        self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
