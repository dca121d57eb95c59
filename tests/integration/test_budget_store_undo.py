"""The Redis budget store when a reservation's reply never comes (a store slower
than the client's timeout for a moment): the script ran, the request was refused,
and the tokens it took are given back, not left charged until the window ends."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout

from router import budgets
from router.budgets import DAY, Check, RedisBudgetStore, Slot
from tests.support.redis_proxy import SlowReplies
from tests.support.stack import REDIS_URL


@pytest.fixture
async def direct():
    client = aioredis.from_url(REDIS_URL)
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    yield client, prefix
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_take_whose_reply_never_came_is_given_back(direct, monkeypatch):
    client, prefix = direct
    monkeypatch.setattr(budgets, "UNDO_ATTEMPTS", (0.2, 0.5, 1.0))
    async with SlowReplies() as proxy:
        slow = aioredis.from_url(proxy.url, socket_timeout=0.2)
        store = RedisBudgetStore(slow, prefix)
        slot = Slot(DAY, int(time.time() // DAY.seconds))
        counter = store.key("acme", slot)
        await store.take("warm-up", 1, (Check(slot, 1000),))  # the script is loaded
        proxy.delay_s = 0.6  # the reply comes after the client gave up
        with pytest.raises(RedisTimeout):
            await store.take("acme", 87, (Check(slot, 1000),))
        assert int(await client.get(counter) or 0) == 87  # the script ran all the same
        proxy.delay_s = 0.0  # the store recovers
        for _ in range(50):
            if int(await client.get(counter) or 0) == 0:
                break
            await asyncio.sleep(0.1)
        assert int(await client.get(counter) or 0) == 0  # given back
        await store.close()


async def test_a_take_undone_before_it_ran_never_runs(direct):
    client, prefix = direct
    store = RedisBudgetStore(aioredis.from_url(REDIS_URL), prefix)
    slot = Slot(DAY, int(time.time() // DAY.seconds))
    keys = [store.key("acme", slot), f"{prefix}take:{uuid.uuid4().hex}"]
    await store._undo(keys=keys, args=[60])  # the undo overtook the delayed take
    await store._take(keys=keys, args=[87, 1000, DAY.seconds + 60, 60])
    assert await client.get(keys[0]) is None  # nothing taken
    # an ordinary take still counts
    assert await store.take("acme", 87, (Check(slot, 1000),)) == (-1, 0)
    assert int(await client.get(keys[0])) == 87
    await store.close()
