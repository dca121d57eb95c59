"""The edge registry end to end: real routers, real ModelNode servers over tiny
models, the EdgeRegistry RPCs over loopback gRPC, and the real Redis for
replicas sharing one registry.

Edges register here through the raw EdgeRegistry stub, so the router's side is
tested on its own; tests/integration/test_edge_agent.py covers the agent.
Which edge answered is read from the answer's model identity (each tiny node
has its own seed), and call counts are taken on the node side.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from router.service import RouterServer, serve_router
from router.settings import RouterSettings
from tests.support.stack import REDIS_URL, CountingBackend, Stack
from tests.support.tiny_models import tiny_backend
from tidegate.client import build_request
from tidegate.server import RunningServer, wait_for_health
from tidegate.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc

# The raw stub sends no heartbeats of its own: leases outlive each test, except
# where a test is about expiry.
FAST_REGISTRY = {"heartbeat_interval_s": 0.1, "ttl_s": 30.0, "refresh_interval_s": 0.05}


class Cluster:
    """Routers and nodes for one test; everything stops afterwards."""

    def __init__(self, exits: AsyncExitStack) -> None:
        self.exits = exits
        self.nodes = Stack(exits)

    async def node(self, backend: Any, role: str = "edge") -> RunningServer:
        estimator = "seq_prob" if role == "edge" else None
        return await self.nodes.node(role, backend, estimator, max_new_tokens_limit=256)

    async def router(self, cloud: str, **overrides: Any) -> RouterServer:
        data: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "http": {"enabled": False},
            "metrics": {"enabled": False},  # not the default port 9464: routers run side by side
            "edge": [],
            "cloud": [{"name": "cloud", "address": cloud}],
            "policy": {
                "version": "registry-test",
                "default_max_new_tokens": 8,
                "escalate_truncated": False,  # tiny random models rarely finish
            },
            "registry": FAST_REGISTRY,
            **overrides,
        }
        server = await serve_router(RouterSettings.model_validate(data))
        self.exits.push_async_callback(server.stop, 0)
        await wait_for_health(server.address, timeout=10)
        return server

    async def stubs(
        self, router: RouterServer
    ) -> tuple[router_pb2_grpc.RouterStub, registry_pb2_grpc.EdgeRegistryStub]:
        channel = grpc.aio.insecure_channel(router.address)
        self.exits.push_async_callback(channel.close)
        return router_pb2_grpc.RouterStub(channel), registry_pb2_grpc.EdgeRegistryStub(channel)


@pytest.fixture
async def cluster():
    async with AsyncExitStack() as exits:
        yield Cluster(exits)


@pytest.fixture
async def cloud(cluster):
    return await cluster.node(tiny_backend(seed=1), role="cloud")


def register_request(name: str, address: str, **kw: Any) -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(
        name=name,
        address=address,
        instance_id=kw.pop("instance_id", f"{name}-1"),
        model=kw.pop("model", ""),
        capacity=kw.pop("capacity", 1),
        estimator="seq_prob",
        **kw,
    )


def heartbeat(name: str, in_flight: int, instance_id: str | None = None):
    return registry_pb2.HeartbeatRequest(
        name=name,
        instance_id=instance_id or f"{name}-1",
        load=registry_pb2.EdgeLoad(in_flight=in_flight),
    )


def edge_question() -> router_pb2.GenerateRequest:
    # min_confidence 0 keeps any edge answer; a fresh question avoids the cache.
    return build_request(f"Which edge answers {uuid.uuid4().hex}?", min_confidence=0.0)


async def registered(stub: router_pb2_grpc.RouterStub) -> dict[str, router_pb2.NodeStatus]:
    status = await stub.Status(router_pb2.StatusRequest(), timeout=10)
    return {n.name: n for n in status.nodes if n.registered}


async def wait_until(predicate, timeout: float = 10.0, every: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def test_a_registered_edge_is_listed_and_receives_work(cluster, cloud):
    edge = await cluster.node(tiny_backend(seed=0))
    router = await cluster.router(cloud.address)
    stub, registry = await cluster.stubs(router)
    assert (await stub.Generate(edge_question(), timeout=30)).tier == router_pb2.TIER_CLOUD

    reply = await registry.Register(
        register_request("e0", edge.address, model="tiny-llama-s0@tiny/none", capacity=2),
        timeout=5,
    )
    assert (reply.heartbeat_interval_s, reply.ttl_s) == (0.1, 30.0)
    [node] = (await registered(stub)).values()
    assert (node.name, node.address, node.tier, node.capacity) == ("e0", edge.address, "edge", 2)
    assert node.healthy and node.model == "tiny-llama-s0@tiny/none"
    assert 0.0 <= node.heartbeat_age_s < 5.0

    answer = await stub.Generate(edge_question(), timeout=30)
    assert answer.tier == router_pb2.TIER_EDGE and answer.model == "tiny-llama-s0@tiny/none"

    removed = await registry.Deregister(
        registry_pb2.DeregisterRequest(name="e0", instance_id="e0-1"), timeout=5
    )
    assert removed.removed and await registered(stub) == {}
    assert (await stub.Generate(edge_question(), timeout=30)).tier == router_pb2.TIER_CLOUD


async def test_the_least_loaded_edge_is_asked_first(cluster, cloud):
    busy_first = await cluster.node(tiny_backend(seed=0))
    second = await cluster.node(tiny_backend(seed=2))
    router = await cluster.router(cloud.address)
    stub, registry = await cluster.stubs(router)
    await registry.Register(register_request("a", busy_first.address), timeout=5)
    await registry.Register(register_request("b", second.address), timeout=5)

    await registry.Heartbeat(heartbeat("a", in_flight=5), timeout=5)
    assert (await stub.Generate(edge_question(), timeout=30)).model.startswith("tiny-llama-s2")
    assert (await registered(stub))["a"].load == 5.0

    await registry.Heartbeat(heartbeat("a", in_flight=0), timeout=5)
    await registry.Heartbeat(heartbeat("b", in_flight=9), timeout=5)
    assert (await stub.Generate(edge_question(), timeout=30)).model.startswith("tiny-llama-s0")

    # Capacity scales the load: 4 in flight on a capacity-8 edge is lighter than 1 of 1.
    await registry.Register(register_request("a", busy_first.address, capacity=8), timeout=5)
    await registry.Heartbeat(heartbeat("a", in_flight=4), timeout=5)
    await registry.Heartbeat(heartbeat("b", in_flight=1), timeout=5)
    assert (await stub.Generate(edge_question(), timeout=30)).model.startswith("tiny-llama-s0")


async def test_the_routers_own_in_flight_calls_spread_concurrent_requests(cluster, cloud):
    """Equal reported loads: without counting its own calls in flight the router
    would send both concurrent requests to the first edge."""
    one, two = (
        CountingBackend(tiny_backend(seed=0), 0.5),
        CountingBackend(tiny_backend(seed=2), 0.5),
    )
    servers = [await cluster.node(one), await cluster.node(two)]
    router = await cluster.router(cloud.address)
    stub, registry = await cluster.stubs(router)
    for name, server in zip(("a", "b"), servers, strict=True):
        await registry.Register(register_request(name, server.address), timeout=5)
    answers = await asyncio.gather(*(stub.Generate(edge_question(), timeout=30) for _ in range(2)))
    assert sorted(a.model[:12] for a in answers) == ["tiny-llama-s", "tiny-llama-s"]
    assert {a.model.split("@")[0] for a in answers} == {"tiny-llama-s0", "tiny-llama-s2"}
    assert (one.calls, two.calls) == (1, 1)


async def test_an_edge_that_goes_silent_is_dropped(cluster, cloud):
    edge = await cluster.node(tiny_backend(seed=0))
    router = await cluster.router(cloud.address, registry={**FAST_REGISTRY, "ttl_s": 1.5})
    stub, registry = await cluster.stubs(router)
    await registry.Register(register_request("quiet", edge.address), timeout=5)
    for _ in range(10):  # heartbeats keep it (2 s > the 1.5 s ttl)
        await asyncio.sleep(0.2)
        await registry.Heartbeat(heartbeat("quiet", 0), timeout=5)
    assert "quiet" in await registered(stub)

    async def gone() -> bool:
        return "quiet" not in await registered(stub)

    await wait_until(gone, timeout=10.0)
    answer = await stub.Generate(edge_question(), timeout=30)
    assert answer.tier == router_pb2.TIER_CLOUD
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.Heartbeat(heartbeat("quiet", 0), timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert "register again" in (err.value.details() or "")


async def test_bad_registrations_get_precise_statuses_and_the_router_stays_up(
    cluster, cloud, monkeypatch
):
    monkeypatch.setenv("TIDEGATE_TEST_REGISTRY_TOKEN", "s3cret\n")  # a mounted secret's newline
    edge = await cluster.node(tiny_backend(seed=0))
    router = await cluster.router(
        cloud.address,
        edge=[{"name": "static", "address": edge.address}],
        registry={**FAST_REGISTRY, "token_env": "TIDEGATE_TEST_REGISTRY_TOKEN"},
    )
    stub, registry = await cluster.stubs(router)
    token = (("x-tidegate-registry-token", "s3cret"),)

    async def code(request: Any, metadata: Any = token, rpc: Any = None) -> tuple[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await (rpc or registry.Register)(request, timeout=5, metadata=metadata)
        return err.value.code().name, err.value.details() or ""

    ok = register_request("e", edge.address)
    assert (await code(ok, metadata=()))[0] == "UNAUTHENTICATED"
    assert await code(ok, metadata=(("x-tidegate-registry-token", "wrong"),)) == (
        "UNAUTHENTICATED",
        "edge registration needs the router's registry token in the "
        "'x-tidegate-registry-token' metadata (the edge's register.token_env); "
        "the one sent does not match",
    )
    assert (await code(register_request("e", "no-port")))[0] == "INVALID_ARGUMENT"
    wildcard = await code(register_request("e", "0.0.0.0:50052"))
    assert wildcard[0] == "INVALID_ARGUMENT" and "register.advertise" in wildcard[1]
    assert (await code(register_request("e", edge.address, capacity=0)))[0] == "INVALID_ARGUMENT"
    assert (await code(register_request("bad name!", edge.address)))[0] == "INVALID_ARGUMENT"
    clash = await code(register_request("static", edge.address))
    assert clash[0] == "ALREADY_EXISTS" and "config file" in clash[1]
    await registry.Register(ok, timeout=5, metadata=token)
    other = register_request("e", "127.0.0.1:1", instance_id="other")
    assert (await code(other))[0] == "ALREADY_EXISTS"
    unknown = await code(heartbeat("nobody", 0), rpc=registry.Heartbeat)
    assert unknown[0] == "NOT_FOUND"
    status = await stub.Status(router_pb2.StatusRequest(), timeout=10)
    assert [(n.name, n.registered) for n in status.nodes if n.tier == "edge"] == [
        ("static", False),
        ("e", True),
    ]


async def test_a_router_without_the_registry_says_unimplemented(cluster, cloud):
    router = await cluster.router(cloud.address, registry={"enabled": False})
    _, registry = await cluster.stubs(router)
    edge = await cluster.node(tiny_backend(seed=0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.Register(register_request("e", edge.address), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_router_replicas_share_the_registry_through_redis(cluster, cloud):
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    shared = {
        "cache": {"url": REDIS_URL, "key_prefix": prefix + "cache:"},
        "registry": {**FAST_REGISTRY, "key_prefix": prefix + "registry:"},
    }
    edge = CountingBackend(tiny_backend(seed=0))
    edge_server = await cluster.node(edge)
    one = await cluster.router(cloud.address, **shared)
    two = await cluster.router(cloud.address, **shared)
    stub_one, registry_one = await cluster.stubs(one)
    stub_two, registry_two = await cluster.stubs(two)
    try:
        await registry_one.Register(register_request("shared", edge_server.address), timeout=5)

        async def listed_by_two() -> bool:
            return "shared" in await registered(stub_two)

        await wait_until(listed_by_two)
        answer = await stub_two.Generate(edge_question(), timeout=30)
        assert answer.tier == router_pb2.TIER_EDGE and edge.calls == 1
        await registry_two.Heartbeat(heartbeat("shared", 3), timeout=5)  # the lease is shared

        async def load_seen_by_one() -> bool:
            node = (await registered(stub_one)).get("shared")
            return node is not None and node.load == 3.0

        await wait_until(load_seen_by_one)
        await registry_two.Deregister(
            registry_pb2.DeregisterRequest(name="shared", instance_id="shared-1"), timeout=5
        )

        async def dropped_by_one() -> bool:
            return "shared" not in await registered(stub_one)

        await wait_until(dropped_by_one)
    finally:
        client = aioredis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_a_registry_redis_that_does_not_answer_fails_the_startup(cloud):
    import socket

    from tidegate.errors import ConfigError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    settings = RouterSettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "http": {"enabled": False},
            "edge": [],
            "cloud": [{"address": cloud.address}],
            "registry": {"url": closed},
        }
    )
    with pytest.raises(ConfigError, match=f"registry.url {closed}: Redis did not answer"):
        await serve_router(settings)


async def test_a_registry_redis_that_stops_answering_is_unavailable_not_internal(cluster, cloud):
    from tests.support.redis_proxy import SlowReplies

    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    async with SlowReplies() as store:
        registry = {**FAST_REGISTRY, "url": store.url, "key_prefix": prefix}
        router = await cluster.router(cloud.address, registry=registry)
        _, stub = await cluster.stubs(router)
        store.delay_s = 3.0  # past the registry client's 2 s: Redis is out, for now
        for call in (
            stub.Register(register_request("late", "127.0.0.1:1"), timeout=10),
            stub.Heartbeat(heartbeat("late", 1), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            # an outage the edge agent waits out, not a bug nor a refusal
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "registry store is unreachable" in info.value.details()
        store.delay_s = 0.0
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
