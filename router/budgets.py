"""Per-tenant budgets: cloud tokens per minute and per day, requests per second.

Transport-agnostic API (``Budgets``), used by the pipeline for every front end:

    await budgets.admit(tenant)                      # requests/s; raises BudgetExceeded
    r = await budgets.reserve(tenant, prompt, new)   # before a cloud call; raises BudgetExceeded
    await budgets.settle(r, actual_tokens)           # after it (0 when the call failed)

The expected cost of a cloud call (estimated prompt tokens, plus the chat
template's overhead, plus max_new_tokens: ``Budgets.estimate``) is reserved in
every token window at once, atomically, BEFORE the call, and the real usage
replaces the reservation after it. So concurrent requests cannot overshoot a
budget together: each one's worst case is already counted when the next one
checks. The check-and-add is:

* in-process (``MemoryBudgetStore``): one critical section under a lock;
* with Redis (``RedisBudgetStore``): ONE Lua script (EVALSHA), which Redis runs
  atomically, so router replicas sharing the Redis share one budget.

Windows are calendar-aligned (this second, this minute, this UTC day) on the
router's clock: a budget resets at the start of each window. If a node
reports more prompt tokens than the reservation assumed (a tokenizer or chat
template that counts more than the estimate), the excess is still charged and
logged, so the accounting stays true; raise ``budgets.prompt_token_factor``.

When the budget store (Redis) cannot be reached, requests that need a budget
fail with UNAVAILABLE: budgets are enforced, never silently skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.guard_settings import BudgetLimits, BudgetSettings
from tidegate.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    name: str  # "second" | "minute" | "day"
    seconds: int
    unit: str  # "requests" | "cloud_tokens"
    setting: str  # the BudgetLimits field

    def limit(self, limits: BudgetLimits) -> int | None:
        value = getattr(limits, self.setting)
        return value if value is None else int(value)


SECOND = Window("second", 1, "requests", "requests_per_second")
MINUTE = Window("minute", 60, "cloud_tokens", "cloud_tokens_per_minute")
DAY = Window("day", 86_400, "cloud_tokens", "cloud_tokens_per_day")
TOKEN_WINDOWS = (MINUTE, DAY)
WINDOWS = (SECOND, MINUTE, DAY)


class BudgetExceeded(ResourceExhausted):
    """A tenant's budget cannot cover a request; names the tenant and the window."""

    def __init__(
        self, tenant: str, window: Window, limit: int, used: int, needed: int, resets_in_s: float
    ) -> None:
        self.tenant = tenant
        self.window = window
        self.limit = limit
        self.used = used
        self.needed = needed
        what = "request" if window.unit == "requests" else "cloud token"
        when = (
            f"more than the whole {window.name} allows: no wait will do (raise the budget "
            "or ask for fewer tokens)"
            if needed > limit
            else f"the window resets in {math.ceil(resets_in_s)} s"
        )
        super().__init__(
            f"tenant {tenant!r} is over its {window.setting} budget: {used} of {limit} "
            f"{what}s used this {window.name}, this request needs {needed}; {when}"
        )


@dataclass(frozen=True)
class Slot:
    """One window's counter as it was when reserved."""

    window: Window
    bucket: int  # now // window.seconds


@dataclass(frozen=True)
class Reservation:
    tenant: str
    tokens: int
    slots: tuple[Slot, ...]  # the counters charged; settle adjusts these same ones


@dataclass(frozen=True)
class BudgetUsage:
    """One tenant's standing in one window (Status and metrics read this)."""

    tenant: str
    window: str
    unit: str
    limit: int
    used: int
    resets_in_s: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Check:
    """What a store is asked: add ``cost`` to each window unless one would pass its limit."""

    slot: Slot
    limit: int


class BudgetStore(Protocol):
    async def take(self, tenant: str, cost: int, checks: tuple[Check, ...]) -> tuple[int, int]:
        """Atomically: if used + cost <= limit for every check, add cost to all and
        return (-1, 0); else add nothing and return (index of the first failing
        check, its used count)."""
        ...

    async def adjust(self, tenant: str, delta: int, slots: tuple[Slot, ...]) -> None:
        """Add ``delta`` (may be negative) to each slot that still exists."""
        ...

    async def used(self, tenant: str, slots: tuple[Slot, ...]) -> list[int]: ...

    async def close(self) -> None: ...


