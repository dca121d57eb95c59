"""Coalescing of identical in-flight requests: one model call, many waiters.

The first caller for a key starts the work as its own task; later callers with
the same key await that task. The task is shielded, so a waiter that gives up
(client cancelled, deadline) does not cancel the work the others wait for.
The key leaves the map as soon as the work finishes: this is coalescing of
concurrent requests, not a cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Singleflight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The work's result and whether this caller led (ran) it.

        An exception from the work reaches every waiter.
        """
        task = self._flights.get(key)
        leader = task is None
        if task is None:

            async def wrapped() -> T:
                return await work()

            task = asyncio.ensure_future(wrapped())
            self._flights[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task), leader

    def _forget(self, key: str, task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: no "never retrieved" warning when all waiters left
