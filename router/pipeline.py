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

from router import provenance, tiers
from router.auth import Authenticator, Tenant, TenantConfig
from router.budgets import BudgetExceeded, BudgetUsage, open_budgets
from router.cache import CacheEntry, EmbeddedCache, ResponseCache
from router.directory import least_loaded
from router.domain import NodeAnswer, Restart, RouteRequest, RouteResult, Tier
from router.failover import TierUnavailable
from router.flights import Flights, once
from router.metrics import RouterMetrics
from router.nodes import NodeClient, NodeRejected, NodeUnavailable
from router.plan import Plan, make_plan
from router.policy import admission_refusal, may_serve_cached
from router.provenance import Stopwatch
from router.semantic_cache import SemanticIndex
from router.settings import RouterSettings
from router.streaming import StreamEvent, StreamRoute, with_whole_text
from router.tiers import EdgeOutcome, edge_rejected  # noqa: F401 - re-exported (router.streaming)
from tidegate.errors import InvalidArgument, TidegateError, Unavailable
from tidegate.logs import bind_request_id

log = logging.getLogger(__name__)

# How often the router may re-ask a tier's nodes for their model (Info) while it
# knows none of them: a lookup must not probe dead nodes on every request.
MODEL_PROBE_INTERVAL_S = 5.0


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
    breaker: str = "closed"  # "closed" | "open" | "half_open"
    expected_latency_ms: float = 0.0  # moving average (0: nothing measured yet)


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
    last_reload_error: str = ""  # the last rejected config reload, with why


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
        self.metrics: RouterMetrics | None = None  # set by router.service when enabled
        self._flights: Flights[StreamEvent] = Flights()
        self._model_probed_at: dict[Tier, float] = {}
        # Guards (router.tiers): who may ask, how much, and where. ``apply``
        # swaps them on a config reload.
        self.auth = authenticator(settings)
        self.budgets = open_budgets(settings.budgets, settings.cache.url)
        self.last_reload_error = ""
        for node in [*edges, *clouds]:
            node.breaker.settings = settings.breaker

    # -- unary -------------------------------------------------------------

    async def generate(self, request: RouteRequest, deadline: float | None = None) -> RouteResult:
        """Answer one request. ``deadline`` is on the event loop's clock."""
        bind_request_id(request.request_id)
        try:
            result = await self._generate(request, deadline)
        except Exception as exc:
            self._failed("generate", request, exc)
            raise
        self._finished("generate", request, result)
        return result

    async def _generate(self, request: RouteRequest, deadline: float | None) -> RouteResult:
        watch = Stopwatch.start()
        plan = make_plan(request, self.settings)
        bind_request_id(plan.request_id)
        deadline = await self._begin(plan, deadline)
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
            except BudgetExceeded as exc:
                return tiers.over_budget_or_raise(self, plan, edge, watch, exc)
            except Unavailable as exc:
                return self._degraded_or_raise(plan, edge, watch, exc)
            result = provenance.cloud_result(
                plan, edge.answer, cloud, edge.decision, watch, self.version
            )
        if plan.rule.route != "auto":
            flag = provenance.PINNED if plan.rule.pinned else provenance.FORCED
            result = provenance.flagged(result, flag)
        await self._admit(plan, result)
        return result

    async def _begin(self, plan: Plan, deadline: float | None) -> float | None:
        """Count the request against the tenant's requests/s (RESOURCE_EXHAUSTED
        past it); the deadline node calls must meet (``tiers.request_deadline``)."""
        await self.budgets.admit(plan.request.tenant)
        return tiers.request_deadline(plan, deadline, self.policy.deadline_margin_s)

    def _may_share_cache(self, plan: Plan) -> bool:
        """A forced tier skips the cache; a privacy-pinned request uses only an
        in-process cache, never a shared one (an unknown kind counts as shared)."""
        if plan.rule.forced:
            return False
        return not plan.rule.pinned or isinstance(self.cache, EmbeddedCache)

    # -- streaming ---------------------------------------------------------

    async def stream(
        self, request: RouteRequest, deadline: float | None = None
    ) -> AsyncIterator[str | Restart | RouteResult]:
        """Text deltas, at most one Restart, then the RouteResult (whose text is
        the whole answer). Semantics: ``router.streaming``."""
        bind_request_id(request.request_id)
        try:
            async for event in self._stream(request, deadline):
                if isinstance(event, RouteResult):
                    self._finished("stream", request, event)
                yield event
        except Exception as exc:
            self._failed("stream", request, exc)
            raise

    async def _stream(
        self, request: RouteRequest, deadline: float | None
    ) -> AsyncIterator[str | Restart | RouteResult]:
        watch = Stopwatch.start()
        plan = make_plan(request, self.settings)
        bind_request_id(plan.request_id)
        deadline = await self._begin(plan, deadline)
        hit = await self._lookup(plan, watch)
        if hit is not None:
            if hit.text:
                yield hit.text
            yield hit
            return
        if plan.rule.route != "auto":
            # The unary flow enforces rules (router.tiers): a pinned request never
            # reaches the cloud. Its answer goes out as one delta. (Budgets are
            # reserved and settled by the stream itself: router.streaming.)
            result = await self._route(plan, deadline, watch)
            if result.text:
                yield result.text
            yield result
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

    # -- observation -------------------------------------------------------

    def _finished(self, rpc: str, request: RouteRequest, result: RouteResult) -> None:
        if self.metrics is not None:
            self.metrics.finished(rpc, request.tenant, result)
        if not log.isEnabledFor(logging.INFO):
            return  # the access log is off: skip building its fields (the hot path)
        log.info(
            "%s answered by %s in %.1f ms (router %.2f ms)%s",
            rpc,
            result.tier.label,
            result.timings.total_ms,
            result.timings.router_overhead_ms,
            f", escalated: {result.escalation_reason}" if result.escalation_reason else "",
            extra={
                "event": "request",
                "rpc": rpc,
                "request_id": result.request_id,
                "tenant": request.tenant,
                "tier": result.tier.label,
                "source_tier": result.source_tier.label if result.source_tier else None,
                "escalation": result.escalation.name.lower(),
                "flags": list(result.flags),
                "model": result.model,
                "total_ms": round(result.timings.total_ms, 3),
                "router_overhead_ms": round(result.timings.router_overhead_ms, 3),
            },
        )

    def _failed(self, rpc: str, request: RouteRequest, error: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.failed(rpc, request.tenant, error)
        code = error.code.name if isinstance(error, TidegateError) else "INTERNAL"
        log.info(
            "%s failed: %s: %s",
            rpc,
            code,
            error,
            extra={"event": "request", "rpc": rpc, "tenant": request.tenant, "code": code},
        )

    # -- steps -------------------------------------------------------------

    async def _lookup(self, plan: Plan, watch: Stopwatch) -> RouteResult | None:
        """A cached answer for the plan: the exact key first, then (opt-in) a
        guarded semantic match. None when nothing may answer it."""
        if (
            self.cache is None
            or not plan.cacheable
            or not plan.reads_cache
            or not self._may_share_cache(plan)
        ):
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
        """Rules, deadline, retries and breakers, then the judged edge answer."""
        return await tiers.ask_edge(self, plan, deadline, watch)

    def candidate_edges(self) -> list[NodeClient]:
        """The edges to try, in order: healthy first, then least loaded
        (``router.directory``). ``self.edges`` also holds registered edges."""
        return least_loaded(self.edges)

    async def _ask_cloud(self, plan: Plan, deadline: float | None, watch: Stopwatch) -> NodeAnswer:
        """Budget reserved, bounded retries over the cloud nodes, budget settled."""
        return await tiers.ask_cloud(self, plan, deadline, watch)

    @staticmethod
    def _cloud_down(failures: list[NodeUnavailable]) -> Unavailable:
        return TierUnavailable("cloud", failures)

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
            or not self._may_share_cache(plan)
            or provenance.OVER_BUDGET in result.flags
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

    async def status(self, tenant: Tenant | None = None) -> RouterStatus:
        """Probes every node (Info, 1 s) so Status shows live health. Budgets:
        every tenant's for an admin ``tenant`` (or None), else its own."""
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
                    consecutive_failures=n.breaker.snapshot().consecutive_failures,
                    cooldown_remaining_s=n.breaker.cooldown_remaining(),
                    breaker=n.breaker.state.value,
                    expected_latency_ms=(n.latency.seconds or 0.0) * 1000.0,
                )
                for n in nodes
            ),
            cache_entries=entries,
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            policy_version=self.version,
            cache_semantic_hits=self.semantic_hits,
            cache_shared=self.settings.cache.url is not None,
            budgets=tuple(await self._status_budgets(tenant)),
            last_reload_error=self.last_reload_error,
        )

    async def _status_budgets(self, tenant: Tenant | None) -> list[BudgetUsage]:
        """Everyone's budgets for an admin (or with auth off), else the caller's own."""
        try:
            if tenant is None or tenant.admin or not tenant.authenticated:
                return await self.budget_usage()
            return await self.budget_usage([tenant.name])
        except Exception as exc:  # noqa: BLE001 - Status must answer regardless
            log.warning("budget usage unavailable: %s", exc)
            return []

    async def budget_usage(self, tenants: list[str] | None = None) -> list[BudgetUsage]:
        """Read-only: each tenant's standing per limited window (metrics read this).
        ``tenants`` None: every tenant the config names, and "" when the default
        limits apply to requests that name no tenant."""
        if tenants is None:
            named = [t.name for t in self.settings.tenants]
            named += [b.tenant for b in self.settings.budgets.tenants]
            tenants = named if self.auth.enabled else [*named, ""]
        return await self.budgets.usage(tenants)

    def apply(self, settings: RouterSettings) -> None:
        """Adopt a reloaded config (``router.reload`` picks the reloadable parts):
        policy, rules, tenants and keys, budget limits, retries, breaker."""
        self.settings = settings
        self.policy = settings.policy
        self.version = settings.policy.version
        self.auth = authenticator(settings)
        self.budgets.settings = settings.budgets
        for node in [*self.edges, *self.clouds]:
            node.breaker.settings = settings.breaker

    async def close(self) -> None:
        await self._flights.close()
        if self.semantic is not None:
            await self.semantic.close()
        for node in [*self.edges, *self.clouds]:
            await node.close()
        if self.cache is not None:
            await self.cache.close()
        await self.budgets.close()


def authenticator(settings: RouterSettings) -> Authenticator:
    """The API-key authenticator for ``settings.tenants`` (off when empty)."""
    return Authenticator(
        [TenantConfig(t.name, tuple(t.api_key_hashes), t.admin) for t in settings.tenants]
    )
