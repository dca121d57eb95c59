"""The router's domain flow, one request at a time:

    validate → cache lookup → (over the edge budget? cloud : edge → judge) →
    cloud when escalated → cache admission → result with full provenance

Identical concurrent requests share one run (``Singleflight``). The streaming
variant judges the edge answer before streaming any of it, then either sends
it as one delta or relays the cloud's deltas. Decisions come from
``router.policy``, results from ``router.provenance``; this module only
sequences the calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router import provenance
from router.cache import CacheEntry, ResponseCache
from router.directory import least_loaded
from router.domain import Escalation, NodeAnswer, RouteRequest, RouteResult, Tier
from router.nodes import NodeClient, NodeRejected, NodeUnavailable, node_request
from router.plan import Plan, make_plan
from router.policy import (
    Decision,
    EdgeSignal,
    admission_refusal,
    judge_edge,
    may_serve_cached,
    pre_route,
)
from router.provenance import Stopwatch
from router.settings import RouterSettings
from router.singleflight import Singleflight
from tidegate.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeOutcome:
    decision: Decision
    answer: NodeAnswer | None  # None when the edge was skipped or failed


@dataclass(frozen=True)
class NodeState:
    name: str
    address: str
    tier: str  # "edge" | "cloud"
    healthy: bool
    model: str
    last_error: str
    registered: bool = False  # announced itself through the edge registry
    capacity: int = 1
    load: float = 0.0  # (reported + this router's in-flight) / capacity
    heartbeat_age_s: float = 0.0  # registered edges: since the last heartbeat


@dataclass(frozen=True)
class RouterStatus:
    nodes: tuple[NodeState, ...]
    cache_entries: int
    cache_hits: int  # requests answered from the cache
    cache_misses: int  # lookups that could not answer the request
    policy_version: str


class Pipeline:
    def __init__(
        self,
        settings: RouterSettings,
        edges: list[NodeClient],
        clouds: list[NodeClient],
        cache: ResponseCache | None,
    ) -> None:
        if not clouds:
            raise ValueError("the router needs at least one cloud node")
        self.settings = settings
        self.policy = settings.policy
        self.version = settings.policy.version
        self.edges = edges
        self.clouds = clouds
        self.cache = cache
        self.cache_hits = 0
        self.cache_misses = 0
        self._flights: Singleflight[RouteResult] = Singleflight()

    # -- unary -------------------------------------------------------------

    async def generate(self, request: RouteRequest, deadline: float | None = None) -> RouteResult:
        """Answer one request. ``deadline`` is on the event loop's clock."""
        watch = Stopwatch.start()
        plan = make_plan(request, self.settings)
        hit = await self._lookup(plan, watch)
        if hit is not None:
            return hit
        if not plan.cacheable:  # two sampled requests expect two samples: no sharing
            return await self._route(plan, deadline, watch)
        result, leader = await self._flights.run(
            plan.flight_key, lambda: self._route(plan, deadline, watch)
        )
        return result if leader else provenance.coalesced(result, plan, watch)

    async def _route(self, plan: Plan, deadline: float | None, watch: Stopwatch) -> RouteResult:
        edge = await self._ask_edge(plan, deadline, watch)
        if edge.decision.tier is Tier.EDGE:
            assert edge.answer is not None
            result = provenance.edge_result(plan, edge.answer, edge.decision, watch, self.version)
        else:
            try:
                cloud = await self._ask_cloud(plan, deadline, watch)
            except Unavailable as exc:
                return self._degraded_or_raise(plan, edge, watch, exc)
            result = provenance.cloud_result(
                plan, edge.answer, cloud, edge.decision, watch, self.version
            )
        await self._admit(plan, result)
        return result

    # -- streaming ---------------------------------------------------------

    async def stream(
        self, request: RouteRequest, deadline: float | None = None
    ) -> AsyncIterator[str | RouteResult]:
        """Text deltas, then the RouteResult (whose text is the whole answer).

        The edge answer is judged before any of it is sent. A cloud stream cut
        after its first delta is UNAVAILABLE (the client holds partial text; a
        retry elsewhere would duplicate it); before it, the next cloud is tried.
        Only complete streams reach the cache.
        """
        watch = Stopwatch.start()
        plan = make_plan(request, self.settings)
        hit = await self._lookup(plan, watch)
        if hit is not None:
            yield hit.text
            yield hit
            return
        edge = await self._ask_edge(plan, deadline, watch)
        if edge.decision.tier is Tier.EDGE:
            assert edge.answer is not None
            result = provenance.edge_result(plan, edge.answer, edge.decision, watch, self.version)
            yield result.text
            await self._admit(plan, result)
            yield result
            return
        request_pb = node_request(plan.request.messages, plan.sampling, plan.request_id)
        failures: list[NodeUnavailable] = []
        for node in self.clouds:
            sent = False
            answer: NodeAnswer | None = None
            started = time.perf_counter()
            try:
                async for item in node.stream(request_pb, deadline):
                    if isinstance(item, NodeAnswer):
                        answer = item
                    else:
                        sent = True
                        yield item
            except NodeUnavailable as exc:
                if sent:
                    raise Unavailable(
                        f"cloud node {node.name} at {node.address} cut the stream: {exc.detail}"
                    ) from exc
                failures.append(exc)
                continue
            except NodeRejected as exc:
                raise self._rejected_by_cloud(exc) from exc
            finally:
                watch.cloud_ms += Stopwatch.since(started)
            assert answer is not None  # NodeClient.stream raises when it is missing
            result = provenance.cloud_result(
                plan, edge.answer, answer, edge.decision, watch, self.version
            )
            if not sent and result.text:
                yield result.text
            await self._admit(plan, result)
            yield result
            return
        result = self._degraded_or_raise(plan, edge, watch, self._cloud_down(failures))
        yield result.text
        yield result

    # -- steps -------------------------------------------------------------

    async def _lookup(self, plan: Plan, watch: Stopwatch) -> RouteResult | None:
        if self.cache is None or not plan.cacheable:
            return None
        try:
            entry = await self.cache.get(plan.key)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
            log.warning("cache lookup failed, answering without it: %s", exc)
            entry = None
        if entry is None or not may_serve_cached(
            entry.source_tier, entry.confidence, plan.facts.threshold
        ):
            self.cache_misses += 1
            return None
        self.cache_hits += 1
        return provenance.cache_result(plan, entry, watch, self.version)

    async def _ask_edge(self, plan: Plan, deadline: float | None, watch: Stopwatch) -> EdgeOutcome:
        skip = pre_route(plan.facts, self.policy, has_edge=bool(self.edges))
        if skip is not None:
            return EdgeOutcome(skip, None)
        request_pb = node_request(plan.request.messages, plan.sampling, plan.request_id)
        failures: list[str] = []
        # Healthy nodes first; each is tried once, so a dead edge costs one attempt.
        for node in self.candidate_edges():
            started = time.perf_counter()
            try:
                answer = await node.generate(request_pb, deadline)
            except NodeUnavailable as exc:
                failures.append(
                    f"edge node {node.name} at {node.address} is unavailable ({exc.detail})"
                )
                continue
            except NodeRejected as exc:
                # The router validated the request by the nodes' own rules, so the
                # edge refuses what does not fit it (a prompt over its context):
                # the cloud's context is larger. Only a cloud refusal reaches the client.
                decision = Decision.escalate(
                    Escalation.OVER_EDGE_BUDGET,
                    f"edge node {node.name} rejected the request ({exc.detail}); "
                    "asking the cloud, whose context is larger",
                )
                return EdgeOutcome(decision, None)
            finally:
                watch.edge_ms += Stopwatch.since(started)
            signal = EdgeSignal(answer.confidence, answer.estimator, answer.finish_reason)
            return EdgeOutcome(judge_edge(signal, plan.facts, self.policy), answer)
        return EdgeOutcome(
            Decision.escalate(Escalation.EDGE_UNAVAILABLE, "; ".join(failures)), None
        )

    def candidate_edges(self) -> list[NodeClient]:
        """The edges to try, in order: healthy first, then least loaded
        (``router.directory``). ``self.edges`` also holds registered edges."""
        return least_loaded(self.edges)

    async def _ask_cloud(self, plan: Plan, deadline: float | None, watch: Stopwatch) -> NodeAnswer:
        """The first cloud node that answers; each is tried once, in order."""
        request_pb = node_request(plan.request.messages, plan.sampling, plan.request_id)
        failures: list[NodeUnavailable] = []
        for node in self.clouds:
            started = time.perf_counter()
            try:
                return await node.generate(request_pb, deadline)
            except NodeUnavailable as exc:
                failures.append(exc)
            except NodeRejected as exc:
                raise self._rejected_by_cloud(exc) from exc
            finally:
                watch.cloud_ms += Stopwatch.since(started)
        raise self._cloud_down(failures)

    @staticmethod
    def _cloud_down(failures: list[NodeUnavailable]) -> Unavailable:
        return Unavailable(
            "; ".join(
                f"cloud node {f.node.name} at {f.node.address} is unavailable: {f.detail}"
                for f in failures
            )
        )

    @staticmethod
    def _rejected_by_cloud(exc: NodeRejected) -> InvalidArgument:
        return InvalidArgument(f"cloud node {exc.node.name} rejected the request: {exc.detail}")

    def _degraded_or_raise(
        self, plan: Plan, edge: EdgeOutcome, watch: Stopwatch, exc: Unavailable
    ) -> RouteResult:
        """Every cloud node is down: the edge answer flagged degraded, or the error."""
        if self.policy.on_cloud_unavailable != "degraded" or edge.answer is None:
            raise exc
        result = provenance.edge_result(plan, edge.answer, edge.decision, watch, self.version)
        return provenance.degraded(result, str(exc))

    async def _admit(self, plan: Plan, result: RouteResult) -> None:
        """Store the answer when the admission rules allow it (router.policy)."""
        if self.cache is None or result.tier is Tier.CACHE or provenance.DEGRADED in result.flags:
            return
        source = result.tier
        confidence = result.confidence if source is Tier.EDGE else 1.0
        refusal = admission_refusal(
            source,
            confidence,
            result.finish_reason,
            plan.sampling.is_sampled,
            plan.facts.threshold,
            self.policy,
            self.settings.cache.cache_sampled,
        )
        if refusal is not None or result.finish_reason is None:
            log.debug("not caching %s: %s", plan.request_id, refusal)
            return
        entry = CacheEntry(
            text=result.text,
            source_tier=source,
            model=result.model,
            confidence=confidence,
            estimator=result.estimator if source is Tier.EDGE else "",
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        try:
            await self.cache.put(plan.key, entry, self.settings.cache.ttl_s)
        except Exception as exc:  # noqa: BLE001 - the answer is good; only caching failed
            log.warning("cache store failed: %s", exc)

    # -- status and lifecycle ----------------------------------------------

    async def status(self) -> RouterStatus:
        """Probes every node (Info, 1 s) so Status shows live health."""
        nodes = [*self.edges, *self.clouds]
        await asyncio.gather(*(node.probe() for node in nodes))
        entries = 0
        if self.cache is not None:
            try:
                entries = (await self.cache.stats()).entries
            except Exception as exc:  # noqa: BLE001 - Status must answer regardless
                log.warning("cache stats failed: %s", exc)
        return RouterStatus(
            nodes=tuple(
                NodeState(
                    n.name,
                    n.address,
                    n.tier,
                    n.health.healthy,
                    n.health.model,
                    n.health.last_error,
                    registered=n.registered,
                    capacity=n.capacity,
                    load=n.load(),
                    heartbeat_age_s=(
                        max(0.0, time.time() - n.heartbeat_at) if n.heartbeat_at else 0.0
                    ),
                )
                for n in nodes
            ),
            cache_entries=entries,
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            policy_version=self.version,
        )

    async def close(self) -> None:
        for node in [*self.edges, *self.clouds]:
            await node.close()
        if self.cache is not None:
            await self.cache.close()
