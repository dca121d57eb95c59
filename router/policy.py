"""The routing policy: pure functions from request facts and edge signals to
decisions, each with a human-readable reason. No I/O here, so every rule is
unit-testable without a server.

The flow the pipeline drives with these:
    effective_threshold → pre_route (budget, no edge) → [edge call] →
    judge_edge (truncated, confidence) → [cloud call] → admission_refusal
and, before any of that, may_serve_cached on a cache entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from router.domain import Escalation, Tier
from router.settings import PolicySettings
from tidegate.chat import ChatMessage, FinishReason
from tidegate.errors import InvalidArgument

# The router has no tokenizer (it serves any model pair). Instead it
# over-estimates: BPE tokenizers average ~4 bytes per token on English, so
# UTF-8 bytes / 3 over-counts by about a third for typical text, and the chat
# template adds a few tokens per message. An over-estimate only sends
# borderline prompts to the cloud early; an under-estimate is caught by the
# edge node itself, which rejects over-context prompts (INVALID_ARGUMENT) and
# the router then escalates (the cloud's context is larger).
BYTES_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 4  # role markers and separators of a typical chat template
TOKENS_PER_PROMPT = 2  # the assistant turn's opening marker


def estimate_text_tokens(text: str) -> int:
    """Conservative size of ``text`` in tokens, without a tokenizer (see above)."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Conservative prompt size in tokens, without a tokenizer (see above)."""
    total = TOKENS_PER_PROMPT
    for message in messages:
        total += TOKENS_PER_MESSAGE + estimate_text_tokens(message.content)
    return total


def effective_threshold(requested: float | None, policy: PolicySettings) -> float:
    """The min_confidence a request is judged against; the request's own wins."""
    if requested is None:
        return policy.min_confidence
    if not (math.isfinite(requested) and 0.0 <= requested <= 1.0):
        raise InvalidArgument(f"min_confidence must be in [0, 1] (got {requested})")
    return requested


@dataclass(frozen=True)
class RequestFacts:
    """What the policy knows about a request before any model ran."""

    prompt_tokens: int  # estimated, see estimate_prompt_tokens
    max_new_tokens: int  # after the policy default
    threshold: float  # effective min_confidence
    # The estimator whose scale the threshold is on (policy.estimator; None: any).
    # Carried with the threshold so the cache's serving rule can apply it too.
    estimator: str | None = None


@dataclass(frozen=True)
class EdgeSignal:
    """What the edge node said about its own answer."""

    confidence: float | None  # None: the node ran no estimator
    estimator: str
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class Decision:
    """Who answers, and why when it is not the edge."""

    tier: Tier  # EDGE or CLOUD
    escalation: Escalation = Escalation.NONE
    reason: str = ""

    @classmethod
    def keep_edge(cls) -> Decision:
        return cls(Tier.EDGE)

    @classmethod
    def escalate(cls, code: Escalation, reason: str) -> Decision:
        return cls(Tier.CLOUD, code, reason)


def pre_route(facts: RequestFacts, policy: PolicySettings, has_edge: bool) -> Decision | None:
    """Decide before the edge runs: a Decision to go straight to the cloud, or
    None when the edge should be asked."""
    if not has_edge:
        return Decision.escalate(Escalation.EDGE_UNAVAILABLE, "no edge node is configured")
    budget = policy.edge_budget
    if facts.max_new_tokens > budget.max_new_tokens:
        return Decision.escalate(
            Escalation.OVER_EDGE_BUDGET,
            f"max_new_tokens {facts.max_new_tokens} is over the edge budget of "
            f"{budget.max_new_tokens}",
        )
    if facts.prompt_tokens > budget.max_prompt_tokens:
        return Decision.escalate(
            Escalation.OVER_EDGE_BUDGET,
            f"prompt of ~{facts.prompt_tokens} tokens (estimated) is over the edge budget "
            f"of {budget.max_prompt_tokens} prompt tokens",
        )
    return None


