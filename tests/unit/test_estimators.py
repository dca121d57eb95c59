"""Single-pass confidence estimators on synthetic generations."""

from __future__ import annotations

import math

import pytest

from edge_node.estimators import ESTIMATORS, build_estimator, quantile
from tidegate.backend import ConfidenceEstimator, Generation
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest

REQUEST = GenerationRequest((ChatMessage("user", "q"),))


def gen(logprobs: list[float], entropies: list[float] | None = None) -> Generation:
    if entropies is None:
        entropies = [-lp for lp in logprobs]
    return Generation(
        text="x" * len(logprobs),
        token_ids=list(range(len(logprobs))),
        logprobs=logprobs,
        entropies=entropies,
        finish_reason=FinishReason.STOP,
        prompt_tokens=3,
        model="m",
    )


CONFIDENT = gen([-0.01, -0.02, -0.01, -0.05], [0.05, 0.1, 0.02, 0.2])
UNSURE = gen([-1.5, -2.0, -0.7, -3.0], [2.0, 3.1, 1.5, 4.0])
ONE_GUESS = gen([-0.01] * 19 + [-4.0], [0.05] * 19 + [3.0])


@pytest.mark.parametrize("name", list(ESTIMATORS))
async def test_protocol_bounds_and_ordering(name):
    estimator = build_estimator(name)
    assert isinstance(estimator, ConfidenceEstimator)
    assert estimator.name == name and estimator.extra_cost == "none"
    confident = await estimator.score(REQUEST, CONFIDENT)
    unsure = await estimator.score(REQUEST, UNSURE)
    assert 0.0 <= unsure < confident <= 1.0


@pytest.mark.parametrize("name", list(ESTIMATORS))
async def test_empty_generation_scores_zero(name):
    assert await build_estimator(name).score(REQUEST, gen([], [])) == 0.0


@pytest.mark.parametrize("name", list(ESTIMATORS))
async def test_extremes_stay_in_bounds(name):
    estimator = build_estimator(name)
    assert await estimator.score(REQUEST, gen([0.0, 0.0], [0.0, 0.0])) == 1.0
    low = await estimator.score(REQUEST, gen([-1e6], [1e6]))
    assert low == 0.0
    assert await estimator.score(REQUEST, gen([math.nan], [math.nan])) == 0.0


async def test_values():
    assert await build_estimator("seq_prob").score(REQUEST, gen([-1.0, -3.0])) == pytest.approx(
        math.exp(-2.0)
    )
    assert await build_estimator("min_prob").score(REQUEST, gen([-1.0, -3.0])) == pytest.approx(
        math.exp(-3.0)
    )
    assert await build_estimator("mean_entropy").score(
        REQUEST, gen([-0.1, -0.1], [1.0, 2.0])
    ) == pytest.approx(math.exp(-1.5))


async def test_min_and_quantile_catch_guessed_tokens_the_mean_hides():
    seq, low, q10 = (build_estimator(n) for n in ("seq_prob", "min_prob", "quantile_prob"))
    assert await seq.score(REQUEST, ONE_GUESS) > 0.8
    assert await low.score(REQUEST, ONE_GUESS) < 0.05
    # the 10th percentile shrugs off one odd token in 20 …
    assert await q10.score(REQUEST, ONE_GUESS) > 0.9
    # … but not two in ten
    two_guesses = gen([-0.01] * 8 + [-4.0, -4.0])
    assert await q10.score(REQUEST, two_guesses) < 0.05 < await seq.score(REQUEST, two_guesses)


async def test_mean_entropy_without_entropies_falls_back_to_logprobs():
    generation = gen([-1.0, -3.0])
    generation.entropies = None
    assert await build_estimator("mean_entropy").score(REQUEST, generation) == pytest.approx(
        math.exp(-2.0)
    )


def test_quantile_interpolates_like_numpy():
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    assert quantile([7.0], 0.1) == 7.0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown confidence estimator 'vibes'.*seq_prob"):
        build_estimator("vibes")
