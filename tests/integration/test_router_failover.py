"""Failure handling over real nodes: bounded retries with backoff across targets,
per-node timeouts, no fallback loop, and the circuit breaker (state in Status).

Failing nodes are real ModelNode servers whose backend raises (the node answers
INTERNAL, as a crashed model would) for as long as the test says.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from tests.support.router_stack import start_router, target
from tests.support.stack import (
    CountingBackend,
    Stack,
    ask,
    closed_port_address,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.backend import Generation
from tidegate.chat import GenerationRequest
from tidegate.v1 import router_pb2


class FailingBackend(CountingBackend):
    """A real backend whose calls fail while ``failures_left`` > 0 (-1: always)."""

    def __init__(self, inner: Any, failures: int = -1, delay_s: float = 0.0) -> None:
        super().__init__(inner, delay_s=delay_s)
        self.failures_left = failures
        self.started: list[float] = []  # when each call arrived at the node

    async def generate(self, request: GenerationRequest) -> Generation:
        self.started.append(time.monotonic())
        if self.failures_left != 0:
            self.calls += 1
            if self.failures_left > 0:
                self.failures_left -= 1
            raise RuntimeError("model crashed")
        return await super().generate(request)


async def status_of(stack: Stack, name: str) -> router_pb2.NodeStatus:
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    return next(n for n in status.nodes if n.name == name)


async def test_retries_back_off_on_a_flaky_node_until_it_answers(stack):
    flaky = FailingBackend(cloud_backend(), failures=2)
    server = await stack.node("cloud", flaky, estimator=None)
    await stack.router(
        [],
        [server.address],
        retries={"cloud_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
    )
    r = await stack.stub.Generate(ask(), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and flaky.calls == 3
    # Backoffs before the 2nd and 3rd attempts: 0.2 s then 0.4 s, each with
    # "equal jitter" (between half and all of it).
    gaps = [b - a for a, b in zip(flaky.started, flaky.started[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps


async def test_attempts_spread_over_targets_first_and_stay_bounded(stack):
    bad = [FailingBackend(cloud_backend()) for _ in range(2)]
    good = CountingBackend(cloud_backend())
    addresses = [(await stack.node("cloud", b, estimator=None)).address for b in [*bad, good]]
    await stack.router([], addresses, retries={"cloud_attempts": 3})
    r = await stack.stub.Generate(ask(tenant="spread"), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD
    assert [b.calls for b in bad] + [good.calls] == [1, 1, 1]  # each target once, in order

    await stack.router([], addresses[:2], retries={"cloud_attempts": 3})
    code, details = await status_code(stack.stub.Generate(ask(tenant="bounded"), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert sum(b.calls for b in bad) == 2 + 3  # three attempts, no more
    assert "cloud node cloud0" in details and "cloud node cloud1" in details
    assert "INTERNAL" in details and "(2 attempts)" in details


async def test_a_node_that_timed_out_is_not_asked_again(stack):
    slow = CountingBackend(cloud_backend(), delay_s=3.0)
    fast = CountingBackend(cloud_backend())
    slow_server = await stack.node("cloud", slow, estimator=None)
    fast_server = await stack.node("cloud", fast, estimator=None)
    retries = {"cloud_attempts": 3}
    slow_target = target("slow", slow_server.address, timeout_s=0.3)
    fast_target = target("fast", fast_server.address)
    await start_router(stack, [], [slow_target, fast_target], retries=retries)
    r = await stack.stub.Generate(ask(), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and (slow.calls, fast.calls) == (1, 1)
    await start_router(stack, [], [slow_target], retries=retries)
    code, details = await status_code(stack.stub.Generate(ask(tenant="alone"), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "DEADLINE_EXCEEDED" in details
    assert slow.calls == 2  # once per request: a timeout is not retried on the same node


async def test_no_fallback_loop_when_the_cloud_fails_after_the_edge(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    cloud = FailingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    retries = {"edge_attempts": 3, "cloud_attempts": 2, "backoff_initial_s": 0.01}
    await stack.router([edge_server.address], [cloud_server.address], retries=retries)
    code, details = await status_code(stack.stub.Generate(ask(min_confidence=1.0), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "cloud node cloud0" in details
    assert (edge.calls, cloud.calls) == (1, 2)  # the edge is never asked again

    await stack.router(
        [edge_server.address],
        [cloud_server.address],
        retries=retries,
        policy={"on_cloud_unavailable": "degraded"},
    )
    r = await stack.stub.Generate(ask(min_confidence=1.0, tenant="d"), timeout=30)
    assert r.tier == router_pb2.TIER_EDGE and list(r.flags) == ["degraded"]
    assert (edge.calls, cloud.calls) == (2, 4)


async def test_the_breaker_cools_down_a_failing_node_and_lets_it_back(stack):
    cloud = FailingBackend(cloud_backend())
    server = await stack.node("cloud", cloud, estimator=None)
    await stack.router(
        [],
        [server.address],
        retries={"cloud_attempts": 2, "backoff_initial_s": 0.01},
        breaker={"failure_threshold": 2, "cooldown_s": 1.0, "max_cooldown_s": 5.0},
    )
    code, _ = await status_code(stack.stub.Generate(ask(), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and cloud.calls == 2
    node = await status_of(stack, "cloud0")
    assert node.breaker == "open" and 0 < node.cooldown_remaining_s <= 1.0
    assert node.consecutive_failures == 2

    started = time.perf_counter()
    code, details = await status_code(stack.stub.Generate(ask(tenant="b"), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "cooling down after 2 consecutive" in details
    assert cloud.calls == 2 and time.perf_counter() - started < 0.5  # not contacted at all

    cloud.failures_left = 0  # the node recovers
    await asyncio.sleep(1.05)
    assert (await status_of(stack, "cloud0")).breaker == "half_open"
    r = await stack.stub.Generate(ask(tenant="c"), timeout=30)  # the trial call
    assert r.tier == router_pb2.TIER_CLOUD and cloud.calls == 3
    node = await status_of(stack, "cloud0")
    assert (node.breaker, node.consecutive_failures, node.cooldown_remaining_s) == ("closed", 0, 0)


async def test_a_dead_edge_is_cooled_down_and_skipped(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    dead = closed_port_address()
    await stack.router(
        [dead],
        [cloud_server.address],
        retries={"edge_attempts": 1},
        breaker={"failure_threshold": 1, "cooldown_s": 30.0},
    )
    first = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert first.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert "UNAVAILABLE" in first.escalation_reason
    second = await stack.stub.Generate(ask(min_confidence=0.0, tenant="b"), timeout=30)
    assert second.tier == router_pb2.TIER_CLOUD
    assert "cooling down after 1 consecutive failures" in second.escalation_reason
    assert (await status_of(stack, "edge0")).breaker == "open"
