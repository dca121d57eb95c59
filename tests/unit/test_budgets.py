"""router.budgets over both stores: in-process, and the real Redis (unique prefixes)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from router.budgets import (
    BudgetExceeded,
    Budgets,
    MemoryBudgetStore,
    RedisBudgetStore,
    budget_store_url,
    open_budgets,
)
from router.guard_settings import BudgetSettings
from tidegate.errors import Unavailable

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:  # 22:13:20 UTC
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(**default: int) -> BudgetSettings:
    return BudgetSettings.model_validate({"default": default, "prompt_overhead_tokens": 0})


@pytest.fixture(params=["memory", "redis"])
async def store_factory(request):
    """Builds stores over one shared counter space (two 'replicas' for Redis)."""
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    made = []

    def make():
        store = MemoryBudgetStore() if request.param == "memory" else None
        if store is None:
            store = RedisBudgetStore.from_url(REDIS_URL, prefix)
        made.append(store)
        return store

    shared = {"memory": None}

    def factory():
        if request.param == "memory":  # replicas of an in-process store share the object
            shared["memory"] = shared["memory"] or make()
            return shared["memory"]
        return make()

    yield factory
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    for store in {id(s): s for s in made}.values():
        await store.close()


async def test_reserve_until_the_minute_budget_is_spent(store_factory):
    clock = Clock()
    budgets = Budgets(settings(cloud_tokens_per_minute=100), store_factory(), clock)
    first = await budgets.reserve("acme", 30, 10)  # 40
    second = await budgets.reserve("acme", 30, 10)  # 80
    assert first is not None and first.tokens == 40 and second is not None
    with pytest.raises(BudgetExceeded) as info:
        await budgets.reserve("acme", 30, 10)  # 120 > 100
    exc = info.value
    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(exc) == (
        "tenant 'acme' is over its cloud_tokens_per_minute budget: 80 of 100 cloud tokens "
        "used this minute, this request needs 40; the window resets in 40 s"
    )
    assert await budgets.reserve("other", 30, 10) is not None  # per tenant
    clock.now += 40  # the next minute
    assert await budgets.reserve("acme", 30, 10) is not None


async def test_settle_replaces_the_reservation_with_real_usage(store_factory, caplog):
    budgets = Budgets(settings(cloud_tokens_per_minute=100), store_factory(), Clock())
    r = await budgets.reserve("acme", 50, 40)  # 90
    await budgets.settle(r, 25)  # really 25: 75 back
    [usage] = await budgets.usage(["acme"])
    assert (usage.window, usage.unit, usage.limit, usage.used) == (
        "minute",
        "cloud_tokens",
        100,
        25,
    )
    assert usage.remaining == 75
    failed = await budgets.reserve("acme", 10, 10)
    await budgets.settle(failed, 0)  # the call failed: all back
    assert (await budgets.usage(["acme"]))[0].used == 25
    over = await budgets.reserve("acme", 10, 10)  # 20 reserved, 45 used
    with caplog.at_level(logging.WARNING, logger="router.budgets"):
        await budgets.settle(over, 60)  # 40 more than reserved: still charged
    assert (await budgets.usage(["acme"]))[0].used == 85
    assert "40 more than reserved" in caplog.text


async def test_all_windows_or_none(store_factory):
    clock = Clock()
    budgets = Budgets(
        settings(cloud_tokens_per_minute=100, cloud_tokens_per_day=150), store_factory(), clock
    )
    await budgets.reserve("acme", 60, 30)  # 90 in both
    clock.now += 60
    with pytest.raises(BudgetExceeded) as info:
        await budgets.reserve("acme", 60, 30)  # the minute has room, the day does not
    assert info.value.window.name == "day" and "cloud_tokens_per_day" in str(info.value)
    usage = {u.window: u.used for u in await budgets.usage(["acme"])}
    assert usage == {"minute": 0, "day": 90}  # nothing was added to the minute


async def test_requests_per_second(store_factory):
    clock = Clock()
    budgets = Budgets(settings(requests_per_second=3), store_factory(), clock)
    for _ in range(3):
        await budgets.admit("acme")
    with pytest.raises(BudgetExceeded, match="requests_per_second budget: 3 of 3 requests"):
        await budgets.admit("acme")
    clock.now += 1
    await budgets.admit("acme")


async def test_concurrent_reservations_never_overshoot(store_factory):
    """Two budget front ends over one store (two router replicas on one Redis),
    200 concurrent reservations of 7 tokens against 100: exactly 14 fit."""
    one = Budgets(settings(cloud_tokens_per_minute=100), store_factory(), Clock())
    two = Budgets(settings(cloud_tokens_per_minute=100), store_factory(), Clock())

    async def attempt(budgets: Budgets) -> bool:
        try:
            await budgets.reserve("acme", 4, 3)
        except BudgetExceeded:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(b) for _ in range(100) for b in (one, two)))
    assert sum(outcomes) == 14
    assert (await one.usage(["acme"]))[0].used == 98


async def test_unlimited_tenants_touch_no_store():
    class Exploding(MemoryBudgetStore):
        async def take(self, *args, **kwargs):
            raise AssertionError("an unlimited tenant must not reach the store")

    budgets = Budgets(
        BudgetSettings.model_validate(
            {"tenants": [{"tenant": "capped", "cloud_tokens_per_minute": 5}]}
        ),
        Exploding(),
    )
    await budgets.admit("free")
    assert await budgets.reserve("free", 1000, 1000) is None
    assert await budgets.usage(["free"]) == []


async def test_unreachable_redis_fails_closed():
    budgets = Budgets(
        settings(cloud_tokens_per_minute=100),
        RedisBudgetStore.from_url("redis://127.0.0.1:1/0", "x:"),
    )
    with pytest.raises(Unavailable, match="budget store is unreachable"):
        await budgets.reserve("acme", 1, 1)
    await budgets.close()


def test_the_store_follows_the_cache_unless_told_otherwise():
    assert budget_store_url(BudgetSettings(), None) is None
    assert budget_store_url(BudgetSettings(), REDIS_URL) == REDIS_URL
    assert budget_store_url(BudgetSettings(url="memory"), REDIS_URL) is None
    other = "redis://10.0.0.1:6379/1"
    assert budget_store_url(BudgetSettings(url=other), None) == other
    assert isinstance(open_budgets(BudgetSettings(), None).store, MemoryBudgetStore)


def test_budget_settings_validation():
    with pytest.raises(ValueError, match="budgets.url must be 'memory'"):
        BudgetSettings(url="http://x")
    with pytest.raises(ValueError, match="one entry per tenant; repeated: a"):
        BudgetSettings.model_validate({"tenants": [{"tenant": "a"}, {"tenant": "a"}]})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        BudgetSettings.model_validate({"default": {"cloud_tokens_per_minute": 0}})


def test_a_429_says_whether_waiting_can_help():
    from router.budgets import DAY, MINUTE
    from router.openai_errors import http_error

    soon = http_error(BudgetExceeded("acme", MINUTE, 100, 80, 40, 12.0))
    assert soon.status == 429 and "x-should-retry" not in soon.headers
    assert 1 <= int(soon.headers["retry-after"]) <= 60
    never = BudgetExceeded("acme", MINUTE, 100, 0, 120, 12.0)  # more than the whole minute
    assert http_error(never).headers["x-should-retry"] == "false"
    assert "no wait will do" in str(never) and "resets in" not in str(never)
    assert (
        http_error(BudgetExceeded("acme", DAY, 10**6, 10**6, 5, 99.0)).headers["x-should-retry"]
        == "false"
    )