class MemoryBudgetStore:
    """In-process counters; one lock makes check-and-add atomic (also against
    threads, should a front end call from one)."""

    SWEEP_ABOVE = 10_000  # counters; past this, those of finished windows are dropped

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str, int], int] = {}

    @staticmethod
    def _key(tenant: str, slot: Slot) -> tuple[str, str, int]:
        return (tenant, slot.window.name, slot.bucket)

    async def take(self, tenant: str, cost: int, checks: tuple[Check, ...]) -> tuple[int, int]:
        with self._lock:
            for index, check in enumerate(checks):
                used = self._counters.get(self._key(tenant, check.slot), 0)
                if used + cost > check.limit:
                    return index, used
            for check in checks:
                key = self._key(tenant, check.slot)
                self._counters[key] = self._counters.get(key, 0) + cost
            if len(self._counters) > self.SWEEP_ABOVE:
                self._sweep()
        return -1, 0

    def _sweep(self) -> None:
        now = time.time()
        current = {w.name: int(now // w.seconds) for w in WINDOWS}
        for key in [k for k in self._counters if k[2] < current.get(k[1], 0)]:
            del self._counters[key]

    async def adjust(self, tenant: str, delta: int, slots: tuple[Slot, ...]) -> None:
        with self._lock:
            for slot in slots:
                key = self._key(tenant, slot)
                if key in self._counters:
                    self._counters[key] = max(0, self._counters[key] + delta)

    async def used(self, tenant: str, slots: tuple[Slot, ...]) -> list[int]:
        with self._lock:
            return [self._counters.get(self._key(tenant, s), 0) for s in slots]

    async def close(self) -> None:
        with self._lock:
            self._counters.clear()


# KEYS: the windows' counters, then (with a marker ttl > 0) this take's marker.
# ARGV[1]: cost; then per counter: limit, ttl; last: the marker's ttl, or 0 for none.
# Check every window first, then add to all: all-or-nothing, in one atomic script.
# The marker records what was taken, so that a take whose reply never came can be
# undone (_UNDO); one found already there is a take undone before it ran: a no-op.
_TAKE = """
local n = #KEYS
local marker_ttl = tonumber(ARGV[#ARGV])
local marker = nil
if marker_ttl > 0 then
  marker = KEYS[n]
  n = n - 1
  if redis.call('EXISTS', marker) == 1 then
    return {0, 0}
  end
end
local cost = tonumber(ARGV[1])
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + cost > tonumber(ARGV[2 * i]) then
    return {i, used}
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], cost)
  if redis.call('TTL', KEYS[i]) < 0 then
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1])
  end
end
if marker then
  redis.call('SET', marker, cost, 'EX', marker_ttl)
end
return {0, 0}
"""

# Undo a take whose reply never came: give back what its marker says it took (counters
# that still exist), and leave the marker as a tombstone so the take, if it has not
# run yet, never will. KEYS as _TAKE's; ARGV[1]: the marker's ttl.
_UNDO = """
local marker = KEYS[#KEYS]
local taken = redis.call('GET', marker)
redis.call('SET', marker, 'undone', 'EX', ARGV[1])
if taken and taken ~= 'undone' then
  for i = 1, #KEYS - 1 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('DECRBY', KEYS[i], taken)
    end
  end
end
return 0
"""
MARKER_TTL_S = 60  # past the last undo attempt, and any reply that late (the client waits 2 s)
UNDO_ATTEMPTS = (0.5, 2.0, 8.0)  # seconds before each try: the store may be slow a while

# Settle: adjust only counters that still exist (an expired window stays gone).
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[1])
  end
end
return 0
"""


class RedisBudgetStore:
    """Counters in Redis, shared by every router replica using the same prefix.

    Key: ``<prefix><tenant, URL-quoted>:<window>:<bucket>``, expiring a minute
    after its window ends (late settlements still find it).
    """

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self._redis = client
        self.key_prefix = key_prefix
        self._take = client.register_script(_TAKE)
        self._undo = client.register_script(_UNDO)
        self._adjust = client.register_script(_ADJUST)
        self._undoing: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, key_prefix: str) -> RedisBudgetStore:
        client = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, key_prefix)

    def key(self, tenant: str, slot: Slot) -> str:
        return f"{self.key_prefix}{quote(tenant, safe='')}:{slot.window.name}:{slot.bucket}"

    async def ping(self) -> None:
        await self._redis.ping()

    async def take(self, tenant: str, cost: int, checks: tuple[Check, ...]) -> tuple[int, int]:
        args: list[int] = [cost]
        for check in checks:
            args += [check.limit, check.slot.window.seconds + 60]
        keys = [self.key(tenant, c.slot) for c in checks]
        # A marker for what outlasts its second (tokens for a minute or a day): a
        # request count left behind is gone with its second anyway.
        marked = any(c.slot.window.seconds > 1 for c in checks)
        if marked:
            keys.append(f"{self.key_prefix}take:{uuid.uuid4().hex}")
        try:
            failed, used = await self._take(keys=keys, args=[*args, MARKER_TTL_S if marked else 0])
        except (RedisError, OSError):
            if not marked:
                raise
            # No reply (a timeout, a dropped connection): the script may have run, or
            # may yet. The caller refuses the request, so undo it in the background;
            # without this, a slow moment of the store charged tokens nothing used.
            task = asyncio.create_task(self._undo_later(keys))
            self._undoing.add(task)
            task.add_done_callback(self._undoing.discard)
            raise
        return int(failed) - 1, int(used)

    async def _undo_later(self, keys: list[str]) -> None:
        for wait in UNDO_ATTEMPTS:
            await asyncio.sleep(wait)
            try:
                await self._undo(keys=keys, args=[MARKER_TTL_S])
                return
            except (RedisError, OSError) as exc:
                last = exc
        log.warning(
            "could not undo a budget take whose reply never came (%s): its tokens stay "
            "counted until the window ends",
            last,
        )

    async def adjust(self, tenant: str, delta: int, slots: tuple[Slot, ...]) -> None:
        await self._adjust(keys=[self.key(tenant, s) for s in slots], args=[delta])

    async def used(self, tenant: str, slots: tuple[Slot, ...]) -> list[int]:
        values = await self._redis.mget([self.key(tenant, s) for s in slots])
        return [int(v) if v is not None else 0 for v in values]

    async def close(self) -> None:
        for task in list(self._undoing):
            task.cancel()
        await self._redis.aclose()


class Budgets:
    """The budget rules over a store. ``settings`` is replaced on a config reload
    (limits change at once; usage so far is kept)."""

    def __init__(
        self,
        settings: BudgetSettings,
        store: BudgetStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock

    def _checks(self, limits: BudgetLimits, windows: Iterable[Window]) -> tuple[Check, ...]:
        now = self._clock()
        return tuple(
            Check(Slot(w, int(now // w.seconds)), limit)
            for w in windows
            if (limit := w.limit(limits)) is not None
        )

    def _resets_in(self, window: Window) -> float:
        now = self._clock()
        return (int(now // window.seconds) + 1) * window.seconds - now

    async def _take(self, tenant: str, cost: int, checks: tuple[Check, ...]) -> None:
        try:
            failed, used = await self.store.take(tenant, cost, checks)
        except Exception as exc:  # noqa: BLE001 - fail closed: never an unenforced budget
            raise Unavailable(
                f"the budget store is unreachable ({exc}); requests with a budget are refused"
            ) from exc
        if failed >= 0:
            check = checks[failed]
            window = check.slot.window
            raise BudgetExceeded(tenant, window, check.limit, used, cost, self._resets_in(window))

    async def admit(self, tenant: str) -> None:
        """Count one request against requests_per_second (BudgetExceeded past it)."""
        checks = self._checks(self.settings.limits_for(tenant), (SECOND,))
        if checks:
            await self._take(tenant, 1, checks)

    def has_token_budget(self, tenant: str) -> bool:
        limits = self.settings.limits_for(tenant)
        return any(w.limit(limits) is not None for w in TOKEN_WINDOWS)

    def estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The tokens reserved for a cloud call (see ``budgets.prompt_token_factor``)."""
        settings = self.settings
        prompt = math.ceil(prompt_tokens * settings.prompt_token_factor)
        return prompt + settings.prompt_overhead_tokens + max_new_tokens

    async def reserve(
        self, tenant: str, prompt_tokens: int, max_new_tokens: int
    ) -> Reservation | None:
        """Reserve a cloud call's expected cost in every token window, or raise
        BudgetExceeded naming the first window that cannot cover it. None: the
        tenant has no token budget (nothing to settle)."""
        checks = self._checks(self.settings.limits_for(tenant), TOKEN_WINDOWS)
        if not checks:
            return None
        cost = self.estimate(prompt_tokens, max_new_tokens)
        await self._take(tenant, cost, checks)
        return Reservation(tenant, cost, tuple(c.slot for c in checks))

    async def settle(self, reservation: Reservation | None, actual_tokens: int) -> None:
        """Replace the reservation with the real usage (0: the call failed)."""
        if reservation is None:
            return
        delta = actual_tokens - reservation.tokens
        if delta > 0:
            log.warning(
                "tenant %r: a cloud call used %d tokens, %d more than reserved; "
                "raise budgets.prompt_token_factor so reservations cover it",
                reservation.tenant,
                actual_tokens,
                delta,
            )
        if delta:
            try:
                await self.store.adjust(reservation.tenant, delta, reservation.slots)
            except Exception as exc:  # noqa: BLE001 - the answer is served; log the drift
                log.error("budget settlement for %r failed: %s", reservation.tenant, exc)

    async def usage(self, tenants: Iterable[str]) -> list[BudgetUsage]:
        """Each named tenant's standing in each of its limited windows."""
        out: list[BudgetUsage] = []
        for tenant in dict.fromkeys(tenants):
            checks = self._checks(self.settings.limits_for(tenant), WINDOWS)
            if not checks:
                continue
            used = await self.store.used(tenant, tuple(c.slot for c in checks))
            for check, count in zip(checks, used, strict=True):
                window = check.slot.window
                out.append(
                    BudgetUsage(
                        tenant,
                        window.name,
                        window.unit,
                        check.limit,
                        count,
                        self._resets_in(window),
                    )
                )
        return out

    async def close(self) -> None:
        await self.store.close()


def budget_store_url(budgets: BudgetSettings, cache_url: str | None) -> str | None:
    """The Redis URL budgets use, or None for in-process (see ``budgets.url``)."""
    if budgets.url == "memory":
        return None
    return budgets.url or cache_url


def open_budgets(budgets: BudgetSettings, cache_url: str | None) -> Budgets:
    """Budgets over the configured store; connects lazily."""
    url = budget_store_url(budgets, cache_url)
    store: BudgetStore = (
        MemoryBudgetStore() if url is None else RedisBudgetStore.from_url(url, budgets.key_prefix)
    )
    return Budgets(budgets, store)
