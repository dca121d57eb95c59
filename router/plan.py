"""Turning a client request into a validated plan: what every later step reads.

Validation uses the same rules as the model nodes (``tidegate.chat``), so a
request the router accepts is one a node would accept too, except where the
node's own limits (context length) differ.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from router.cache_key import cache_key
from router.domain import RouteRequest
from router.policy import RequestFacts, effective_threshold, estimate_prompt_tokens
from router.rules import NO_RULE, RuleMatch, match_rule, requested_route
from router.settings import RouterSettings
from tidegate.chat import GenerationRequest, SamplingParams


@dataclass(frozen=True)
class Plan:
    """A validated request with everything derived from it."""

    request: RouteRequest  # request_id filled in
    sampling: SamplingParams  # max_new_tokens after the policy default
    facts: RequestFacts
    key: str  # cache key
    cacheable: bool  # not sampled, or the policy caches sampled answers too
    rule: RuleMatch = NO_RULE  # the policy rule that matched (router.rules)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def reads_cache(self) -> bool:
        return self.request.cache_control.reads

    @property
    def writes_cache(self) -> bool:
        return self.request.cache_control.writes

    @property
    def flight_key(self) -> str:
        """Requests that may share one run: same cache key, same threshold (it
        changes the outcome) and same cache writing (a BYPASS request's answer
        must not be stored because an identical DEFAULT one was in flight)."""
        return (
            f"{self.key}|{self.facts.threshold!r}|{'w' if self.writes_cache else 'nw'}"
            f"|{self.rule.name}"  # a rule changes the route: share only within it
        )


def make_plan(request: RouteRequest, settings: RouterSettings) -> Plan:
    """Validate (raises InvalidArgument with a precise message) and derive."""
    policy = settings.policy
    GenerationRequest(request.messages, request.sampling).validate(policy.max_new_tokens_limit)
    rule = requested_route(
        match_rule(settings.rules, request.tenant, request.tags, request.messages), request.route
    )
    requested = request.min_confidence  # the request's own threshold wins over the rule's
    threshold = effective_threshold(
        requested if requested is not None else rule.min_confidence, policy
    )
    sampling = request.sampling.with_default_max_new_tokens(policy.default_max_new_tokens)
    assert sampling.max_new_tokens is not None
    if not request.request_id:
        request = replace(request, request_id=uuid.uuid4().hex)
    return Plan(
        request=request,
        sampling=sampling,
        facts=RequestFacts(
            prompt_tokens=estimate_prompt_tokens(request.messages),
            max_new_tokens=sampling.max_new_tokens,
            threshold=threshold,
            estimator=policy.estimator,
        ),
        key=cache_key(request.tenant, request.messages, sampling),
        cacheable=not sampling.is_sampled or settings.cache.cache_sampled,
        rule=rule,
    )
