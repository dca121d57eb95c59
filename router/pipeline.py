"""The router's domain flow, one request at a time:

    validate → cache lookup → (over the edge budget? cloud : edge → judge) →
    cloud when escalated → cache admission → result with full provenance

Identical concurrent requests, unary or streamed, share one run
(``router.flights``). The streaming flow and its semantics live in
``router.streaming``. Decisions come from ``router.policy``, results from
``router.provenance``; this module only sequences the calls.

Cache reads and writes follow the request's ``cache_control`` (bypass,
refresh), and a cached entry answers only while the model that produced it is
still the one serving its tier (``_entry_is_current``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from router import provenance
from router.budgets import BudgetUsage
from router.cache import CacheEntry, ResponseCache
from router.directory import least_loaded
from router.domain import Escalation, NodeAnswer, Restart, RouteRequest, RouteResult, Tier
from router.flights import Flights, once
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
from router.semantic_cache import SemanticIndex
from router.settings import RouterSettings
from router.streaming import StreamEvent, StreamRoute, with_whole_text
from tidegate.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# How often the router may re-ask a tier's nodes for their model (Info) while it
# knows none of them: a lookup must not probe dead nodes on every request.
MODEL_PROBE_INTERVAL_S = 5.0


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
    consecutive_failures: int = 0
    cooldown_remaining_s: float = 0.0  # > 0: cooled down by its circuit breaker


@dataclass(frozen=True)
class RouterStatus:
    nodes: tuple[NodeState, ...]
    cache_entries: int
    cache_hits: int  # requests answered from the cache
    cache_misses: int  # lookups that could not answer the request
    policy_version: str
    cache_semantic_hits: int = 0  # of cache_hits: by a semantic match
    cache_shared: bool = False  # Redis
    budgets: tuple[BudgetUsage, ...] = ()


def edge_rejected(exc: NodeRejected) -> Decision:
    """An edge refused the request (INVALID_ARGUMENT): escalate.

    The router validated the request by the nodes' own rules, so the edge
    refuses what does not fit it (a prompt over its context): the cloud's
    context is larger. Only a cloud refusal reaches the client.
    """
    return Decision.escalate(
        Escalation.OVER_EDGE_BUDGET,
        f"edge node {exc.node.name} rejected the request ({exc.detail}); "
        "asking the cloud, whose context is larger",
    )


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
        self.semantic_hits = 0
        self.semantic: SemanticIndex | None = None  # set by router.service when enabled
        self._flights: Flights[StreamEvent] = Flights()
        self._model_probed_at: dict[Tier, float] = {}

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
        flight = self._flights.join(
            plan.flight_key, lambda: once(lambda: self._route(plan, deadline, watch))
        )
        result = None
        async for event in flight:  # a stream's flight also carries deltas
            if isinstance(event, RouteResult):
                result = event
        assert result is not None
        return result if flight.leader else provenance.coalesced(result, plan, watch)

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
    ) -> AsyncIterator[str | Restart | RouteResult]:
        """Text deltas, at most one Restart, then the RouteResult (whose text is
        the whole answer). Semantics: ``router.streaming``."""
        watch = Stopwatch.start()
        plan = make_plan(request, self.settings)
        hit = await self._lookup(plan, watch)
        if hit is not None:
            if hit.text:
                yield hit.text
            yield hit
            return
        if not plan.cacheable:
            events = StreamRoute(self, plan, deadline, watch).events()
            async for event in with_whole_text(events):
                yield event
            return
        flight = self._flights.join(
            plan.flight_key, lambda: StreamRoute(self, plan, deadline, watch).events()
        )
        async for event in with_whole_text(aiter(flight)):
            if isinstance(event, RouteResult) and not flight.leader:
                event = provenance.coalesced(event, plan, watch)
            yield event

    # -- steps -------------------------------------------------------------

    async def _lookup(self, plan: Plan, watch: Stopwatch) -> RouteResult | None:
        """A cached answer for the plan: the exact key first, then (opt-in) a
        guarded semantic match. None when nothing may answer it."""
        if self.cache is None or not plan.cacheable or not plan.reads_cache:
            return None
        entry = await self._cache_get(plan.key)
        semantic = False
        if entry is None and self.semantic is not None:
            key = await self.semantic.find(plan)
            entry = await self._cache_get(key) if key is not None else None
            semantic = entry is not None
        if (
            entry is None
            or not may_serve_cached(entry.source_tier, entry.confidence, plan.facts.threshold)
            or not await self._entry_is_current(entry)
        ):
            self.cache_misses += 1
            return None
        self.cache_hits += 1
        result = provenance.cache_result(plan, entry, watch, self.version)
        if semantic:
            self.semantic_hits += 1
            result = replace(result, flags=(*result.flags, provenance.SEMANTIC))
        return result

    async def _cache_get(self, key: str) -> CacheEntry | None:
        assert self.cache is not None
        try:
            return await self.cache.get(key)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
            log.warning("cache lookup failed, answering without it: %s", exc)
            return None

    async def _entry_is_current(self, entry: CacheEntry) -> bool:
        """Whether the model that produced ``entry`` still serves its tier.

        The router learns each node's model from its answers and its Info
        (probed here when a tier's models are not known yet, at most every
        MODEL_PROBE_INTERVAL_S). An entry whose model no node of its tier
        serves any more is a miss, and the fresh answer replaces it.
        """
        nodes = self.edges if entry.source_tier is Tier.EDGE else self.clouds
        models = {n.health.model for n in nodes if n.health.model}
        now = time.monotonic()
        probed = self._model_probed_at.get(entry.source_tier)
        if not models and nodes and (probed is None or now - probed >= MODEL_PROBE_INTERVAL_S):
            self._model_probed_at[entry.source_tier] = now
            await asyncio.gather(*(n.probe() for n in nodes))
            models = {n.health.model for n in nodes if n.health.model}
        return entry.model in models

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
                return EdgeOutcome(edge_rejected(exc), None)
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
        if (
            self.cache is None
            or not plan.writes_cache
            or result.tier is Tier.CACHE
            or provenance.DEGRADED in result.flags
        ):
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
            return
        if self.semantic is not None:
            await self.semantic.add(plan)

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
            cache_semantic_hits=self.semantic_hits,
            cache_shared=self.settings.cache.url is not None,
        )

    async def close(self) -> None:
        await self._flights.close()
        for node in [*self.edges, *self.clouds]:
            await node.close()
        if self.cache is not None:
            await self.cache.close()
