"""Asking the edge tier, then (maybe) the cloud tier, for one request: where the
rules, deadlines, retries, circuit breakers and budgets meet.

    ask_edge:  rule forces the cloud? → skip (RULE)
               over the edge budget / no edge? → skip (pre_route)
               deadline leaves no time for edge + cloud? → skip (DEADLINE)
               ask_tier(edges) with a deadline that leaves the cloud its time
               judge the answer; a pinned or edge-forced request keeps it
    ask_cloud: reserve the tenant's budget → ask_tier(clouds) → settle

A request a rule keeps on the edge (``edge_only``: privacy; ``edge``: forced)
never reaches ``ask_cloud``: if no edge answers it, it fails (UNAVAILABLE, or
INVALID_ARGUMENT when the edge refused it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router import provenance
from router.budgets import BudgetExceeded, Reservation
from router.domain import Escalation, NodeAnswer, RouteResult, Tier
from router.failover import TierUnavailable, ask_tier, edge_deadline
from router.nodes import NodeRejected, node_request
from router.plan import Plan
from router.policy import Decision, EdgeSignal, estimate_text_tokens, judge_edge, pre_route
from router.provenance import Stopwatch
from tidegate.errors import DeadlineExceeded, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from router.pipeline import Pipeline


@dataclass(frozen=True)
class EdgeOutcome:
    decision: Decision
    answer: NodeAnswer | None  # None when the edge was skipped or failed


def request_deadline(plan: Plan, deadline: float | None, margin_s: float) -> float | None:
    """The deadline node calls must meet, on the loop clock: the client's, or
    the matching rule's ``deadline_s`` when sooner, less the router's margin."""
    loop = asyncio.get_running_loop()
    if plan.rule.deadline_s is not None:
        by_rule = loop.time() + plan.rule.deadline_s
        deadline = by_rule if deadline is None else min(deadline, by_rule)
    return None if deadline is None else deadline - margin_s


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


async def ask_edge(
    p: Pipeline, plan: Plan, deadline: float | None, watch: Stopwatch
) -> EdgeOutcome:
    """The edge's judged answer, or why the edge was skipped or failed.

    ``deadline`` is the request's (``request_deadline``).
    """
    rule = plan.rule
    if rule.route == "cloud":
        return EdgeOutcome(
            Decision.escalate(Escalation.RULE, f"{rule.why} sends it to the cloud"), None
        )
    stays = rule.pinned or rule.route == "edge"  # no cloud fallback
    if stays and not p.edges:
        raise Unavailable(f"{rule.why} keeps the request on the edge, and no edge node is known")
    if not stays:
        skip = pre_route(plan.facts, p.policy, has_edge=bool(p.edges))
        if skip is not None:
            return EdgeOutcome(skip, None)
    now = asyncio.get_running_loop().time()
    edge_by, too_late = edge_deadline(now, deadline, p.edges, p.clouds, cloud_fallback=not stays)
    if too_late:
        return EdgeOutcome(Decision.escalate(Escalation.DEADLINE, too_late), None)
    request_pb = node_request(plan.request.messages, plan.sampling, plan.request_id)
    started = time.perf_counter()
    try:
        answer = await ask_tier(
            "edge",
            p.candidate_edges(),
            lambda node, by: node.generate(request_pb, by),
            attempts=p.settings.retries.edge_attempts,
            retry=p.settings.retries,
            deadline=edge_by,
        )
    except (TierUnavailable, DeadlineExceeded) as exc:
        if stays:
            if isinstance(exc, DeadlineExceeded):
                raise
            raise Unavailable(
                f"{rule.why} keeps the request on the edge, and no edge node answered: {exc}"
            ) from exc
        return EdgeOutcome(Decision.escalate(Escalation.EDGE_UNAVAILABLE, str(exc)), None)
    except NodeRejected as exc:
        if stays:
            raise InvalidArgument(
                f"{rule.why} keeps the request on the edge, and edge node {exc.node.name} "
                f"rejected it: {exc.detail}"
            ) from exc
        return EdgeOutcome(edge_rejected(exc), None)
    finally:
        watch.edge_ms += Stopwatch.since(started)
    signal = EdgeSignal(answer.confidence, answer.estimator, answer.finish_reason)
    decision = judge_edge(signal, plan.facts, p.policy)
    if stays and decision.tier is Tier.CLOUD:
        kept = "privacy pin" if rule.pinned else "forced edge"
        decision = Decision(
            Tier.EDGE, Escalation.NONE, f"{decision.reason}; kept by {rule.why} ({kept})"
        )
    return EdgeOutcome(decision, answer)


async def reserve_cloud(p: Pipeline, plan: Plan) -> Reservation | None:
    """Reserve the tenant's budget for one cloud call (BudgetExceeded when it
    cannot cover it; None when the tenant has no token budget)."""
    return await p.budgets.reserve(
        plan.request.tenant, plan.facts.prompt_tokens, plan.facts.max_new_tokens
    )


async def ask_cloud(
    p: Pipeline, plan: Plan, deadline: float | None, watch: Stopwatch
) -> NodeAnswer:
    """The cloud's answer, paid for from the tenant's budget: reserved before
    the first attempt, settled with the real usage after the last."""
    if plan.rule.pinned or plan.rule.route == "edge":  # never: ask_edge keeps these
        raise AssertionError(f"{plan.rule.why} keeps the request on the edge")
    reservation = await reserve_cloud(p, plan)
    request_pb = node_request(plan.request.messages, plan.sampling, plan.request_id)
    answer: NodeAnswer | None = None
    started = time.perf_counter()
    try:
        answer = await ask_tier(
            "cloud",
            p.clouds,
            lambda node, by: node.generate(request_pb, by),
            attempts=p.settings.retries.cloud_attempts,
            retry=p.settings.retries,
            deadline=deadline,
        )
    except NodeRejected as exc:
        raise InvalidArgument(
            f"cloud node {exc.node.name} rejected the request: {exc.detail}"
        ) from exc
    finally:
        watch.cloud_ms += Stopwatch.since(started)
        spent = 0
        if answer is not None:
            spent = cloud_charge(
                p, plan, answer.prompt_tokens, answer.completion_tokens, answer.text
            )
        await p.budgets.settle(reservation, spent)
    return answer


def cloud_charge(
    p: Pipeline,
    plan: Plan,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    text: str,
    pieces: int = 0,
) -> int:
    """What a cloud answer is charged: the tokens the node reports. What it does not
    report (0 from an upstream without usage; None for a stream cut before its final
    message) is estimated the way the reservation was: the prompt as reserved, the
    text's tokens (at least one per streamed piece, never past max_new_tokens). Never
    nothing for a prompt read or text sent: such a node's answers would be free
    against any budget. Nothing at all for a call that sent no text and counted none."""
    facts = plan.facts
    if not text and not prompt_tokens and not completion_tokens:
        return 0
    if not completion_tokens and text:
        tokens = max(pieces, estimate_text_tokens(text))
        completion_tokens = min(tokens, facts.max_new_tokens)
    if not prompt_tokens:
        prompt_tokens = p.budgets.estimate(facts.prompt_tokens, 0)
    return prompt_tokens + (completion_tokens or 0)


def over_budget_or_raise(
    p: Pipeline, plan: Plan, edge: EdgeOutcome, watch: Stopwatch, exc: BudgetExceeded
) -> RouteResult:
    """The tenant's budget cannot pay for the escalation: the edge answer
    flagged over_budget (policy.on_over_budget: edge), or the error."""
    if p.policy.on_over_budget != "edge" or edge.answer is None:
        raise exc
    result = provenance.edge_result(plan, edge.answer, edge.decision, watch, p.version)
    return provenance.over_budget(result, str(exc))
