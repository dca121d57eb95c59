"""Edge registry stores: lease rules on the in-process store and on the real Redis.

Both stores must agree on every rule (router.registry's docstring), so each
rule runs against both. Expiry uses a controllable clock for the in-process
store and Redis's own expiry (a short real TTL) for Redis.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from router.registry import EdgeRecord, LeaseConflict, MemoryRegistry, RedisRegistry
from tidegate.errors import ResourceExhausted

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _drop_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make_store(request):
    """A factory (ttl_s, max_edges) → a fresh store of the parametrized kind."""
    made = []
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"

    def make(ttl_s: float = 30.0, max_edges: int = 8):
        if request.param == "memory":
            store = MemoryRegistry(ttl_s, max_edges)
        else:
            store = RedisRegistry.from_url(REDIS_URL, prefix, ttl_s, max_edges)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    await _drop_prefix(prefix)


def record(name: str = "e1", address: str = "10.0.0.1:50052", instance: str = "i1", **kw):
    return EdgeRecord(name=name, address=address, instance_id=instance, **kw)


async def test_register_then_list_with_everything_it_said(make_store):
    store = make_store()
    await store.register(
        record(model="smol@abc/int8", capacity=3, estimator="seq_prob", context_length=2048)
    )
    [live] = await store.live()
    assert (live.name, live.address, live.instance_id) == ("e1", "10.0.0.1:50052", "i1")
    assert (live.model, live.capacity, live.estimator, live.context_length) == (
        "smol@abc/int8",
        3,
        "seq_prob",
        2048,
    )
    assert live.heartbeat_at > 0


async def test_heartbeat_updates_load_only_for_the_lease_holder(make_store):
    store = make_store()
    await store.register(record())
    assert await store.heartbeat("e1", "i1", in_flight=4, queued=2)
    [live] = await store.live()
    assert (live.in_flight, live.queued) == (4, 2)
    assert not await store.heartbeat("e1", "someone-else", 0, 0)
    assert not await store.heartbeat("unknown", "i1", 0, 0)
    [live] = await store.live()
    assert (live.in_flight, live.queued) == (4, 2)


async def test_same_name_other_address_is_a_conflict(make_store):
    store = make_store()
    await store.register(record())
    with pytest.raises(LeaseConflict, match="10.0.0.1:50052") as err:
        await store.register(record(address="10.0.0.2:50052", instance="i2"))
    assert err.value.code.name == "ALREADY_EXISTS"
    # the holder may move (its own instance), and a restart at the same address replaces it
    await store.register(record(address="10.0.0.3:50052"))
    await store.register(record(address="10.0.0.3:50052", instance="i3", capacity=2))
    [live] = await store.live()
    assert (live.address, live.instance_id, live.capacity) == ("10.0.0.3:50052", "i3", 2)
    assert not await store.heartbeat("e1", "i1", 0, 0)  # the old process lost the lease


async def test_deregister_only_by_the_holder(make_store):
    store = make_store()
    await store.register(record())
    await store.register(record(name="e2", address="10.0.0.2:1"))
    assert not await store.deregister("e1", "not-me")
    assert await store.deregister("e1", "i1")
    assert not await store.deregister("e1", "i1")
    assert [r.name for r in await store.live()] == ["e2"]


async def test_the_number_of_edges_is_bounded(make_store):
    store = make_store(max_edges=2)
    await store.register(record(name="a", address="h:1"))
    await store.register(record(name="b", address="h:2"))
    with pytest.raises(ResourceExhausted, match="registry.max_edges"):
        await store.register(record(name="c", address="h:3"))
    await store.register(record(name="a", address="h:1", instance="restart"))  # replacing is fine
    await store.deregister("b", "i1")
    await store.register(record(name="c", address="h:3"))
    assert [r.name for r in await store.live()] == ["a", "c"]


async def test_memory_leases_expire_after_the_ttl():
    clock = Clock()
    store = MemoryRegistry(ttl_s=10.0, max_edges=1, clock=clock)
    await store.register(record())
    clock.now += 9.0
    assert await store.heartbeat("e1", "i1", 1, 0)  # renewed: lives 10 s from now
    clock.now += 9.0
    assert [r.name for r in await store.live()] == ["e1"]
    clock.now += 1.5
    assert await store.live() == []
    assert not await store.heartbeat("e1", "i1", 0, 0)  # gone: the edge must register again
    await store.register(record(name="other", address="h:9"))  # its slot is free again


async def test_redis_leases_expire_and_leave_the_index():
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    store = RedisRegistry.from_url(REDIS_URL, prefix, ttl_s=0.3, max_edges=1)
    try:
        await store.register(record())
        await asyncio.sleep(0.2)
        assert await store.heartbeat("e1", "i1", 0, 0)
        await asyncio.sleep(0.2)
        assert [r.name for r in await store.live()] == ["e1"]  # renewed 0.2 s ago
        await asyncio.sleep(0.35)
        assert await store.live() == []
        client = aioredis.from_url(REDIS_URL, decode_responses=True)
        assert await client.smembers(f"{prefix}edges") == set()
        await client.aclose()
        # max_edges=1, but the expired lease no longer counts
        await store.register(record(name="e2", address="h:2"))
    finally:
        await store.close()
        await _drop_prefix(prefix)


async def test_an_edge_registered_again_while_another_replica_prunes_stays_listed():
    """Replica A reads e1's lease as expired; e1 registers again (through B) before A
    drops it from the index: A must not drop it, or e1 would never be listed again."""
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    store = RedisRegistry.from_url(REDIS_URL, prefix, ttl_s=30, max_edges=8)
    try:
        await store.register(record())  # e1, just (re-)registered
        assert await store.forget_expired(["e1"]) == 0  # A's stale verdict
        assert [r.name for r in await store.live()] == ["e1"]
        assert await store.heartbeat("e1", "i1", 0, 0)
        assert await store.deregister("e1", "i1")
        assert await store.forget_expired(["e1"]) == 0  # already gone from the index
    finally:
        await store.close()
        await _drop_prefix(prefix)


async def test_two_redis_stores_share_leases():
    """Router replicas: a lease written through one is seen and renewed through another."""
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    one = RedisRegistry.from_url(REDIS_URL, prefix, ttl_s=30, max_edges=8)
    two = RedisRegistry.from_url(REDIS_URL, prefix, ttl_s=30, max_edges=8)
    try:
        await one.register(record())
        assert [r.name for r in await two.live()] == ["e1"]
        assert await two.heartbeat("e1", "i1", 7, 0)
        assert [r.in_flight for r in await one.live()] == [7]
        with pytest.raises(LeaseConflict):
            await two.register(record(address="10.9.9.9:1", instance="i2"))
    finally:
        await one.close()
        await two.close()
        await _drop_prefix(prefix)


def test_record_fields_roundtrip_and_ignore_unknown_ones():
    original = record(model="m", capacity=2, in_flight=3, queued=1, heartbeat_at=12.5)
    raw = original.to_fields() | {"added_by_a_newer_router": "x"}
    assert EdgeRecord.from_fields(raw) == original


async def test_a_slow_snapshot_never_undoes_a_newer_one():
    """Two refreshes at once (the background loop's, a Register's): the one that read the
    registry before an edge registered must not apply its snapshot after the newer one."""
    from router.directory import EdgeDirectory
    from router.nodes import NodeClient

    class SlowFirstRead(MemoryRegistry):
        def __init__(self) -> None:
            super().__init__(30.0, 8)
            self.reads = 0

        async def live(self) -> list[EdgeRecord]:
            self.reads += 1
            snapshot = await super().live()
            if self.reads == 1:
                await asyncio.sleep(0.2)  # a slow read of the registry as it was
            return snapshot

    def client(r: EdgeRecord) -> NodeClient:
        return NodeClient(r.name, r.address, "edge", 5.0)  # registered once its record applies

    store = SlowFirstRead()
    nodes: list[NodeClient] = []
    directory = EdgeDirectory(nodes, store, client)
    background = asyncio.create_task(directory.refresh())  # reads the empty registry, slowly
    await asyncio.sleep(0.05)
    await store.register(record("e1"))
    await directory.refresh()  # the registration's own refresh
    await background
    assert [n.name for n in nodes] == ["e1"]
    await directory.close()
