"""One policy version per rollout request: a readers-writer lock for the event loop.

Rollout requests are readers and run together; a weight swap is the writer.
A swap waits until the rollouts in flight are done, and from the moment it
asks, new rollout requests wait behind it (writer preference): on-policy
training wants the newest weights as early as possible, and a stream of
rollouts must not starve the swap. So every rollout request sees exactly one
version from its first token to its last.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class VersionLock:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self.readers = 0
        self.writing = False
        self.writers_waiting = 0

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.writing and self.writers_waiting == 0)
            self.readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self.readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            self.writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self.writing and self.readers == 0)
            finally:
                self.writers_waiting -= 1
                # A cancelled writer must not leave readers waiting for it.
                self._cond.notify_all()
            self.writing = True
        try:
            yield
        finally:
            async with self._cond:
                self.writing = False
                self._cond.notify_all()
