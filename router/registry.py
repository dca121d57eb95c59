"""Where registered edges are kept: in this process, or in Redis shared by replicas.

An edge holds a *lease*: its record lives while it registers or heartbeats at
least every ``ttl_s`` seconds. The stores only keep and expire leases; which
edge gets a request is ``router.directory``'s business, and the gRPC side is
``router.registry_servicer``.

Lease rules (both stores):

* ``register`` creates or replaces the lease of ``name``. A live lease of the
  same name held by another instance at *another address* is a conflict
  (ALREADY_EXISTS): two edges were given one name. The same address with a new
  instance is a restart, and replaces the lease.
* ``heartbeat`` and ``deregister`` act only on the caller's own lease (same
  name and instance); otherwise they report that nothing matched, and the edge
  registers again.
* At most ``max_edges`` leases (RESOURCE_EXHAUSTED beyond): the registry's
  memory is bounded like everything else in the router.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import grpc

from tidegate.errors import ResourceExhausted, TidegateError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class LeaseConflict(TidegateError):
    """Another live edge already holds this name at another address."""

    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True)
class EdgeRecord:
    """One registered edge, as its last Register/Heartbeat described it."""

    name: str
    address: str  # HOST:PORT the router dials
    instance_id: str  # the edge process holding the lease
    model: str = ""
    capacity: int = 1  # concurrent requests it serves well
    estimator: str = ""
    context_length: int = 0
    in_flight: int = 0  # from the last heartbeat
    queued: int = 0  # from the last heartbeat
    heartbeat_at: float = 0.0  # wall-clock time of the last Register/Heartbeat

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> EdgeRecord:
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in raw.items():
            kind = kinds.get(key)
            if kind is None:
                continue  # written by a newer router: ignore what we do not know
            values[key] = (
                int(value) if kind == "int" else float(value) if kind == "float" else value
            )
        return cls(**values)  # type: ignore[arg-type]


def _conflict(name: str, held_at: str, address: str) -> LeaseConflict:
    return LeaseConflict(
        f"edge name {name!r} is held by another live edge at {held_at} (this one is at "
        f"{address}); give each edge its own register.name, or stop the other one "
        "and wait for its lease to expire"
    )


def _full(max_edges: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the router already has {max_edges} registered edges (registry.max_edges); "
        "raise it or deregister edges that are gone"
    )


@runtime_checkable
class RegistryStore(Protocol):
    ttl_s: float

    async def register(self, record: EdgeRecord) -> None:
        """Create or replace ``record.name``'s lease; LeaseConflict / ResourceExhausted."""
        ...

    async def heartbeat(self, name: str, instance_id: str, in_flight: int, queued: int) -> bool:
        """Renew the caller's lease with its load; False: no such lease (register again)."""
        ...

    async def deregister(self, name: str, instance_id: str) -> bool:
        """Drop the caller's lease; False: there was none."""
        ...

    async def live(self) -> list[EdgeRecord]:
        """Every edge whose lease has not expired, by name."""
        ...

    async def close(self) -> None: ...


