"""Deadlines over real nodes: the client's gRPC deadline reaches the nodes, the
edge gets only what leaves the cloud time to answer, and an edge attempt that
cannot finish in time is skipped (escalation DEADLINE). The edge is a real
tiny model slowed on the node side (CountingBackend.delay_s)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from tests.support.router_stack import start_router, target
from tests.support.stack import (
    CountingBackend,
    PacedBackend,
    Stack,
    ask,
    cloud_backend,
    collect,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.v1 import router_pb2


async def slow_edge_stack(stack: Stack, delay_s: float, **router: object):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=delay_s)
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address], **router)
    return edge, cloud


async def test_an_edge_too_slow_for_the_deadline_is_skipped(stack):
    edge, cloud = await slow_edge_stack(stack, delay_s=2.0)
    # No deadline: the edge answers, and the router learns it takes ~2 s.
    first = await stack.stub.Generate(ask(min_confidence=0.0, tenant="a"), timeout=30)
    assert first.tier == router_pb2.TIER_EDGE and edge.calls == 1
    edge_status = (await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)).nodes[0]
    assert edge_status.expected_latency_ms >= 2000

    started = time.perf_counter()
    r = await stack.stub.Generate(ask(min_confidence=0.0, tenant="b"), timeout=1.8)
    assert time.perf_counter() - started < 1.8
    assert r.tier == router_pb2.TIER_CLOUD and edge.calls == 1  # not even started
    assert r.escalation_code == router_pb2.ESCALATION_CODE_DEADLINE
    assert (
        "do not fit in the" in r.escalation_reason and "before the deadline" in r.escalation_reason
    )

    roomy = await stack.stub.Generate(ask(min_confidence=0.0, tenant="c"), timeout=10)
    assert roomy.tier == router_pb2.TIER_EDGE and edge.calls == 2  # time enough: asked


async def test_a_configured_estimate_skips_the_edge_before_any_measurement(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    edge_server = await stack.node("edge", edge)
    await start_router(
        stack,
        [target("edge0", edge_server.address, expected_latency_s=5.0)],
        [target("cloud0", cloud_server.address)],
    )
    r = await stack.stub.Generate(ask(min_confidence=0.0), timeout=3.0)
    assert r.escalation_code == router_pb2.ESCALATION_CODE_DEADLINE and edge.calls == 0
    assert "the edge (~5000 ms expected)" in r.escalation_reason


async def test_the_edge_gets_a_shorter_deadline_so_the_cloud_can_still_answer(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=6.0)
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    # Nothing is known of the edge; the cloud is expected to take 2 s (slack for a busy CPU).
    await start_router(
        stack,
        [target("edge0", edge_server.address)],
        [target("cloud0", cloud_server.address, expected_latency_s=2.0)],
    )
    started = time.perf_counter()
    r = await stack.stub.Generate(ask(min_confidence=0.0), timeout=4.0)
    elapsed = time.perf_counter() - started
    assert r.tier == router_pb2.TIER_CLOUD, r.escalation_reason
    assert r.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert "DEADLINE_EXCEEDED" in r.escalation_reason
    # 4.0 s - 0.05 s margin - 2.0 s for the cloud ≈ 1.95 s for the edge.
    assert 1.7 <= r.timings.edge_ms / 1000 <= 2.6 and elapsed < 4.0
    assert (edge.calls, cloud.calls) == (1, 1)


async def test_a_deadline_nothing_can_meet_is_deadline_exceeded(stack):
    slow_cloud = CountingBackend(cloud_backend(), delay_s=2.0)
    cloud_server = await stack.node("cloud", slow_cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    code, _ = await status_code(stack.stub.Generate(ask(), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    ok = await stack.stub.Generate(ask(tenant="later"), timeout=30)  # still serving
    assert ok.tier == router_pb2.TIER_CLOUD


async def test_a_rule_sets_a_deadline_for_the_requests_it_matches(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    edge_server = await stack.node("edge", edge)
    await start_router(
        stack,
        [target("edge0", edge_server.address, expected_latency_s=6.0)],
        [target("cloud0", cloud_server.address)],
        rules=[{"name": "interactive", "tags": ["chat"], "deadline_s": 3.0}],
    )
    r = await stack.stub.Generate(ask(min_confidence=0.0, tags=["chat"]), timeout=30)
    assert r.escalation_code == router_pb2.ESCALATION_CODE_DEADLINE and edge.calls == 0
    batch = await stack.stub.Generate(ask(min_confidence=0.0, tenant="batch"), timeout=30)
    assert batch.tier == router_pb2.TIER_EDGE and edge.calls == 1  # no rule, no deadline


# -- identical requests with different deadlines share one run ---------------------


async def test_a_shorter_deadline_does_not_cut_the_answer_an_identical_request_waits_for(stack):
    """A (0.5 s) leads the flight; B, identical and without a deadline, joins it.
    The cloud takes 1 s: A gets DEADLINE_EXCEEDED, and B still gets its answer."""
    cloud = CountingBackend(cloud_backend(), delay_s=1.0)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    hasty = asyncio.ensure_future(
        status_code(stack.stub.Generate(ask(tenant="shared"), timeout=0.5))
    )
    await asyncio.sleep(0.2)  # A's run is in flight: B joins it
    patient = await asyncio.wait_for(stack.stub.Generate(ask(tenant="shared")), 30)
    code, _ = await hasty
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert patient.tier == router_pb2.TIER_CLOUD and patient.text
    assert cloud.calls == 2  # A's run (cut at A's deadline), then B's own


async def test_a_stream_that_shared_a_run_cut_by_another_deadline_restarts(stack):
    """B streams the deltas of A's run; when A's deadline cuts it, B is told to
    discard them (Restart, code DEADLINE) and receives a whole answer of its own."""
    cloud = PacedBackend(cloud_backend(), delta_delay_s=0.3)  # 4 deltas: 1.2 s
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address])
    hasty = asyncio.ensure_future(
        status_code(collect(stack.stub.GenerateStream(ask(tenant="shared"), timeout=0.8)))
    )
    await asyncio.sleep(0.2)
    events, final = await asyncio.wait_for(
        collect(stack.stub.GenerateStream(ask(tenant="shared"))), 30
    )
    # A's own stream was cut at its deadline after text was sent: it ends as any
    # cut cloud stream does (UNAVAILABLE, router.streaming), before the client's deadline.
    assert (await hasty)[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    restarts = [i for i, e in enumerate(events) if isinstance(e, router_pb2.Restart)]
    assert len(restarts) == 1 and restarts[0] > 0  # after A's run's deltas
    restart: Any = events[restarts[0]]
    assert restart.escalation_code == router_pb2.ESCALATION_CODE_DEADLINE
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    assert "".join(events[restarts[0] + 1 :]) == final.text
    assert "restarted" in final.flags and cloud.calls == 2
