"""Asking one tier's nodes: bounded attempts, backoff, deadlines, cooled-down nodes.

``ask_tier`` makes at most ``attempts`` calls. It first spreads them over the
tier's nodes, in the order given (the pipeline passes edges least loaded
first, clouds in config order); only then does it ask a node again, after a
backoff that doubles each round (with jitter, so replicas do not retry in
step). A node that timed out is not asked again for the same request (it would
most likely time out again), and a node whose circuit breaker is open is not
asked at all; nor again is one that turned out to be cooling down (a half-open
trial call in flight), so the request fails over at once instead of waiting
out the trial. A node refusing the request (``NodeRejected``) ends the tier at
once: the request, not the node, is the problem.

There is no fallback loop by construction: the pipeline asks the edge tier at
most once and the cloud tier at most once, always in that order; a failed
cloud never sends a request back to the edge.

The deadline functions decide how the client's deadline is shared: the router
keeps ``policy.deadline_margin_s`` for itself, and an edge attempt gets only
what leaves the cloud its expected latency; when even the edge's expected
latency does not fit in that, the edge is skipped (escalation DEADLINE).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from router.guard_settings import RetrySettings
from router.nodes import NodeClient, NodeCoolingDown, NodeUnavailable
from tidegate.errors import DeadlineExceeded, Unavailable

T = TypeVar("T")

DEADLINE_SLACK_S = 0.005  # timers fire a hair early: this close to it, the deadline has passed
# Doublings of the backoff past which it is at backoff_max_s anyway (any initial
# wait above 1e-18 s); capping the exponent keeps 2**n from overflowing a float.
MAX_BACKOFF_DOUBLINGS = 64


def describe_failures(failures: Sequence[NodeUnavailable]) -> list[str]:
    """One line per node, in order of first failure: its last error, and how
    many attempts failed when more than one."""
    by_node: dict[int, list[NodeUnavailable]] = {}
    for failure in failures:
        by_node.setdefault(id(failure.node), []).append(failure)
    lines = []
    for attempts in by_node.values():
        last = attempts[-1]
        count = f" ({len(attempts)} attempts)" if len(attempts) > 1 else ""
        lines.append(
            f"{last.node.tier} node {last.node.name} at {last.node.address} is "
            f"unavailable: {last.detail}{count}"
        )
    return lines


class TierUnavailable(Unavailable):
    """No node of a tier answered; the message names each node and its error."""

    def __init__(self, tier: str, failures: Sequence[NodeUnavailable], note: str = "") -> None:
        self.tier = tier
        self.failures = list(failures)
        lines = describe_failures(failures)
        if note:
            lines.append(note)
        super().__init__("; ".join(lines) or f"no {tier} node is configured")


def backoff_s(retry: RetrySettings, round_index: int, rng: Callable[[], float]) -> float:
    """Round 0 waits ~initial, each later round twice as long, up to the max;
    "equal jitter": between half and all of that."""
    doubled = retry.backoff_initial_s * 2.0 ** min(round_index, MAX_BACKOFF_DOUBLINGS)
    base = min(retry.backoff_max_s, doubled)
    return base * (0.5 + 0.5 * rng())


async def ask_tier(
    tier: str,
    nodes: Sequence[NodeClient],
    call: Callable[[NodeClient, float | None], Awaitable[T]],
    *,
    attempts: int,
    retry: RetrySettings,
    deadline: float | None,
    rng: Callable[[], float] = random.random,
) -> T:
    """The first answer of ``call(node, deadline)`` over the tier's nodes.

    Raises TierUnavailable when every attempt failed, DeadlineExceeded when the
    deadline passed before any node could be asked, and NodeRejected at once.
    """
    loop = asyncio.get_running_loop()
    failures: list[NodeUnavailable] = []
    cooling = [n for n in nodes if n.breaker.cooldown_remaining() > 0]  # not asked at all
    order = [n for n in nodes if n not in cooling]
    queue = list(order)
    skipped: set[int] = set()  # not asked again for this request: timed out, or cooling down
    made = 0
    rounds = 0
    note = ""
    while made < attempts:
        if not queue:
            queue = [
                n for n in order if id(n) not in skipped and n.breaker.cooldown_remaining() == 0
            ]
            if not queue:
                break
            wait = backoff_s(retry, rounds, rng)
            rounds += 1
            if deadline is not None and loop.time() + wait >= deadline:
                note = "the deadline left no time to retry"
                break
            await asyncio.sleep(wait)
        node = queue.pop(0)
        if deadline is not None and loop.time() >= deadline:
            if made == 0:
                raise DeadlineExceeded(f"the deadline passed before any {tier} node could be asked")
            note = "the deadline left no time to retry"
            break
        try:
            return await call(node, deadline)
        except NodeCoolingDown as exc:
            # Not an attempt (the node was not contacted), but not worth asking
            # again either: its half-open trial may take up to a cooldown.
            # Asking it every round would spin on it instead of failing over.
            failures.append(exc)
            skipped.add(id(node))
        except NodeUnavailable as exc:
            made += 1
            failures.append(exc)
            if exc.timed_out:
                skipped.add(id(node))
    failures += [_cooling_failure(n) for n in cooling]
    raise_if_past_deadline(deadline, tier, failures)
    raise TierUnavailable(tier, failures, note)


def raise_if_past_deadline(
    deadline: float | None, tier: str, failures: Sequence[NodeUnavailable]
) -> None:
    """DeadlineExceeded once the request has run out of time: its last attempt was
    cut at the deadline, which is the client's DEADLINE_EXCEEDED, not the tier down
    (nor a reason for a degraded answer)."""
    if deadline is not None and asyncio.get_running_loop().time() >= deadline - DEADLINE_SLACK_S:
        raise DeadlineExceeded(
            f"the deadline passed while asking the {tier} tier: "
            + "; ".join(describe_failures(failures))
        )


def _cooling_failure(node: NodeClient) -> NodeCoolingDown:
    snap = node.breaker.snapshot()
    return NodeCoolingDown(
        node,
        f"cooling down after {snap.consecutive_failures} consecutive failures "
        f"(last: {snap.last_error}); next try in {snap.cooldown_remaining_s:.1f} s",
    )


def expected_latency(nodes: Sequence[NodeClient]) -> float | None:
    """The best expected latency among nodes that may be asked now (None: unknown)."""
    known = [
        s
        for n in nodes
        if n.breaker.cooldown_remaining() == 0 and (s := n.latency.seconds) is not None
    ]
    return min(known) if known else None


def edge_deadline(
    now: float,
    deadline: float | None,
    edges: Sequence[NodeClient],
    clouds: Sequence[NodeClient],
    cloud_fallback: bool,
) -> tuple[float | None, str]:
    """(the deadline to give the edge, why the edge should be skipped or "").

    ``deadline`` already has the router's margin taken off. With a cloud
    fallback, the edge gets what leaves the cloud its expected latency, and is
    skipped when its own expected latency does not fit in that (as long as the
    cloud alone fits: otherwise the edge is the only chance).
    """
    if deadline is None:
        return None, ""
    if not cloud_fallback:
        return deadline, ""
    left = deadline - now
    cloud_s = expected_latency(clouds) or 0.0
    edge_s = expected_latency(edges)
    if edge_s is not None and edge_s + cloud_s > left and cloud_s <= left:
        return deadline, (
            f"the edge (~{edge_s * 1000:.0f} ms expected) and then the cloud "
            f"(~{cloud_s * 1000:.0f} ms) do not fit in the {left * 1000:.0f} ms left "
            "before the deadline"
        )
    if cloud_s < left:
        return deadline - cloud_s, ""
    return deadline, ""
