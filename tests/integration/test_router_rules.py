"""Policy rules over real nodes and the real Redis: privacy pinning (by tag and by
the PII detector) keeps text off the cloud node and out of the shared cache,
for unary and streamed requests; forced tiers; per-tenant thresholds."""

from __future__ import annotations

import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from tests.support.stack import (
    REDIS_URL,
    CountingBackend,
    FixedEstimator,
    Stack,
    ask,
    closed_port_address,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.v1 import router_pb2

RULES = [
    {"name": "private", "tags": ["private"], "route": "edge_only"},
    {"name": "pii", "pii": True, "route": "edge_only"},
    {"name": "debug-cloud", "tags": ["force-cloud"], "route": "cloud"},
    {"name": "debug-edge", "tags": ["force-edge"], "route": "edge"},
    {"name": "strict", "tenants": ["strict"], "min_confidence": 1.0},
]
EMAIL_QUESTION = "Write to alice@example.com: what is the capital of France?"


@pytest.fixture
async def ruled(stack):
    """Edge + cloud (counted) behind a router with RULES and a Redis cache."""
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    client = aioredis.from_url(REDIS_URL)
    edge, cloud = await stack.counted_pair(
        rules=RULES,
        cache={"url": REDIS_URL, "key_prefix": prefix, "ttl_s": 60},
        policy={"min_confidence": 0.5},  # not the shipped (calibrated) default
    )

    async def keys() -> list[bytes]:
        return [k async for k in client.scan_iter(match=prefix + "*")]

    try:
        yield stack, edge, cloud, keys
    finally:
        found = await keys()
        if found:
            await client.delete(*found)
        await client.aclose()


async def stream(stack: Stack, request: router_pb2.GenerateRequest) -> router_pb2.GenerateResponse:
    final = None
    async for event in stack.stub.GenerateStream(request, timeout=30):
        if event.HasField("response"):
            final = event.response
    assert final is not None
    return final


async def test_pinned_requests_never_reach_the_cloud_nor_the_shared_cache(ruled):
    stack, edge, cloud, keys = ruled
    pinned = [
        ask(min_confidence=1.0, tags=["private"]),  # by tag
        ask(EMAIL_QUESTION, min_confidence=1.0),  # by the PII detector
        ask("My card is 4111 1111 1111 1111, is it valid?", min_confidence=1.0),
    ]
    for request in pinned:
        for answer in (
            await stack.stub.Generate(request, timeout=30),
            await stream(stack, request),
        ):
            # min_confidence 1 would escalate any edge answer: the pin keeps it.
            assert answer.tier == router_pb2.TIER_EDGE and "pinned" in answer.flags
            assert answer.escalation_code == router_pb2.ESCALATION_CODE_NONE
            assert "kept by rule" in answer.escalation_reason
    assert (
        "rule 'pii' (1 e-mail address found)"
        in (await stack.stub.Generate(pinned[1], timeout=30)).escalation_reason
    )
    assert cloud.calls == 0 and edge.calls == 7
    assert await keys() == []  # nothing written to the shared cache

    # The same setup does use the cloud and the shared cache for other requests.
    plain = await stack.stub.Generate(ask(min_confidence=1.0), timeout=30)
    assert plain.tier == router_pb2.TIER_CLOUD and cloud.calls == 1
    assert len(await keys()) == 1


async def test_a_pinned_request_fails_rather_than_leave_the_edge(ruled):
    stack, edge, cloud, _ = ruled
    dead = closed_port_address()
    cloud_address = stack.server.servicer.pipeline.clouds[0].address
    await stack.router([dead], [cloud_address], rules=RULES)
    code, details = await status_code(
        stack.stub.Generate(ask(min_confidence=0.0, tags=["private"]), timeout=30)
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "rule 'private' keeps the request on the edge, and no edge node answered" in details
    assert cloud.calls == 0
    unpinned = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert unpinned.tier == router_pb2.TIER_CLOUD  # edge down → cloud, as usual


async def test_forced_tiers_skip_the_cache_and_the_judgement(ruled):
    stack, edge, cloud, keys = ruled
    for _ in range(2):
        r = await stack.stub.Generate(ask(min_confidence=0.0, tags=["force-cloud"]), timeout=30)
        assert r.tier == router_pb2.TIER_CLOUD and "forced" in r.flags
        assert r.escalation_code == router_pb2.ESCALATION_CODE_RULE
        assert r.escalation_reason == "rule 'debug-cloud' sends it to the cloud"
    assert (edge.calls, cloud.calls) == (0, 2)  # never cached, never the edge
    e = await stack.stub.Generate(ask(min_confidence=1.0, tags=["force-edge"]), timeout=30)
    assert e.tier == router_pb2.TIER_EDGE and "forced" in e.flags
    assert cloud.calls == 2 and await keys() == []


async def test_a_tenant_rule_sets_the_threshold_and_the_request_still_wins(ruled):
    stack, _, cloud, _ = ruled
    r = await stack.stub.Generate(ask(tenant="strict"), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and r.threshold == 1.0
    own = await stack.stub.Generate(ask("Another question?", tenant="strict", min_confidence=0.0))
    assert own.threshold == 0.0
    other = await stack.stub.Generate(ask("Another question?", tenant="relaxed"), timeout=30)
    assert other.threshold == 0.5  # the policy's


async def test_pinned_requests_neither_read_nor_write_the_shared_cache(ruled):
    stack, _, _, keys = ruled
    edge = CountingBackend(tiny_backend(seed=0))
    edge_server = await stack.node("edge", edge, estimator=FixedEstimator(0.9))
    cloud_address = stack.server.servicer.pipeline.clouds[0].address
    prefix = stack.server.servicer.pipeline.settings.cache.key_prefix
    await stack.router(
        [edge_server.address],
        [cloud_address],
        rules=RULES,
        cache={"url": REDIS_URL, "key_prefix": prefix, "ttl_s": 60},
    )
    # A confident edge answer is cacheable: pinned, it is still not written ...
    pinned = await stack.stub.Generate(ask(min_confidence=0.0, tags=["private"]), timeout=30)
    assert pinned.tier == router_pb2.TIER_EDGE and await keys() == []
    # ... while the same request unpinned is (so this setup does cache) ...
    first = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert first.tier == router_pb2.TIER_EDGE and len(await keys()) == 1
    hit = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE
    # ... and a pinned request never reads the shared entry either.
    again = await stack.stub.Generate(ask(min_confidence=0.0, tags=["private"]), timeout=30)
    assert again.tier == router_pb2.TIER_EDGE and edge.calls == 3
