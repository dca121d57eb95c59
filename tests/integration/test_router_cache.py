"""The hardened cache, end to end over real nodes, routers and the real Redis:
coalescing of identical in-flight requests (unary and streamed), per-request
bypass and refresh, TTL and size limits, a Redis cache shared by routers, and
entries that stop answering once their model no longer serves the tier.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from tests.support.stack import (
    REDIS_URL,
    CountingBackend,
    PacedBackend,
    Stack,
    ask,
    cloud_backend,
    collect,
    status_code,
)
from tests.support.tiny_models import tiny_backend, tiny_model_and_tokenizer
from tidegate.v1 import router_pb2, router_pb2_grpc

BYPASS = router_pb2.CACHE_CONTROL_BYPASS
REFRESH = router_pb2.CACHE_CONTROL_REFRESH


def cloud_backend_as(model_id: str):  # type: ignore[no-untyped-def]
    """The same tiny cloud weights under another model identity (an upgrade)."""
    from tidegate.inference.transformers_backend import TransformersBackend

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    return TransformersBackend(
        model, tokenizer, model_id=model_id, context_length=512, quantization="none"
    )


@pytest.fixture
async def redis_prefix():
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def stub_for(stack: Stack, address: str) -> router_pb2_grpc.RouterStub:
    channel = grpc.aio.insecure_channel(address)
    stack.exits.push_async_callback(channel.close)
    return router_pb2_grpc.RouterStub(channel)


async def status(stub: router_pb2_grpc.RouterStub) -> router_pb2.StatusResponse:
    return await stub.Status(router_pb2.StatusRequest(), timeout=10)


# -- coalescing --------------------------------------------------------------------


async def test_identical_streams_and_a_unary_request_share_one_model_call(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=0.5)  # all arrive while in flight
    cloud = PacedBackend(cloud_backend(), delta_delay_s=0.02)
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])

    def request() -> router_pb2.GenerateRequest:  # the same question, its own request id
        return ask(min_confidence=1.0, tenant="flight")

    async def unary_after_the_streams() -> router_pb2.GenerateResponse:
        # A stream leads the flight (a unary leader has no deltas to share: its
        # stream followers would get the answer as one delta).
        await asyncio.sleep(0.1)
        return await stack.stub.Generate(request(), timeout=30)

    streams = [collect(stack.stub.GenerateStream(request(), timeout=30)) for _ in range(3)]
    *streamed, single = await asyncio.gather(*streams, unary_after_the_streams())
    assert (edge.calls, cloud.calls) == (1, 1)
    texts = {final.text for _, final in streamed} | {single.text}
    assert len(texts) == 1 and texts.pop()
    for events, final in streamed:
        assert final.tier == router_pb2.TIER_CLOUD
        assert len(events) > 1 and "".join(events) == final.text  # every delta, in order
    finals = [final for _, final in streamed] + [single]
    assert sum("coalesced" not in f.flags for f in finals) == 1  # one leader
    assert len({f.request_id for f in finals}) == 4  # each keeps its own request id


async def test_a_stream_joining_a_unary_flight_gets_the_answer_as_one_delta(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=0.5)
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])

    async def stream_after_the_unary() -> tuple:  # type: ignore[type-arg]
        await asyncio.sleep(0.1)
        return await collect(
            stack.stub.GenerateStream(ask(min_confidence=1.0, tenant="u"), timeout=30)
        )

    unary, (events, final) = await asyncio.gather(
        stack.stub.Generate(ask(min_confidence=1.0, tenant="u"), timeout=30),
        stream_after_the_unary(),
    )
    assert (edge.calls, cloud.calls) == (1, 1)
    assert events == [unary.text] and final.text == unary.text
    assert "coalesced" in final.flags and "coalesced" not in unary.flags


async def test_a_stream_joining_late_still_receives_every_delta(stack):
    cloud = PacedBackend(cloud_backend(), delta_delay_s=0.05)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    request = ask(tenant="late")
    first = stack.stub.GenerateStream(request, timeout=30)
    early: list[str] = []
    async for event in first:  # wait until the leader has received text
        early.append(event.delta)
        break
    late_events, late_final = await collect(stack.stub.GenerateStream(request, timeout=30))
    rest, first_final = await collect(first)
    assert cloud.calls == 1
    assert "".join(late_events) == late_final.text == first_final.text
    assert "".join(early + rest) == first_final.text
    assert "coalesced" in late_final.flags


async def test_different_cache_writing_does_not_share_a_flight(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=0.3)
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    normal = ask(min_confidence=0.0, tenant="w")
    bypass = ask(min_confidence=0.0, tenant="w", cache_control=BYPASS)
    await asyncio.gather(
        stack.stub.Generate(normal, timeout=30), stack.stub.Generate(bypass, timeout=30)
    )
    assert edge.calls == 2


# -- bypass and refresh ------------------------------------------------------------


async def test_bypass_neither_reads_nor_writes(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    first = await stack.stub.Generate(ask(tenant="b", cache_control=BYPASS), timeout=30)
    assert first.tier == router_pb2.TIER_CLOUD
    assert (await status(stack.stub)).cache_entries == 0  # not written
    stored = await stack.stub.Generate(ask(tenant="b"), timeout=30)
    assert stored.tier == router_pb2.TIER_CLOUD
    hit = await stack.stub.Generate(ask(tenant="b"), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE
    fresh = await stack.stub.Generate(ask(tenant="b", cache_control=BYPASS), timeout=30)
    assert fresh.tier == router_pb2.TIER_CLOUD  # not read
    assert cloud.calls == 3


async def test_refresh_skips_the_hit_and_stores_the_fresh_answer(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    refreshed = await stack.stub.Generate(ask(tenant="r", cache_control=REFRESH), timeout=30)
    assert refreshed.tier == router_pb2.TIER_CLOUD
    hit = await stack.stub.Generate(ask(tenant="r"), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE and hit.text == refreshed.text  # it was written
    again = await stack.stub.Generate(ask(tenant="r", cache_control=REFRESH), timeout=30)
    assert again.tier == router_pb2.TIER_CLOUD  # the hit was not read
    assert cloud.calls == 2
    events, streamed = await collect(
        stack.stub.GenerateStream(ask(tenant="r", cache_control=REFRESH), timeout=30)
    )
    assert streamed.tier == router_pb2.TIER_CLOUD and cloud.calls == 3


async def test_unknown_cache_control_is_invalid_argument(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([], [cloud_server.address])
    request = ask()
    request.cache_control = 7  # type: ignore[assignment]
    code, details = await status_code(stack.stub.Generate(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown cache_control 7" in details


async def test_cli_no_cache_and_refresh_cache(stack):
    from tests.support.cli import tidegate

    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    address = await stack.router([], [cloud_server.address])
    question = "What is the capital of France?"
    await stack.stub.Generate(ask(question), timeout=30)  # cached
    results = {}
    for flag in ("--no-cache", "--refresh-cache"):
        code, out, err = await tidegate("ask", "--router", address, flag, "--json", question)
        assert code == 0, err
        results[flag] = json.loads(out)
    assert results["--no-cache"]["tier"] == "cloud"
    assert results["--refresh-cache"]["tier"] == "cloud"
    code, out, err = await tidegate("ask", "--router", address, "--json", question)
    assert json.loads(out)["tier"] == "cache"
    assert cloud.calls == 3
    code, _, err = await tidegate("ask", "--no-cache", "--refresh-cache", question)
    assert code == 2 and "not allowed with" in err


# -- limits ------------------------------------------------------------------------


async def test_embedded_cache_evicts_past_max_entries_and_expires_after_ttl(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address], cache={"max_entries": 2, "ttl_s": 1})
    for tenant in ("t1", "t2", "t3"):
        await stack.stub.Generate(ask(tenant=tenant), timeout=30)
    assert (await status(stack.stub)).cache_entries == 2
    evicted = await stack.stub.Generate(ask(tenant="t1"), timeout=30)  # least recently used
    assert evicted.tier == router_pb2.TIER_CLOUD
    hit = await stack.stub.Generate(ask(tenant="t3"), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE
    await asyncio.sleep(1.1)
    expired = await stack.stub.Generate(ask(tenant="t3"), timeout=30)
    assert expired.tier == router_pb2.TIER_CLOUD
    assert (await status(stack.stub)).cache_entries == 1
    assert cloud.calls == 5


# -- shared Redis and model identity -----------------------------------------------


async def test_two_routers_share_one_redis_cache(stack, redis_prefix):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    cache = {"url": REDIS_URL, "key_prefix": redis_prefix, "ttl_s": 60}
    first = await stub_for(stack, await stack.router([], [cloud_server.address], cache=cache))
    second = await stub_for(stack, await stack.router([], [cloud_server.address], cache=cache))
    answered = await first.Generate(ask(tenant="shared"), timeout=30)
    assert answered.tier == router_pb2.TIER_CLOUD
    served = await second.Generate(ask(tenant="shared"), timeout=30)
    assert served.tier == router_pb2.TIER_CACHE and served.source_tier == router_pb2.TIER_CLOUD
    assert served.text == answered.text and served.model == answered.model
    assert cloud.calls == 1
    other = await second.Generate(ask(tenant="not-shared"), timeout=30)
    assert other.tier == router_pb2.TIER_CLOUD
    assert (await status(second)).cache_shared


async def test_entries_of_a_replaced_model_are_not_served(stack, redis_prefix):
    """The cloud is upgraded (another model behind the tier): answers the old
    model stored in the shared cache no longer answer."""
    old = await stack.node("cloud", cloud_backend_as("tiny-cloud-v1@tiny"), estimator=None)
    new_backend = CountingBackend(cloud_backend_as("tiny-cloud-v2@tiny"))
    new = await stack.node("cloud", new_backend, estimator=None)
    cache = {"url": REDIS_URL, "key_prefix": redis_prefix, "ttl_s": 60}
    before = await stub_for(stack, await stack.router([], [old.address], cache=cache))
    stored = await before.Generate(ask(tenant="upgrade"), timeout=30)
    assert stored.model == "tiny-cloud-v1@tiny/none"
    after = await stub_for(stack, await stack.router([], [new.address], cache=cache))
    fresh = await after.Generate(ask(tenant="upgrade"), timeout=30)
    assert fresh.tier == router_pb2.TIER_CLOUD and fresh.model == "tiny-cloud-v2@tiny/none"
    assert new_backend.calls == 1
    # A third router that never asked its node yet learns its model (Info) and
    # serves the entry the new model stored.
    third = await stub_for(stack, await stack.router([], [new.address], cache=cache))
    hit = await third.Generate(ask(tenant="upgrade"), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE and hit.model == "tiny-cloud-v2@tiny/none"
    assert new_backend.calls == 1


# -- the estimator a threshold was calibrated for ------------------------------------


async def edge_scored_by_another_estimator(stack: Stack) -> tuple[str, str]:
    """An edge whose answers another estimator scores 0.8 (``fixed_0.8``), and a cloud."""
    from tests.support.stack import FixedEstimator

    edge_server = await stack.node("edge", tiny_backend(seed=0), estimator=FixedEstimator(0.8))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    return edge_server.address, cloud_server.address


CALIBRATED = {"min_confidence": 0.5, "estimator": "gain"}


async def test_an_edge_answer_from_another_estimator_is_not_cached(stack):
    """policy.estimator: "gain" — 0.8 on another estimator's scale says nothing
    about the bar, so a request that accepts any answer (min_confidence 0) gets
    it, but the cache, which serves everyone, must not keep it."""
    edge, cloud = await edge_scored_by_another_estimator(stack)
    await stack.router([edge], [cloud], policy=CALIBRATED)
    lenient = await stack.stub.Generate(ask(min_confidence=0.0, tenant="scale"), timeout=30)
    assert lenient.tier == router_pb2.TIER_EDGE and lenient.estimator == "fixed_0.8"
    assert (await status(stack.stub)).cache_entries == 0
    default = await stack.stub.Generate(ask(tenant="scale"), timeout=30)
    assert default.tier == router_pb2.TIER_CLOUD  # judged like a fresh edge answer
    assert "calibrated for 'gain'" in default.escalation_reason


async def test_a_cached_edge_answer_from_another_estimator_is_not_served(stack, redis_prefix):
    """An entry stored under a policy without an estimator (another router on
    the shared Redis, or before a reload) is not served once one is set."""
    edge, cloud = await edge_scored_by_another_estimator(stack)
    cache = {"url": REDIS_URL, "key_prefix": redis_prefix, "ttl_s": 60}
    any_scale = {"min_confidence": 0.5}
    before = await stub_for(
        stack, await stack.router([edge], [cloud], cache=cache, policy=any_scale)
    )
    stored = await before.Generate(ask(min_confidence=0.0, tenant="scale"), timeout=30)
    assert stored.tier == router_pb2.TIER_EDGE
    assert (await before.Generate(ask(tenant="scale"), timeout=30)).tier == router_pb2.TIER_CACHE
    after = await stub_for(
        stack, await stack.router([edge], [cloud], cache=cache, policy=CALIBRATED)
    )
    # A request that accepts any answer may still have it from the cache...
    lenient = await after.Generate(ask(min_confidence=0.0, tenant="scale"), timeout=30)
    assert lenient.tier == router_pb2.TIER_CACHE and lenient.source_tier == router_pb2.TIER_EDGE
    # ... but a default one is judged as judge_edge would judge a fresh answer.
    default = await after.Generate(ask(tenant="scale"), timeout=30)
    assert default.tier == router_pb2.TIER_CLOUD
    assert "calibrated for 'gain'" in default.escalation_reason


async def test_a_silent_node_does_not_hold_up_a_cache_hit(stack, redis_prefix):
    """A fresh router learns its nodes' models before serving a shared entry; the
    first node that names the entry's model settles it, and a node that accepts
    connections but never answers (a hung host) neither delays the hit nor, with
    nobody naming it, outlasts the request's deadline."""
    import socket

    cloud = CountingBackend(cloud_backend())
    server = await stack.node("cloud", cloud, estimator=None)
    cache = {"url": REDIS_URL, "key_prefix": redis_prefix, "ttl_s": 60}
    first = await stub_for(stack, await stack.router([], [server.address], cache=cache))
    await first.Generate(ask(tenant="hung"), timeout=30)
    hung = socket.socket()  # accepts TCP, never speaks HTTP/2
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    stack.exits.callback(hung.close)
    hung_node = f"127.0.0.1:{hung.getsockname()[1]}"
    fresh = await stub_for(stack, await stack.router([], [server.address, hung_node], cache=cache))
    # A deadline shorter than the hung node's probe (3 s): waiting for it ran out of time.
    hit = await fresh.Generate(ask(tenant="hung"), timeout=1.5)
    assert hit.tier == router_pb2.TIER_CACHE and cloud.calls == 1
