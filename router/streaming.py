"""GenerateStream through the router: what a streaming client receives, and when.

Events, in order: text deltas, at most one ``Restart``, more deltas, then the
final ``RouteResult`` (whose text is the whole answer) — or an error.

* **Edge answers are judged before they are streamed** (the default): the edge
  is asked as in a unary call and a kept answer is sent as one delta, so the
  client never receives text it would have to unsee.
* **Early edge tokens** (``stream.early_edge_tokens``): the edge's deltas are
  relayed as it decodes them. If the answer is then escalated, or the edge
  stream fails after sending text, a ``Restart`` (with the escalation code and
  reason) tells the client to discard them before any replacement text; the
  final result is flagged ``restarted``.
* **Cut or stalled node streams** fall back like failed calls: a stream that
  ends without its final chunk, errors, or sends no chunk for
  ``stream.idle_timeout_s`` is cut. An edge → the next edge, or the cloud. A
  cloud stream before its first delta → the next cloud node; after it, the
  client holds part of an answer that no other node would continue, so the
  stream ends with UNAVAILABLE saying so — never with another node's text
  appended.
* **Only complete answers are cached** (the same admission rules as unary).
* **Budgets** as in unary calls: the tenant's cloud budget is reserved before
  the first cloud stream and settled with the tokens it really used. A cloud
  stream cut (by its node or by the client) after text was sent is charged for
  that text (``tiers.cloud_charge``); one cut before is not charged.

This module is the flight's work (``router.flights``): identical streams in
flight share one run and receive the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from router import provenance
from router.budgets import BudgetExceeded
from router.domain import Escalation, NodeAnswer, Restart, RouteResult, Tier
from router.failover import edge_deadline, raise_if_past_deadline
from router.nodes import NodeClient, NodeRejected, NodeUnavailable, node_request
from router.plan import Plan
from router.policy import Decision, EdgeSignal, judge_edge, pre_route
from router.provenance import Stopwatch
from router.tiers import EdgeOutcome, edge_rejected
from tidegate.errors import DeadlineExceeded, Unavailable

if TYPE_CHECKING:
    from router.pipeline import Pipeline

StreamEvent = str | Restart | RouteResult


async def idle_guarded(
    node: NodeClient, chunks: AsyncIterator[str | NodeAnswer], idle_s: float
) -> AsyncIterator[str | NodeAnswer]:
    """``chunks``, cut with NodeUnavailable when none arrives for ``idle_s``."""
    iterator = aiter(chunks)
    try:
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                detail = f"stalled: no chunk for {idle_s:g} s (stream.idle_timeout_s)"
                node.health.failed(detail)
                node.breaker.record_failure(detail)
                raise NodeUnavailable(node, detail) from None
            yield item
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]  # cancels the node's call


class StreamRoute:
    """One streamed request's run, after the cache missed."""

    def __init__(
        self,
        pipeline: Pipeline,
        plan: Plan,
        deadline: float | None,
        watch: Stopwatch,
        may_restart: bool = True,
    ) -> None:
        self.p = pipeline
        self.plan = plan
        self.deadline = deadline
        self.watch = watch
        self.idle_s = pipeline.settings.stream.idle_timeout_s
        # False when the client already had its one Restart (router.pipeline
        # reruns a stream whose shared run was cut): edge tokens are then not
        # streamed early, since replacing them would need a second Restart.
        self.may_restart = may_restart
        self.edge_sent = False  # early edge deltas reached the client
        self.restarted = False
        self.edge: EdgeOutcome | None = None

    async def events(self) -> AsyncIterator[StreamEvent]:
        p, plan = self.p, self.plan
        if p.settings.stream.early_edge_tokens and self.may_restart:
            async for delta in self._edge_early():
                yield delta
        else:
            self.edge = await p._ask_edge(plan, self.deadline, self.watch)
        edge = self.edge
        assert edge is not None
        if edge.decision.tier is Tier.EDGE:
            assert edge.answer is not None
            result = provenance.edge_result(plan, edge.answer, edge.decision, self.watch, p.version)
            await p.cache_gate.admit(plan, result, p.settings)
            yield result
            return
        if self.edge_sent:
            self.restarted = True
            yield Restart(edge.decision.escalation, edge.decision.reason)
        async for event in self._cloud(edge):
            yield event

    def _request(self):  # type: ignore[no-untyped-def]
        return node_request(self.plan.request.messages, self.plan.sampling, self.plan.request_id)

    async def _edge_early(self) -> AsyncIterator[str]:
        """Relay the edge's deltas; leaves the judged outcome in ``self.edge``."""
        p, plan = self.p, self.plan
        skip = pre_route(plan.facts, p.policy, has_edge=bool(p.edges))
        if skip is not None:
            self.edge = EdgeOutcome(skip, None)
            return
        # As in unary calls: leave the cloud its expected time, or skip the edge.
        now = asyncio.get_running_loop().time()
        edge_by, too_late = edge_deadline(now, self.deadline, p.edges, p.clouds, True)
        if too_late:
            self.edge = EdgeOutcome(Decision.escalate(Escalation.DEADLINE, too_late), None)
            return
        failures: list[str] = []
        for node in p.candidate_edges():
            answer: NodeAnswer | None = None
            started = time.perf_counter()
            try:
                chunks = node.stream(self._request(), edge_by)
                async for item in idle_guarded(node, chunks, self.idle_s):
                    if isinstance(item, NodeAnswer):
                        answer = item
                    elif item:
                        self.edge_sent = True
                        yield item
            except NodeUnavailable as exc:
                failures.append(
                    f"edge node {node.name} at {node.address} is unavailable ({exc.detail})"
                )
                if self.edge_sent:
                    break  # its text reached the client: restart, and let the cloud answer
                continue
            except DeadlineExceeded as exc:  # the edge's share of the deadline is used up
                failures.append(str(exc))
                break
            except NodeRejected as exc:
                self.edge = EdgeOutcome(edge_rejected(exc), None)
                return
            finally:
                self.watch.edge_ms += Stopwatch.since(started)
            assert answer is not None  # NodeClient.stream raises when it is missing
            signal = EdgeSignal(answer.confidence, answer.estimator, answer.finish_reason)
            self.edge = EdgeOutcome(judge_edge(signal, plan.facts, p.policy), answer)
            return
        reason = "; ".join(failures)
        self.edge = EdgeOutcome(Decision.escalate(Escalation.EDGE_UNAVAILABLE, reason), None)

    async def _cloud(self, edge: EdgeOutcome) -> AsyncIterator[StreamEvent]:
        from router import tiers

        try:
            reservation = await tiers.reserve_cloud(self.p, self.plan)
        except BudgetExceeded as exc:
            result = tiers.over_budget_or_raise(self.p, self.plan, edge, self.watch, exc)
            yield provenance.restarted(result) if self.restarted else result
            return
        except Unavailable as exc:  # the budget store is down: as unary calls, by policy
            result = self.p._degraded_or_raise(self.plan, edge, self.watch, exc)
            yield provenance.restarted(result) if self.restarted else result
            return
        # the node's own counts (prompt, completion), sent with its final message
        spent: tuple[int, int] | None = None
        delivered: list[str] = []  # cloud text the client already holds
        try:
            async for event in self._cloud_streams(edge):
                if isinstance(event, str):
                    delivered.append(event)
                elif isinstance(event, RouteResult) and event.tier is Tier.CLOUD:
                    spent = (event.prompt_tokens, event.completion_tokens)
                yield event
        finally:
            # The node counts tokens only in its final message, which a cut stream never
            # brings (spent None): refunding would make the text the client already holds
            # free, and a sampled stream, never coalesced, can be cut again and again. A
            # node sends a delta once at least one more token is decoded: a token each.
            prompt, completion = spent or (None, None)
            text = "".join(delivered)
            charge = tiers.cloud_charge(self.p, self.plan, prompt, completion, text, len(delivered))
            await self.p.budgets.settle(reservation, charge)

    async def _cloud_streams(self, edge: EdgeOutcome) -> AsyncIterator[StreamEvent]:
        p, plan, watch = self.p, self.plan, self.watch
        failures: list[NodeUnavailable] = []
        for node in p.clouds:
            sent = False
            answer: NodeAnswer | None = None
            started = time.perf_counter()
            try:
                chunks = node.stream(self._request(), self.deadline)
                async for item in idle_guarded(node, chunks, self.idle_s):
                    if isinstance(item, NodeAnswer):
                        answer = item
                    elif item:
                        sent = True
                        yield item
            except NodeUnavailable as exc:
                if sent:
                    raise Unavailable(
                        f"cloud node {node.name} at {node.address} cut the stream after part "
                        f"of the answer was sent ({exc.detail}); that text is incomplete: "
                        "retry the request"
                    ) from exc
                failures.append(exc)
                raise_if_past_deadline(self.deadline, "cloud", failures)
                continue
            except NodeRejected as exc:
                raise p._rejected_by_cloud(exc) from exc
            finally:
                watch.cloud_ms += Stopwatch.since(started)
            assert answer is not None
            result = provenance.cloud_result(
                plan, edge.answer, answer, edge.decision, watch, p.version
            )
            if self.restarted:
                result = provenance.restarted(result)
            await p.cache_gate.admit(plan, result, p.settings)
            yield result
            return
        result = p._degraded_or_raise(plan, edge, watch, p._cloud_down(failures))
        yield provenance.restarted(result) if self.restarted else result


async def with_whole_text(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Send a result's text as one delta when none of it was streamed since the
    start or the last restart (kept edge answers, cache hits, unary flights)."""
    streamed = False
    async for event in events:
        if isinstance(event, str):
            streamed = True
        elif isinstance(event, Restart):
            streamed = False
        elif not streamed and event.text:
            yield event.text
        yield event
