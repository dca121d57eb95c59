"""router.flights: one run per key among concurrent callers, unary and streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.flights import Flights, once


async def drain(flight) -> list:  # type: ignore[no-untyped-def]
    return [event async for event in flight]


async def test_concurrent_callers_share_one_run():
    flights: Flights[int] = Flights()
    runs = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    joined = [flights.join("k", lambda: once(work)) for _ in range(5)]
    callers = [asyncio.ensure_future(drain(f)) for f in joined]
    await asyncio.sleep(0)
    assert len(flights) == 1
    gate.set()
    results = await asyncio.gather(*callers)
    assert runs == 1 and results == [[42]] * 5
    assert sum(f.leader for f in joined) == 1
    assert len(flights) == 0  # not a cache: the key is gone once done


async def test_a_late_subscriber_replays_every_event_in_order():
    flights: Flights[str] = Flights()
    step = asyncio.Event()

    async def work() -> AsyncIterator[str]:
        yield "a"
        yield "b"
        await step.wait()
        yield "c"

    first = flights.join("k", work)
    events = aiter(first)
    assert [await anext(events), await anext(events)] == ["a", "b"]
    late = flights.join("k", work)
    assert not late.leader
    step.set()
    assert await drain(late) == ["a", "b", "c"]
    assert [e async for e in events] == ["c"]


async def test_different_keys_run_separately_and_later_calls_rerun():
    flights: Flights[str] = Flights()
    runs: list[str] = []

    async def work(key: str) -> str:
        runs.append(key)
        await asyncio.sleep(0.01)
        return key

    a, b = await asyncio.gather(
        drain(flights.join("a", lambda: once(lambda: work("a")))),
        drain(flights.join("b", lambda: once(lambda: work("b")))),
    )
    assert (a, b) == (["a"], ["b"])
    await drain(flights.join("a", lambda: once(lambda: work("a"))))
    assert runs == ["a", "b", "a"]


async def test_an_error_reaches_every_subscriber_after_the_events_before_it():
    flights: Flights[str] = Flights()

    async def work() -> AsyncIterator[str]:
        yield "partial"
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    seen: list[list[str]] = []

    async def subscriber() -> None:
        got: list[str] = []
        try:
            async for event in flights.join("k", work):
                got.append(event)
        finally:
            seen.append(got)

    results = await asyncio.gather(subscriber(), subscriber(), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert seen == [["partial"], ["partial"]]
    assert len(flights) == 0


async def test_a_subscriber_giving_up_does_not_cancel_the_others():
    flights: Flights[int] = Flights()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    leader = asyncio.ensure_future(drain(flights.join("k", lambda: once(work))))
    follower = asyncio.ensure_future(drain(flights.join("k", lambda: once(work))))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.set()
    assert await follower == [7]


async def test_close_cancels_the_work_in_flight():
    flights: Flights[int] = Flights()
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        await asyncio.sleep(60)
        return 1

    waiter = asyncio.ensure_future(drain(flights.join("k", lambda: once(work))))
    await started.wait()
    await flights.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(flights) == 0
