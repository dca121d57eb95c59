"""router.failover and router.latency: attempt order, bounds, backoff, the
deadline split between edge and cloud, and the latency estimate.

Here each call's outcome is scripted per node (the algorithm only sees the
errors a call raises and the NodeClients' real breaker and latency records);
tests/integration/test_router_failover.py runs the same paths against real
failing, slow and dead nodes.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from router.breaker import CircuitBreaker
from router.failover import TierUnavailable, ask_tier, backoff_s, edge_deadline
from router.guard_settings import BreakerSettings, RetrySettings
from router.latency import LatencyEstimate
from router.nodes import NodeClient, NodeCoolingDown, NodeRejected, NodeUnavailable
from tidegate.errors import DeadlineExceeded

RETRY = RetrySettings(edge_attempts=3, cloud_attempts=3, backoff_initial_s=0.0, backoff_max_s=0.0)


def node(name: str, latency: float | None = None) -> NodeClient:
    return NodeClient(name, f"{name}:1", "cloud", 5.0, expected_latency_s=latency)


def scripted(outcomes: dict[str, list[str]], log: list[str]):
    """call(node, deadline): each node answers with its next scripted outcome."""

    async def call(n: NodeClient, deadline: float | None) -> str:
        log.append(n.name)
        if not n.breaker.allow():  # as NodeClient checks before contacting the node
            raise NodeCoolingDown(n, "cooling down: a trial call is in flight")
        outcome = outcomes[n.name].pop(0)
        if outcome == "down":
            raise NodeUnavailable(n, "UNAVAILABLE: down", grpc.StatusCode.UNAVAILABLE)
        if outcome == "slow":
            raise NodeUnavailable(n, "DEADLINE_EXCEEDED: slow", grpc.StatusCode.DEADLINE_EXCEEDED)
        if outcome == "reject":
            raise NodeRejected(n, "too long", grpc.StatusCode.INVALID_ARGUMENT)
        return f"answer from {n.name}"

    return call


async def test_spreads_over_nodes_then_retries_the_ones_that_failed_fast() -> None:
    a, b = node("a"), node("b")
    log: list[str] = []
    call = scripted({"a": ["down", "ok"], "b": ["slow"]}, log)
    answer = await ask_tier("cloud", [a, b], call, attempts=3, retry=RETRY, deadline=None)
    assert answer == "answer from a" and log == ["a", "b", "a"]  # b timed out: not again


async def test_attempts_are_bounded_and_the_error_names_every_node() -> None:
    a, b = node("a"), node("b")
    log: list[str] = []
    call = scripted({"a": ["down"] * 5, "b": ["down"] * 5}, log)
    with pytest.raises(TierUnavailable) as info:
        await ask_tier("cloud", [a, b], call, attempts=3, retry=RETRY, deadline=None)
    assert log == ["a", "b", "a"]
    assert str(info.value) == (
        "cloud node a at a:1 is unavailable: UNAVAILABLE: down (2 attempts); "
        "cloud node b at b:1 is unavailable: UNAVAILABLE: down"
    )


async def test_a_rejection_ends_the_tier_at_once() -> None:
    a, b = node("a"), node("b")
    log: list[str] = []
    with pytest.raises(NodeRejected):
        await ask_tier(
            "cloud", [a, b], scripted({"a": ["reject"], "b": ["ok"]}, log),
            attempts=3, retry=RETRY, deadline=None,
        )  # fmt: skip
    assert log == ["a"]


async def test_open_breakers_are_not_asked_and_are_named() -> None:
    a, b = node("a"), node("b")
    a.breaker.settings = BreakerSettings(failure_threshold=1, cooldown_s=60)
    a.breaker.record_failure("UNAVAILABLE: refused")
    log: list[str] = []
    call = scripted({"a": ["ok"], "b": ["down"] * 3}, log)
    with pytest.raises(TierUnavailable, match="cloud node a at a:1 is unavailable: cooling down"):
        await ask_tier("cloud", [a, b], call, attempts=3, retry=RETRY, deadline=None)
    assert log == ["b", "b", "b"]


async def test_a_node_with_a_trial_call_in_flight_is_skipped_for_the_request() -> None:
    """Half-open, with another request's trial call in flight, the node answers
    NodeCoolingDown: no attempt, but asking it again every round would spin
    until the trial ends (up to a cooldown) instead of failing over."""
    now = [0.0]
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, cooldown_s=60), lambda: now[0])
    a, b = NodeClient("a", "a:1", "cloud", 5.0, breaker=breaker), node("b")
    breaker.record_failure("UNAVAILABLE: refused")
    now[0] = 61.0  # the cooldown is over ...
    assert breaker.allow()  # ... and another request's trial call is in flight
    log: list[str] = []
    call = scripted({"a": [], "b": ["down", "ok"]}, log)
    ask = ask_tier("cloud", [a, b], call, attempts=3, retry=RETRY, deadline=None)
    assert await asyncio.wait_for(ask, 5) == "answer from b"
    assert log == ["a", "b", "b"]  # b is retried; a is not asked again
    log.clear()
    with pytest.raises(TierUnavailable, match="cloud node a at a:1 is unavailable: cooling down"):
        await asyncio.wait_for(
            ask_tier("cloud", [a], call, attempts=3, retry=RETRY, deadline=None), 5
        )
    assert log == ["a"]  # at once, not after 1024 rounds of backoff


async def test_a_passed_deadline_is_deadline_exceeded() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    with pytest.raises(DeadlineExceeded, match="before any cloud node could be asked"):
        await ask_tier(
            "cloud", [node("a")], scripted({"a": ["ok"]}, log),
            attempts=3, retry=RETRY, deadline=loop.time() - 1,
        )  # fmt: skip
    assert log == []


def test_backoff_doubles_with_jitter_up_to_the_max() -> None:
    retry = RetrySettings(backoff_initial_s=0.1, backoff_max_s=0.3)
    assert [backoff_s(retry, i, lambda: 1.0) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]
    assert backoff_s(retry, 1, lambda: 0.0) == pytest.approx(0.1)  # half of 0.2


def test_backoff_never_overflows() -> None:
    assert backoff_s(RetrySettings(), 10_000, lambda: 1.0) == RetrySettings().backoff_max_s
    no_wait = RetrySettings(backoff_initial_s=10.0, backoff_max_s=0.0)
    assert backoff_s(no_wait, 1024, lambda: 1.0) == 0.0  # 2**1024 overflowed a float


def test_edge_deadline_leaves_the_cloud_its_time_or_skips_the_edge() -> None:
    edge, cloud = node("e", latency=1.0), node("c", latency=0.5)
    # No deadline: nothing to split.
    assert edge_deadline(0.0, None, [edge], [cloud], True) == (None, "")
    # 3 s left: the edge may take 2.5 s, leaving the cloud its 0.5 s.
    assert edge_deadline(0.0, 3.0, [edge], [cloud], True) == (2.5, "")
    # 1.2 s left: 1 s + 0.5 s does not fit, the cloud alone does: skip the edge.
    by, why = edge_deadline(0.0, 1.2, [edge], [cloud], True)
    assert by == 1.2 and why.startswith("the edge (~1000 ms expected) and then the cloud (~500 ms)")
    # 0.4 s left: not even the cloud fits, so the edge is the only chance.
    assert edge_deadline(0.0, 0.4, [edge], [cloud], True) == (0.4, "")
    # A pinned request has no cloud fallback: the edge gets all of it.
    assert edge_deadline(0.0, 1.2, [edge], [cloud], False) == (1.2, "")
    # Nothing known of the edge: asked, with the cloud's share kept back.
    assert edge_deadline(0.0, 3.0, [node("new")], [cloud], True) == (2.5, "")


def test_latency_estimate() -> None:
    estimate = LatencyEstimate()
    assert estimate.seconds is None
    estimate.observe(1.0)
    assert estimate.seconds == 1.0
    estimate.observe(2.0)
    assert estimate.seconds == pytest.approx(1.3)  # 1.0 + 0.3 × (2.0 − 1.0)
    estimate.observe_at_least(0.5)  # a timeout shorter than the estimate says nothing new
    assert estimate.seconds == pytest.approx(1.3)
    estimate.observe_at_least(5.0)  # it waited 5 s and gave up: at least that slow
    assert estimate.seconds > 2.0
    assert LatencyEstimate(0.25).seconds == 0.25
