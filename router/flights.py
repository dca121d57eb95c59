"""Coalescing of identical in-flight requests, unary and streaming alike.

The first caller for a key (the leader) starts the work as its own task; the
work yields events (text deltas, a restart, the final result) into the flight's
log. Every caller, the leader included, subscribes to that log: it replays the
events already produced, then waits for the next ones. So

* N identical unary requests make one model call (each takes the final event);
* N identical streams make one model call, and a stream that joins late still
  receives every delta from the first, in order;
* a unary request and a stream for the same question share one call too.

The task belongs to no caller: a subscriber that gives up (client cancelled,
deadline) stops reading, and the others keep receiving. The key leaves the map
as soon as the work finishes: this is coalescing, not a cache. The log lives
as long as its slowest subscriber and holds one answer's deltas: bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

E = TypeVar("E")


class _Flight(Generic[E]):
    def __init__(self) -> None:
        self.events: list[E] = []
        self.done = False
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        # A fresh Event per change: a waiter cancelled on the old one harms nobody.
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def push(self, event: E) -> None:
        self.events.append(event)
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        self.done = True
        self.error = error
        self._wake()


class Subscription(Generic[E]):
    """One caller's view of a flight: every event from the first, then the
    work's exception (if it failed)."""

    def __init__(self, flight: _Flight[E], leader: bool) -> None:
        self._flight = flight
        self.leader = leader  # this caller started the work

    async def __aiter__(self) -> AsyncIterator[E]:
        flight = self._flight
        seen = 0
        while True:
            while seen < len(flight.events):
                seen += 1
                yield flight.events[seen - 1]
            if flight.done:
                if flight.error is not None:
                    raise flight.error
                return
            await flight.changed.wait()


class Flights(Generic[E]):
    def __init__(self) -> None:
        self._flights: dict[str, _Flight[E]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str, work: Callable[[], AsyncIterator[E]]) -> Subscription[E]:
        """Subscribe to the flight for ``key``, starting ``work`` when none is in flight."""
        flight = self._flights.get(key)
        if flight is not None:
            return Subscription(flight, leader=False)
        flight = _Flight()
        self._flights[key] = flight
        flight.task = asyncio.ensure_future(self._produce(key, flight, work))
        return Subscription(flight, leader=True)

    async def _produce(
        self, key: str, flight: _Flight[E], work: Callable[[], AsyncIterator[E]]
    ) -> None:
        error: BaseException | None = None
        try:
            async for event in work():
                flight.push(event)
        except asyncio.CancelledError as exc:  # the router is shutting down
            error = exc
            raise
        except Exception as exc:  # noqa: BLE001 - every subscriber receives it
            error = exc
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.finish(error)

    async def close(self) -> None:
        """Cancel the work still in flight (router shutdown)."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def once(work: Callable[[], Awaitable[E]]) -> AsyncIterator[E]:
    """A unary work as a one-event flight: ``flights.join(key, lambda: once(work))``."""
    yield await work()
