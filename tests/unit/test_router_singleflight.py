"""router.singleflight: one run per key among concurrent callers."""

from __future__ import annotations

import asyncio

import pytest

from router.singleflight import Singleflight


async def test_concurrent_callers_share_one_run():
    flights: Singleflight[int] = Singleflight()
    runs = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    callers = [asyncio.ensure_future(flights.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    assert len(flights) == 1
    gate.set()
    results = await asyncio.gather(*callers)
    assert runs == 1
    assert [value for value, _ in results] == [42] * 5
    assert sum(leader for _, leader in results) == 1
    assert len(flights) == 0  # not a cache: the key is gone once done


async def test_different_keys_run_separately_and_later_calls_rerun():
    flights: Singleflight[str] = Singleflight()
    runs: list[str] = []

    async def work(key: str) -> str:
        runs.append(key)
        await asyncio.sleep(0.01)
        return key

    a, b = await asyncio.gather(
        flights.run("a", lambda: work("a")), flights.run("b", lambda: work("b"))
    )
    assert (a[0], b[0]) == ("a", "b")
    await flights.run("a", lambda: work("a"))
    assert runs == ["a", "b", "a"]


async def test_an_error_reaches_every_waiter():
    flights: Singleflight[int] = Singleflight()

    async def work() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    results = await asyncio.gather(
        flights.run("k", work), flights.run("k", work), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)
    assert len(flights) == 0


async def test_a_waiter_giving_up_does_not_cancel_the_others():
    flights: Singleflight[int] = Singleflight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    leader = asyncio.ensure_future(flights.run("k", work))
    follower = asyncio.ensure_future(flights.run("k", work))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.set()
    assert await follower == (7, False)
