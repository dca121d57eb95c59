"""Building results with full provenance (GUIDE §4): which tier answered, the
confidence and estimator, the threshold and policy version, the escalation
code and reason, usage, and the latency breakdown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from router.cache import CacheEntry
from router.domain import Escalation, NodeAnswer, RouteResult, Tier, Timings
from router.plan import Plan
from router.policy import Decision

DEGRADED = "degraded"  # flag: the edge answer served because the cloud was down
OVER_BUDGET = "over_budget"  # flag: the edge answer served because the tenant's budget was spent
PINNED = "pinned"  # flag: a rule kept the request on the edge (privacy pin)
FORCED = "forced"  # flag: a rule forced the tier (debugging)
COALESCED = "coalesced"  # flag: this answer was shared with an identical request
SEMANTIC = "semantic"  # flag: a cache hit by a semantic (embedding) match, not the exact key
RESTARTED = "restarted"  # flag: streamed edge text was replaced (a Restart event was sent)


@dataclass
class Stopwatch:
    """Time spent waiting on nodes, to separate the router's own overhead."""

    started: float
    edge_ms: float = 0.0
    cloud_ms: float = 0.0

    @classmethod
    def start(cls) -> Stopwatch:
        return cls(time.perf_counter())

    @staticmethod
    def since(started: float) -> float:
        return (time.perf_counter() - started) * 1000.0

    def timings(self) -> Timings:
        total = self.since(self.started)
        waited = self.edge_ms + self.cloud_ms
        return Timings(total, self.edge_ms, self.cloud_ms, max(0.0, total - waited))


def cache_result(plan: Plan, entry: CacheEntry, watch: Stopwatch, version: str) -> RouteResult:
    return RouteResult(
        text=entry.text,
        tier=Tier.CACHE,
        source_tier=entry.source_tier,
        confidence=entry.confidence,
        estimator=entry.estimator,
        threshold=plan.facts.threshold,
        escalation=Escalation.NONE,
        escalation_reason="",
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        timings=watch.timings(),
        finish_reason=entry.finish_reason,
        model=entry.model,
        request_id=plan.request_id,
        policy_version=version,
    )


def _node_result(
    plan: Plan,
    answer: NodeAnswer,
    tier: Tier,
    confidence: float,
    estimator: str,
    decision: Decision,
    watch: Stopwatch,
    version: str,
) -> RouteResult:
    return RouteResult(
        text=answer.text,
        tier=tier,
        source_tier=None,
        confidence=confidence,
        estimator=estimator,
        threshold=plan.facts.threshold,
        escalation=decision.escalation,
        escalation_reason=decision.reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        timings=watch.timings(),
        finish_reason=answer.finish_reason,
        model=answer.model,
        request_id=plan.request_id,
        policy_version=version,
    )


def edge_result(
    plan: Plan, edge: NodeAnswer, decision: Decision, watch: Stopwatch, version: str
) -> RouteResult:
    confidence = 0.0 if edge.confidence is None else edge.confidence
    return _node_result(plan, edge, Tier.EDGE, confidence, edge.estimator, decision, watch, version)


def cloud_result(
    plan: Plan,
    edge: NodeAnswer | None,
    cloud: NodeAnswer,
    decision: Decision,
    watch: Stopwatch,
    version: str,
) -> RouteResult:
    """The cloud's answer; when the edge answered first its confidence is kept,
    so users see why the request escalated. Otherwise 1.0 (no edge judged it)."""
    if edge is not None:
        confidence, estimator = edge.confidence or 0.0, edge.estimator
    else:
        confidence, estimator = 1.0, ""
    return _node_result(plan, cloud, Tier.CLOUD, confidence, estimator, decision, watch, version)


def over_budget(result: RouteResult, budget_error: str) -> RouteResult:
    """An edge result served because the tenant's cloud budget could not pay
    for the escalation: flagged, explained."""
    return replace(
        result,
        escalation_reason=f"{result.escalation_reason}; but {budget_error}",
        flags=(*result.flags, OVER_BUDGET),
    )


def flagged(result: RouteResult, flag: str) -> RouteResult:
    return replace(result, flags=(*result.flags, flag))


def degraded(result: RouteResult, cloud_error: str) -> RouteResult:
    """An edge result served because every cloud node was down: flagged, explained."""
    return replace(
        result,
        escalation_reason=f"{result.escalation_reason}; but {cloud_error}",
        flags=(*result.flags, DEGRADED),
    )


def coalesced(result: RouteResult, plan: Plan, watch: Stopwatch) -> RouteResult:
    """A leader's result handed to an identical request that waited for it."""
    own = watch.timings()
    node_ms = result.timings.edge_ms + result.timings.cloud_ms
    return replace(
        result,
        request_id=plan.request_id,
        flags=(*result.flags, COALESCED),
        timings=Timings(
            own.total_ms,
            result.timings.edge_ms,
            result.timings.cloud_ms,
            max(0.0, own.total_ms - node_ms),
        ),
    )


def restarted(result: RouteResult) -> RouteResult:
    """A streamed result sent after a Restart event: flagged so it shows."""
    return replace(result, flags=(*result.flags, RESTARTED))
