"""router.cache: the in-process LRU/TTL cache and the Redis cache (real Redis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from router.cache import CacheEntry, EmbeddedCache, RedisCache, ResponseCache, open_cache
from router.cache_key import cache_key
from router.domain import Tier
from router.settings import CacheSettings
from tidegate.chat import ChatMessage, FinishReason, SamplingParams

REDIS_URL = "redis://127.0.0.1:6379/0"


def entry(text: str = "Paris", tier: Tier = Tier.EDGE, confidence: float = 0.9) -> CacheEntry:
    return CacheEntry(
        text=text,
        source_tier=tier,
        model="tiny@test",
        confidence=confidence,
        estimator="seq_prob" if tier is Tier.EDGE else "",
        finish_reason=FinishReason.STOP,
        prompt_tokens=12,
        completion_tokens=3,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- entries -------------------------------------------------------------------


def test_entry_json_roundtrip_keeps_every_field():
    for e in (entry(), entry("東京 🙂", Tier.CLOUD, 1.0)):
        assert CacheEntry.from_json(e.to_json()) == e


def test_open_cache_follows_settings():
    assert open_cache(CacheSettings(enabled=False)) is None
    assert isinstance(open_cache(CacheSettings()), EmbeddedCache)
    assert isinstance(open_cache(CacheSettings(url=REDIS_URL)), RedisCache)


# -- embedded ------------------------------------------------------------------


async def test_embedded_roundtrip_and_counts():
    cache = EmbeddedCache(max_entries=10)
    assert isinstance(cache, ResponseCache)
    assert await cache.get("k") is None
    await cache.put("k", entry(), ttl_s=60)
    assert await cache.get("k") == entry()
    stats = await cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)


async def test_embedded_entries_expire_after_ttl():
    clock = FakeClock()
    cache = EmbeddedCache(max_entries=10, clock=clock)
    await cache.put("short", entry("a"), ttl_s=5)
    await cache.put("long", entry("b"), ttl_s=50)
    clock.now += 4.9
    assert await cache.get("short") is not None
    clock.now += 0.2
    assert await cache.get("short") is None
    assert (await cache.stats()).entries == 1
    assert await cache.get("long") is not None


async def test_embedded_evicts_least_recently_used():
    cache = EmbeddedCache(max_entries=2)
    await cache.put("a", entry("a"), ttl_s=60)
    await cache.put("b", entry("b"), ttl_s=60)
    assert await cache.get("a") is not None  # a is now more recent than b
    await cache.put("c", entry("c"), ttl_s=60)
    assert await cache.get("b") is None
    assert await cache.get("a") is not None and await cache.get("c") is not None
    assert (await cache.stats()).entries == 2


async def test_embedded_put_replaces_and_never_exceeds_max():
    cache = EmbeddedCache(max_entries=3)
    for i in range(50):
        await cache.put(f"k{i % 5}", entry(str(i)), ttl_s=60)
        assert (await cache.stats()).entries <= 3
    assert (await cache.get("k4")).text == "49"


def test_embedded_rejects_zero_size():
    with pytest.raises(ValueError):
        EmbeddedCache(max_entries=0)


# -- Redis (the real one at 127.0.0.1:6379) -------------------------------------


@pytest.fixture
async def redis_prefix():
    """A unique key prefix per test; every key under it is deleted afterwards."""
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cache(redis_prefix):
    cache = RedisCache.from_url(REDIS_URL, redis_prefix)
    try:
        await cache.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield cache
    await cache.close()


async def test_redis_roundtrip_uses_prefix_and_counts(redis_cache, redis_prefix):
    assert await redis_cache.get("k") is None
    await redis_cache.put("k", entry("東京"), ttl_s=60)
    assert await redis_cache.get("k") == entry("東京")
    stats = await redis_cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)
    client = aioredis.from_url(REDIS_URL)
    try:
        assert await client.exists(redis_prefix + "k") == 1
        assert 0 < await client.ttl(redis_prefix + "k") <= 60
    finally:
        await client.aclose()


async def test_redis_entries_expire(redis_cache):
    await redis_cache.put("k", entry(), ttl_s=1)
    assert await redis_cache.get("k") is not None
    await asyncio.sleep(1.2)
    assert await redis_cache.get("k") is None
    assert (await redis_cache.stats()).entries == 0


async def test_redis_tenants_do_not_see_each_other(redis_cache):
    messages = (ChatMessage("user", "What is my account number?"),)
    sampling = SamplingParams(max_new_tokens=32)
    key_a = cache_key("tenant-a", messages, sampling)
    key_b = cache_key("tenant-b", messages, sampling)
    await redis_cache.put(key_a, entry("A's secret"), ttl_s=60)
    assert await redis_cache.get(key_b) is None
    assert (await redis_cache.get(key_a)).text == "A's secret"


async def test_redis_prefixes_isolate_deployments(redis_cache, redis_prefix):
    other = RedisCache.from_url(REDIS_URL, redis_prefix + "other:")
    try:
        await redis_cache.put("k", entry(), ttl_s=60)
        assert await other.get("k") is None
        assert (await other.stats()).entries == 0
    finally:
        await other.close()


async def test_redis_entry_count_treats_the_prefix_literally(redis_prefix):
    glob_like = RedisCache.from_url(REDIS_URL, redis_prefix + "[x]*:")
    lookalike = RedisCache.from_url(REDIS_URL, redis_prefix + "x-:")
    try:
        await lookalike.put("k", entry(), ttl_s=60)  # "[x]*" as a glob would match "x-"
        assert (await glob_like.stats()).entries == 0
        await glob_like.put("k", entry(), ttl_s=60)
        assert (await glob_like.stats()).entries == 1
    finally:
        await glob_like.close()
        await lookalike.close()
