"""VersionLock: rollouts share, a swap waits for them and goes before rollouts that arrive after it."""

from __future__ import annotations

import asyncio

import pytest

from opd.student.versions import VersionLock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_swap_waits_for_readers_and_goes_before_later_ones() -> None:
    lock, log = VersionLock(), []

    async def reader(name: str, hold: asyncio.Event) -> None:
        async with lock.read():
            log.append(f"{name} start")
            await hold.wait()
            log.append(f"{name} end")

    async def writer() -> None:
        async with lock.write():
            log.append("swap")

    release_a, release_b, release_c = asyncio.Event(), asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(reader("a", release_a))
    b = asyncio.create_task(reader("b", release_b))
    await settle()
    assert lock.readers == 2  # readers share
    w = asyncio.create_task(writer())
    await settle()
    c = asyncio.create_task(reader("c", release_c))
    await settle()
    assert lock.writers_waiting == 1 and "swap" not in log and "c start" not in log
    release_a.set()
    await settle()
    assert "swap" not in log  # b is still in flight
    release_b.set()
    release_c.set()
    await asyncio.gather(a, b, w, c)
    assert log.index("swap") > log.index("b end") and log.index("c start") > log.index("swap")


async def test_cancelled_swap_does_not_block_readers() -> None:
    lock = VersionLock()
    hold = asyncio.Event()

    async def reader() -> None:
        async with lock.read():
            await hold.wait()

    async def writer() -> None:
        async with lock.write():
            pass

    r = asyncio.create_task(reader())
    await settle()
    w = asyncio.create_task(writer())
    await settle()
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    async with asyncio.timeout(1):
        async with lock.read():  # not stuck behind the cancelled swap
            pass
    hold.set()
    await r
    assert lock.readers == 0 and lock.writers_waiting == 0 and not lock.writing


async def test_swaps_are_exclusive() -> None:
    lock, inside = VersionLock(), []

    async def writer(i: int) -> None:
        async with lock.write():
            inside.append(i)
            assert len(inside) == 1
            await asyncio.sleep(0.01)
            inside.pop()

    await asyncio.gather(*(writer(i) for i in range(4)))
