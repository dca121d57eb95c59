"""The router's domain flow, one request at a time:

    validate → cache lookup → (over the edge budget? cloud : edge → judge) →
    cloud when escalated → cache admission → result with full provenance

Identical concurrent requests, unary or streamed, share one run
(``router.flights``; how their deadlines meet: ``Pipeline._shared``). The
streaming flow and its semantics live in ``router.streaming``. Decisions come
from ``router.policy``, results from ``router.provenance``; this module only
sequences the calls.

Cache reads and admission go through ``router.cache_gate``; what the router
reports about itself (Status, budget standing) is ``router.status``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from router import provenance, tiers
from router.auth import Authenticator, Tenant, TenantConfig
from router.budgets import BudgetExceeded, open_budgets
from router.cache import ResponseCache
from router.cache_gate import CacheGate
from router.directory import least_loaded
from router.domain import Escalation, NodeAnswer, Restart, RouteRequest, RouteResult, Tier
from router.failover import DEADLINE_SLACK_S, TierUnavailable
from router.flights import Flights, Subscription, once
from router.metrics import RouterMetrics
from router.nodes import NodeClient, NodeRejected, NodeUnavailable
from router.plan import Plan, make_plan
from router.provenance import Stopwatch
from router.settings import RouterSettings
from router.status import RouterStatus, router_status
from router.streaming import StreamEvent, StreamRoute, with_whole_text
from router.tiers import EdgeOutcome
from tidegate.errors import DeadlineExceeded, InvalidArgument, TidegateError, Unavailable
from tidegate.logs import bind_request_id

log = logging.getLogger(__name__)

# A run of one request's work: its events, with edge tokens streamed early
# (and so a Restart) allowed or not (``StreamRoute.may_restart``).
Work = Callable[[bool], AsyncIterator[StreamEvent]]


class RanOutOfTime(Exception):
    """A shared run failed once its own deadline (its first caller's) had passed.
    ``error`` is what a lone request would have got."""

    def __init__(self, error: TidegateError) -> None:
        super().__init__(str(error))
        self.error = error


async def _marked(
    events: AsyncIterator[StreamEvent], deadline: float | None
) -> AsyncIterator[StreamEvent]:
    """``events``; a failure at or past ``deadline`` becomes RanOutOfTime, so the
    callers sharing the run can tell it from the tier failing."""
    try:
        async for event in events:
            yield event
    except TidegateError as exc:
        if (
            deadline is not None
            and asyncio.get_running_loop().time() >= deadline - DEADLINE_SLACK_S
        ):
            raise RanOutOfTime(exc) from exc
        raise


async def _until(
    flight: Subscription[StreamEvent], deadline: float | None
) -> AsyncIterator[StreamEvent]:
    """The flight's events, until this caller's own ``deadline`` passes."""
    events = aiter(flight)
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # per event: never across a yield
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    "the deadline passed while waiting for the answer of an identical request"
                ) from None
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]


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
        # Cache reads and writes, and their hit/miss counters (router.cache_gate).
        self.cache_gate = CacheGate(cache, edges, clouds)
        self.metrics: RouterMetrics | None = None  # set by router.service when enabled
        self._flights: Flights[StreamEvent] = Flights()
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
        hit = await self.cache_gate.lookup(plan, watch, self.version, deadline)
        if hit is not None:
            return hit
        if not plan.cacheable:  # two sampled requests expect two samples: no sharing
            return await self._route(plan, deadline, watch)

        def run(may_restart: bool) -> AsyncIterator[RouteResult]:
            return once(lambda: self._route(plan, deadline, watch))

        result = None
        async for event in self._shared(plan, deadline, watch, run, streamed=False):
            if isinstance(event, RouteResult):  # a stream's flight also carries deltas
                result = event
        assert result is not None
        return result

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
        await self.cache_gate.admit(plan, result, self.settings)
        return result

    async def _begin(self, plan: Plan, deadline: float | None) -> float | None:
        """Count the request against the tenant's requests/s (RESOURCE_EXHAUSTED
        past it); the deadline node calls must meet (``tiers.request_deadline``)."""
        await self.budgets.admit(plan.request.tenant)
        return tiers.request_deadline(plan, deadline, self.policy.deadline_margin_s)

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
        hit = await self.cache_gate.lookup(plan, watch, self.version, deadline)
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

        def run(may_restart: bool) -> AsyncIterator[StreamEvent]:
            return StreamRoute(self, plan, deadline, watch, may_restart).events()

        async for event in with_whole_text(self._shared(plan, deadline, watch, run, streamed=True)):
            yield event

    async def _shared(
        self, plan: Plan, deadline: float | None, watch: Stopwatch, run: Work, streamed: bool
    ) -> AsyncIterator[StreamEvent]:
        """This caller's events from the one run identical requests share.

        The run belongs to its first caller and has that caller's deadline: it
        plans the edge and calls the nodes exactly as a lone request would, so
        deadlines still reach the nodes. Each caller waits only until its own
        deadline (DEADLINE_EXCEEDED). When the run fails at its first caller's
        deadline, a caller that joined it and still has time is answered by a
        run of its own (one more model call, only when identical requests have
        different deadlines). A stream that already received the shared run's
        text is first told to discard it (Restart, code DEADLINE); a stream gets
        at most one Restart, so one that had a Restart and text after it gets
        the shared run's error instead.
        """
        flight = self._flights.join(plan.flight_key, lambda: _marked(run(True), deadline))
        # Node calls end deadline_margin_s early to leave the router its own
        # work; a caller waiting on someone else's run may wait out all of it.
        gives_up = None if deadline is None else deadline + self.policy.deadline_margin_s
        text = restarted = False  # a stream received: text since the last Restart; a Restart
        try:
            async for event in _until(flight, gives_up):
                if isinstance(event, RouteResult):
                    event = event if flight.leader else provenance.coalesced(event, plan, watch)
                elif streamed and isinstance(event, Restart):
                    text, restarted = False, True
                elif streamed and event:
                    text = True
                yield event
            return
        except RanOutOfTime as exc:
            now = asyncio.get_running_loop().time()
            has_time = deadline is None or now < deadline - DEADLINE_SLACK_S
            if flight.leader or not has_time or (text and restarted):
                raise exc.error from None
            cut = exc.error
        if text:
            restarted = True
            yield Restart(
                Escalation.DEADLINE,
                f"the answer being streamed was shared with an identical request and cut "
                f"at that request's deadline ({cut}); answering again",
            )
        async for event in run(not restarted):
            if restarted and isinstance(event, RouteResult):
                event = provenance.restarted(event)
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

    # -- status and lifecycle ----------------------------------------------

    async def status(self, tenant: Tenant | None = None) -> RouterStatus:
        """Live node health, cache counters and budgets (``router.status``)."""
        return await router_status(self, tenant)

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
        await self.cache_gate.close()
        for node in [*self.edges, *self.clouds]:
            await node.close()
        await self.budgets.close()


def authenticator(settings: RouterSettings) -> Authenticator:
    """The API-key authenticator for ``settings.tenants`` (off when empty)."""
    return Authenticator(
        [TenantConfig(t.name, tuple(t.api_key_hashes), t.admin) for t in settings.tenants]
    )
