"""Response caches behind one interface: in-process (default) and Redis.

The key comes from ``router.cache_key``; what may be stored and served is
decided in ``router.policy`` (admission and serving rules). A cache only
stores and expires entries. An entry records which tier and model produced it,
so a cached edge answer can be judged against a later request's threshold.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis

from router.domain import Tier
from router.settings import CacheSettings
from tidegate.chat import FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    """One cached answer and where it came from."""

    text: str
    source_tier: Tier  # EDGE or CLOUD
    model: str
    confidence: float  # the edge confidence; 1.0 for cloud answers
    estimator: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> str:
        data = asdict(self)
        data["source_tier"] = self.source_tier.label
        data["finish_reason"] = self.finish_reason.name
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> CacheEntry:
        data = json.loads(raw)
        data["source_tier"] = Tier[data["source_tier"].upper()]
        data["finish_reason"] = FinishReason[data["finish_reason"]]
        return cls(**data)


@dataclass(frozen=True)
class CacheStats:
    entries: int
    hits: int  # get() found an entry
    misses: int  # get() found nothing


@runtime_checkable
class ResponseCache(Protocol):
    async def get(self, key: str) -> CacheEntry | None: ...

    async def put(self, key: str, entry: CacheEntry, ttl_s: int) -> None: ...

    async def stats(self) -> CacheStats: ...

    async def close(self) -> None: ...


class EmbeddedCache:
    """In-process LRU with a TTL per entry and a hard entry count.

    Bounded on purpose: an unbounded cache is memory that grows until the pod
    dies. Expired entries are dropped when read and when evicting.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CacheEntry]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    async def get(self, key: str) -> CacheEntry | None:
        item = self._entries.get(key)
        if item is not None and item[0] <= self._clock():
            del self._entries[key]
            item = None
        if item is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)  # most recently used
        self._hits += 1
        return item[1]

    async def put(self, key: str, entry: CacheEntry, ttl_s: int) -> None:
        self._entries[key] = (self._clock() + ttl_s, entry)
        self._entries.move_to_end(key)
        self._purge_expired()
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # least recently used

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]

    async def stats(self) -> CacheStats:
        self._purge_expired()
        return CacheStats(entries=len(self._entries), hits=self._hits, misses=self._misses)

    async def close(self) -> None:
        self._entries.clear()


def _glob_escape(text: str) -> str:
    """A key prefix as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCache:
    """Redis-backed cache shared by router replicas.

    Values are the entry's JSON under ``key_prefix + key``, expiring via
    ``SET … EX``. The entry count is a SCAN over the prefix (Status only, so
    its O(keys) cost is paid rarely; a counter would drift as keys expire).
    """

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self._redis = client
        self.key_prefix = key_prefix
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_url(cls, url: str, key_prefix: str) -> RedisCache:
        # Short timeouts: the cache is an optimisation and must not stall a request.
        client = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, key_prefix)

    async def ping(self) -> None:
        await self._redis.ping()

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self._redis.get(self.key_prefix + key)
        if raw is None:
            self._misses += 1
            return None
        self._hits += 1
        return CacheEntry.from_json(raw)

    async def put(self, key: str, entry: CacheEntry, ttl_s: int) -> None:
        await self._redis.set(self.key_prefix + key, entry.to_json(), ex=ttl_s)

    async def stats(self) -> CacheStats:
        entries = 0
        async for _ in self._redis.scan_iter(match=_glob_escape(self.key_prefix) + "*", count=1000):
            entries += 1
        return CacheStats(entries=entries, hits=self._hits, misses=self._misses)

    async def close(self) -> None:
        await self._redis.aclose()


def open_cache(settings: CacheSettings) -> ResponseCache | None:
    """The configured cache, or None when caching is off. Connects lazily."""
    if not settings.enabled:
        return None
    if settings.url is None:
        return EmbeddedCache(settings.max_entries)
    return RedisCache.from_url(settings.url, settings.key_prefix)
