"""router.policy: every routing, serving and admission rule, without a server."""

from __future__ import annotations

import math

import pytest

from router.domain import Escalation, Tier
from router.policy import (
    BYTES_PER_TOKEN,
    EdgeSignal,
    RequestFacts,
    admission_refusal,
    effective_threshold,
    estimate_prompt_tokens,
    judge_edge,
    may_serve_cached,
    pre_route,
)
from router.settings import EdgeBudget, PolicySettings
from tidegate.chat import ChatMessage, FinishReason
from tidegate.errors import InvalidArgument

POLICY = PolicySettings(
    min_confidence=0.5, edge_budget=EdgeBudget(max_prompt_tokens=100, max_new_tokens=64)
)


def facts(
    prompt: int = 10, new: int = 32, threshold: float = 0.5, estimator: str | None = None
) -> RequestFacts:
    return RequestFacts(
        prompt_tokens=prompt, max_new_tokens=new, threshold=threshold, estimator=estimator
    )


def signal(conf: float | None = 0.9, finish: FinishReason | None = FinishReason.STOP):
    return EdgeSignal(confidence=conf, estimator="seq_prob", finish_reason=finish)


# -- prompt estimate ---------------------------------------------------------


def test_estimate_grows_with_every_message_and_over_counts_english():
    one = estimate_prompt_tokens([ChatMessage("user", "hello there")])
    two = estimate_prompt_tokens(
        [ChatMessage("system", "be brief"), ChatMessage("user", "hello there")]
    )
    assert two > one
    text = "The quick brown fox jumps over the lazy dog. " * 20
    # ~4 bytes per English token: the estimate must not be below the real count
    assert estimate_prompt_tokens([ChatMessage("user", text)]) >= len(text.encode()) / 4


def test_estimate_counts_utf8_bytes_not_characters():
    ascii_ = estimate_prompt_tokens([ChatMessage("user", "a" * 30)])
    cjk = estimate_prompt_tokens([ChatMessage("user", "東" * 30)])  # 3 bytes each
    assert cjk - ascii_ == math.ceil(90 / BYTES_PER_TOKEN) - math.ceil(30 / BYTES_PER_TOKEN)


# -- threshold ---------------------------------------------------------------


def test_threshold_defaults_to_policy_and_request_overrides():
    assert effective_threshold(None, POLICY) == 0.5
    assert effective_threshold(0.0, POLICY) == 0.0
    assert effective_threshold(1.0, POLICY) == 1.0


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_threshold_out_of_range_is_invalid_argument(bad):
    with pytest.raises(InvalidArgument, match="min_confidence must be in"):
        effective_threshold(bad, POLICY)


# -- pre-route ---------------------------------------------------------------


def test_within_budget_asks_the_edge():
    assert pre_route(facts(prompt=100, new=64), POLICY, has_edge=True) is None


def test_over_new_token_budget_goes_to_cloud_naming_numbers():
    d = pre_route(facts(new=1000), POLICY, has_edge=True)
    assert d is not None and d.tier is Tier.CLOUD
    assert d.escalation is Escalation.OVER_EDGE_BUDGET
    assert d.reason == "max_new_tokens 1000 is over the edge budget of 64"


def test_over_prompt_budget_goes_to_cloud_naming_numbers():
    d = pre_route(facts(prompt=101), POLICY, has_edge=True)
    assert d is not None and d.escalation is Escalation.OVER_EDGE_BUDGET
    assert "101" in d.reason and "100 prompt tokens" in d.reason


def test_no_edge_configured_goes_to_cloud():
    d = pre_route(facts(), POLICY, has_edge=False)
    assert d is not None and d.tier is Tier.CLOUD
    assert d.escalation is Escalation.EDGE_UNAVAILABLE and "no edge" in d.reason


# -- judging the edge ----------------------------------------------------------


def test_confident_edge_answer_is_kept():
    d = judge_edge(signal(0.9), facts(), POLICY)
    assert d.tier is Tier.EDGE and d.escalation is Escalation.NONE and d.reason == ""


def test_confidence_equal_to_threshold_is_kept():
    assert judge_edge(signal(0.5), facts(threshold=0.5), POLICY).tier is Tier.EDGE


def test_low_confidence_escalates_with_reason():
    d = judge_edge(signal(0.31), facts(threshold=0.5), POLICY)
    assert d.tier is Tier.CLOUD and d.escalation is Escalation.LOW_CONFIDENCE
    assert d.reason == "edge confidence 0.31 < min_confidence 0.50 (estimator seq_prob)"


def test_threshold_zero_keeps_anything_and_one_escalates_anything_below_one():
    assert judge_edge(signal(0.0), facts(threshold=0.0), POLICY).tier is Tier.EDGE
    assert judge_edge(signal(0.999), facts(threshold=1.0), POLICY).tier is Tier.CLOUD