def judge_edge(signal: EdgeSignal, facts: RequestFacts, policy: PolicySettings) -> Decision:
    """Keep the edge answer, or escalate it (truncated, or not confident enough)."""
    if policy.escalate_truncated and signal.finish_reason is FinishReason.LENGTH:
        return Decision.escalate(
            Escalation.EDGE_TRUNCATED,
            f"edge answer was cut at max_new_tokens {facts.max_new_tokens}",
        )
    if signal.confidence is None:
        if facts.threshold <= 0.0:
            return Decision.keep_edge()
        return Decision.escalate(
            Escalation.LOW_CONFIDENCE,
            f"edge node returned no confidence score; min_confidence "
            f"{facts.threshold:.2f} needs one",
        )
    if not on_calibrated_scale(signal.estimator, policy.estimator) and facts.threshold > 0.0:
        return Decision.escalate(
            Escalation.LOW_CONFIDENCE,
            f"edge confidence comes from estimator {signal.estimator or 'unnamed'!r}, but "
            f"min_confidence was calibrated for {policy.estimator!r}",
        )
    if signal.confidence < facts.threshold:
        return Decision.escalate(
            Escalation.LOW_CONFIDENCE,
            f"edge confidence {signal.confidence:.2f} < min_confidence {facts.threshold:.2f} "
            f"(estimator {signal.estimator or 'unnamed'})",
        )
    return Decision.keep_edge()


def on_calibrated_scale(estimator: str, calibrated: str | None) -> bool:
    """Whether a confidence from ``estimator`` may be held against thresholds
    calibrated for ``calibrated`` (policy.estimator; None: any estimator's).
    Estimators score on different scales: 0.8 from one is not 0.8 from another."""
    return calibrated is None or estimator == calibrated


def may_serve_cached(
    source_tier: Tier, confidence: float, estimator: str, facts: RequestFacts
) -> bool:
    """Serving rule: a cached cloud answer meets any threshold; a cached edge
    answer only a threshold its stored confidence meets, judged as judge_edge
    judges a fresh one: from another estimator than the threshold's, it meets
    only a threshold of 0. (An entry can predate the policy's estimator: stored
    before a reload, or by another router on a shared cache.)"""
    if source_tier is Tier.CLOUD:
        return True
    if not on_calibrated_scale(estimator, facts.estimator) and facts.threshold > 0.0:
        return False
    return confidence >= facts.threshold


def admission_refusal(
    source_tier: Tier,
    confidence: float | None,
    estimator: str,
    finish_reason: FinishReason | None,
    sampled: bool,
    threshold: float,
    policy: PolicySettings,
    cache_sampled: bool,
) -> str | None:
    """Why an answer must not be cached, or None when it may be.

    An edge answer must meet the stricter of the request's threshold and the
    policy's: a client that lowers its own bar gets the answer, but the cache
    (which serves everyone in the tenant) keeps only answers meeting the
    policy's bar, on the scale the bar was calibrated for (as judge_edge).
    """
    if finish_reason is None:
        return "the node did not report a finish reason"
    if not finish_reason.is_complete:
        return "the answer was truncated at max_new_tokens"
    if sampled and not cache_sampled:
        return "the answer was sampled (temperature > 0) and cache.cache_sampled is off"
    if source_tier is Tier.EDGE:
        bar = max(threshold, policy.min_confidence)
        if not on_calibrated_scale(estimator, policy.estimator) and bar > 0.0:
            return (
                f"edge confidence comes from estimator {estimator or 'unnamed'!r}, but the "
                f"cache bar {bar:.2f} was calibrated for {policy.estimator!r}"
            )
        if confidence is None or confidence < bar:
            shown = "none" if confidence is None else f"{confidence:.2f}"
            return f"edge confidence {shown} is below the cache bar {bar:.2f}"
    return None