class MemoryRegistry:
    """Leases in this process (one router; a restart forgets them and edges re-register)."""

    def __init__(
        self,
        ttl_s: float,
        max_edges: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_edges = max_edges
        self._clock = clock
        self._wall = wall
        self._leases: dict[str, tuple[float, EdgeRecord]] = {}  # name → (expires, record)

    def _current(self, name: str) -> EdgeRecord | None:
        lease = self._leases.get(name)
        if lease is None:
            return None
        if lease[0] <= self._clock():
            del self._leases[name]
            return None
        return lease[1]

    def _purge(self) -> None:
        now = self._clock()
        for name in [n for n, (expires, _) in self._leases.items() if expires <= now]:
            del self._leases[name]

    async def register(self, record: EdgeRecord) -> None:
        current = self._current(record.name)
        if (
            current is not None
            and current.instance_id != record.instance_id
            and current.address != record.address
        ):
            raise _conflict(record.name, current.address, record.address)
        if current is None:
            self._purge()
            if len(self._leases) >= self.max_edges:
                raise _full(self.max_edges)
        record = replace(record, heartbeat_at=self._wall())
        self._leases[record.name] = (self._clock() + self.ttl_s, record)

    async def heartbeat(self, name: str, instance_id: str, in_flight: int, queued: int) -> bool:
        current = self._current(name)
        if current is None or current.instance_id != instance_id:
            return False
        renewed = replace(current, in_flight=in_flight, queued=queued, heartbeat_at=self._wall())
        self._leases[name] = (self._clock() + self.ttl_s, renewed)
        return True

    async def deregister(self, name: str, instance_id: str) -> bool:
        current = self._current(name)
        if current is None or current.instance_id != instance_id:
            return False
        del self._leases[name]
        return True

    async def live(self) -> list[EdgeRecord]:
        self._purge()
        return [record for _, (_, record) in sorted(self._leases.items())]

    async def close(self) -> None:
        self._leases.clear()


# Each script runs atomically in Redis, so replicas racing on one name agree.
# KEYS[1] = the edge's hash, KEYS[2] = the set of registered names.
_REGISTER = """
local held = redis.call('HGET', KEYS[1], 'instance_id')
if held and held ~= ARGV[1] then
  local held_at = redis.call('HGET', KEYS[1], 'address')
  if held_at ~= ARGV[2] then return {0, held_at} end
end
if not held then
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if redis.call('EXISTS', ARGV[5] .. member) == 0 then redis.call('SREM', KEYS[2], member) end
    end
    if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {-1, ''} end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[6])
return {1, ''}
"""
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'instance_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'in_flight', ARGV[2], 'queued', ARGV[3], 'heartbeat_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
_DEREGISTER = """
if redis.call('HGET', KEYS[1], 'instance_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] = the set of registered names; ARGV[1] = the hashes' key prefix, then
# names whose hash was found expired: each leaves the set only if its hash is still
# missing (an edge may have registered again since; left in the set, its lease
# would be renewed by heartbeats but never listed again).
_FORGET_EXPIRED = """
local removed = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


class RedisRegistry:
    """Leases in Redis, shared by router replicas: a hash per edge
    (``<prefix>edge:<name>``) that expires ``ttl_s`` after the last renewal, plus
    a set of names (``<prefix>edges``) to list them. Expiry is Redis's own, so
    replicas with skewed clocks still agree on who is alive."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, ttl_s: float, max_edges: int):
        self._redis = client
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self.max_edges = max_edges
        self._index = f"{key_prefix}edges"
        self._register = client.register_script(_REGISTER)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._deregister = client.register_script(_DEREGISTER)
        self._forget = client.register_script(_FORGET_EXPIRED)

    @classmethod
    def from_url(cls, url: str, key_prefix: str, ttl_s: float, max_edges: int) -> RedisRegistry:
        import redis.asyncio as aioredis

        client = aioredis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        return cls(client, key_prefix, ttl_s, max_edges)

    def _key(self, name: str) -> str:
        return f"{self.key_prefix}edge:{name}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    async def ping(self) -> None:
        await self._redis.ping()

    async def register(self, record: EdgeRecord) -> None:
        record = replace(record, heartbeat_at=time.time())
        flat = [item for pair in record.to_fields().items() for item in pair]
        status, held_at = await self._register(
            keys=[self._key(record.name), self._index],
            args=[
                record.instance_id,
                record.address,
                self._ttl_ms,
                self.max_edges,
                f"{self.key_prefix}edge:",
                record.name,
                *flat,
            ],
        )
        if int(status) == 0:
            raise _conflict(record.name, held_at, record.address)
        if int(status) < 0:
            raise _full(self.max_edges)

    async def heartbeat(self, name: str, instance_id: str, in_flight: int, queued: int) -> bool:
        renewed = await self._heartbeat(
            keys=[self._key(name)],
            args=[instance_id, in_flight, queued, time.time(), self._ttl_ms],
        )
        return bool(int(renewed))

    async def deregister(self, name: str, instance_id: str) -> bool:
        removed = await self._deregister(
            keys=[self._key(name), self._index], args=[instance_id, name]
        )
        return bool(int(removed))

    async def live(self) -> list[EdgeRecord]:
        names = sorted(str(name) for name in await self._redis.smembers(self._index))
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._key(name))
            hashes = await pipe.execute()
        records, gone = [], []
        for name, raw in zip(names, hashes, strict=True):
            if raw:
                records.append(EdgeRecord.from_fields(raw))
            else:
                gone.append(name)  # its hash expired: the edge went silent
        if gone:
            await self.forget_expired(gone)
        return records

    async def forget_expired(self, names: list[str]) -> int:
        """Drop from the index those of ``names`` whose lease is (still) gone."""
        return int(await self._forget(keys=[self._index], args=[f"{self.key_prefix}edge:", *names]))

    async def close(self) -> None:
        await self._redis.aclose()


def open_registry(
    store: str, url: str | None, key_prefix: str, ttl_s: float, max_edges: int
) -> RegistryStore:
    """``store`` is "memory" or "redis" (settings resolve "auto" before this)."""
    if store == "redis":
        assert url is not None  # RouterSettings checks this at load time
        return RedisRegistry.from_url(url, key_prefix, ttl_s, max_edges)
    return MemoryRegistry(ttl_s, max_edges)