def test_truncated_edge_answer_escalates_before_confidence():
    d = judge_edge(signal(0.99, FinishReason.LENGTH), facts(new=32), POLICY)
    assert d.escalation is Escalation.EDGE_TRUNCATED
    assert d.reason == "edge answer was cut at max_new_tokens 32"


def test_truncated_kept_when_policy_says_so():
    policy = POLICY.model_copy(update={"escalate_truncated": False})
    assert judge_edge(signal(0.99, FinishReason.LENGTH), facts(), policy).tier is Tier.EDGE


def test_missing_confidence_escalates_unless_threshold_zero():
    d = judge_edge(signal(None), facts(threshold=0.5), POLICY)
    assert d.escalation is Escalation.LOW_CONFIDENCE and "no confidence" in d.reason
    assert judge_edge(signal(None), facts(threshold=0.0), POLICY).tier is Tier.EDGE


# -- serving rule --------------------------------------------------------------


def serves(tier: Tier, conf: float, threshold: float, estimator: str | None = None) -> bool:
    return may_serve_cached(tier, conf, "fixed", facts(threshold=threshold, estimator=estimator))


def test_cached_cloud_answer_meets_any_threshold():
    assert serves(Tier.CLOUD, 1.0, 1.0)
    assert serves(Tier.CLOUD, 0.0, 1.0)
    assert may_serve_cached(Tier.CLOUD, 1.0, "", facts(threshold=1.0, estimator="gain"))


def test_cached_edge_answer_needs_its_confidence_to_meet_the_threshold():
    assert serves(Tier.EDGE, 0.8, 0.8)
    assert serves(Tier.EDGE, 0.8, 0.5)
    assert not serves(Tier.EDGE, 0.8, 0.9)


def test_cached_edge_answer_scored_by_another_estimator_is_served_as_judge_edge_keeps():
    # Thresholds calibrated for "gain": a "fixed" score is on another scale, so
    # it meets no threshold above 0 (judge_edge escalates those), only 0.
    assert serves(Tier.EDGE, 0.8, 0.8, estimator="fixed")
    assert not serves(Tier.EDGE, 0.8, 0.5, estimator="gain")
    assert serves(Tier.EDGE, 0.8, 0.0, estimator="gain")


# -- admission -----------------------------------------------------------------


def refusal(
    tier=Tier.EDGE,
    conf=0.9,
    finish=FinishReason.STOP,
    sampled=False,
    threshold=0.5,
    cache_sampled=False,
    estimator="seq_prob",
    policy=POLICY,
):
    return admission_refusal(
        tier, conf, estimator, finish, sampled, threshold, policy, cache_sampled
    )


def test_confident_complete_greedy_answers_are_admitted():
    assert refusal() is None
    assert refusal(tier=Tier.CLOUD, conf=1.0) is None
    assert refusal(finish=FinishReason.STOP_SEQUENCE) is None


def test_low_confidence_edge_answer_is_refused():
    assert "below the cache bar 0.50" in refusal(conf=0.49)


def test_edge_answer_kept_under_a_lowered_threshold_still_needs_the_policy_bar():
    # the client lowered its own bar to 0.1 and got the answer; the cache keeps the policy's
    assert refusal(conf=0.3, threshold=0.1) is not None
    assert refusal(conf=0.95, threshold=0.9) is None
    assert refusal(conf=0.85, threshold=0.9) is not None  # a stricter request raises the bar


def test_truncated_and_unknown_finish_are_refused():
    assert "truncated" in refusal(finish=FinishReason.LENGTH)
    assert "truncated" in refusal(tier=Tier.CLOUD, conf=1.0, finish=FinishReason.LENGTH)
    assert refusal(finish=None) is not None


def test_sampled_answers_are_refused_unless_policy_caches_them():
    assert "sampled" in refusal(sampled=True)
    assert refusal(sampled=True, cache_sampled=True) is None


def test_edge_answer_without_confidence_is_refused():
    assert refusal(conf=None) is not None


def test_edge_answer_scored_by_another_estimator_is_refused():
    """policy.estimator set: a score from another estimator says nothing about
    the cache bar (the policy's min_confidence is on that estimator's scale)."""
    gain = PolicySettings(min_confidence=0.5, estimator="gain")
    reason = refusal(conf=0.8, threshold=0.0, estimator="seq_prob", policy=gain)
    assert reason is not None and "calibrated for 'gain'" in reason
    assert refusal(conf=0.8, threshold=0.0, estimator="gain", policy=gain) is None
    assert refusal(tier=Tier.CLOUD, conf=1.0, estimator="", policy=gain) is None
    # With no bar at all (policy and request at 0), judge_edge keeps any
    # estimator's answer, and so may the cache.
    no_bar = PolicySettings(min_confidence=0.0, estimator="gain")
    assert refusal(conf=0.8, threshold=0.0, estimator="seq_prob", policy=no_bar) is None
