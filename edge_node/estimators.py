"""Single-pass confidence estimators: they read the generation's own token signals.

Every score is in [0, 1], high = keep the edge answer; an empty generation
(no tokens) scores 0. They cost nothing on top of the generation
(``extra_cost = "none"``). Thresholds are calibrated per estimator *and* per
model variant (quantization changes the numbers).

- ``seq_prob``: exp(mean token log-prob) — the length-normalised sequence
  probability (geometric mean of the token probabilities).
- ``min_prob``: exp(min token log-prob) — the least likely token; catches one
  confident-looking answer with a single guessed fact, which the mean hides.
- ``quantile_prob``: the 10th-percentile token probability — like ``min_prob``
  but robust to one odd token.
- ``mean_entropy``: exp(−mean entropy in nats) — 1 when every next-token
  distribution is a point mass, 1/k for uniform over k tokens. Backends
  without full distributions (entropies None) fall back to −log-prob of the
  chosen tokens as the per-token entropy estimate, i.e. ``seq_prob``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tidegate.backend import Generation
from tidegate.chat import GenerationRequest


def _unit(x: float) -> float:
    """Clamp into [0, 1]; NaN counts as no confidence."""
    if math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, x))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def seq_prob(g: Generation) -> float:
    return math.exp(sum(g.logprobs) / len(g.logprobs))


def min_prob(g: Generation) -> float:
    return math.exp(min(g.logprobs))


def quantile_prob(g: Generation, q: float = 0.10) -> float:
    return quantile([math.exp(lp) for lp in g.logprobs], q)


def mean_entropy(g: Generation) -> float:
    entropies = g.entropies if g.entropies is not None else [-lp for lp in g.logprobs]
    return math.exp(-sum(entropies) / len(entropies))


@dataclass
class TokenSignalEstimator:
    """A ConfidenceEstimator computed from per-token log-probs / entropies."""

    name: str
    fn: Callable[[Generation], float]
    extra_cost: str = "none"

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        return _unit(self.fn(generation))


ESTIMATORS: dict[str, Callable[[], TokenSignalEstimator]] = {
    "seq_prob": lambda: TokenSignalEstimator("seq_prob", seq_prob),
    "min_prob": lambda: TokenSignalEstimator("min_prob", min_prob),
    "quantile_prob": lambda: TokenSignalEstimator("quantile_prob", quantile_prob),
    "mean_entropy": lambda: TokenSignalEstimator("mean_entropy", mean_entropy),
}


def build_estimator(name: str) -> TokenSignalEstimator:
    """The estimator registered as ``name``; ValueError listing the known names otherwise."""
    try:
        factory = ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown confidence estimator {name!r}; choose one of {', '.join(ESTIMATORS)}"
        ) from None
    return factory()
