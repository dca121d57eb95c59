"""How well a confidence score separates right from wrong edge answers — pure functions.

- ``auroc``: the probability that a right answer scores higher than a wrong one
  (ties count one half); 0.5 is chance, 1 is perfect.
- ``prr``: the prediction-rejection ratio (Malinin et al., 2017). Reject the
  lowest-scoring fraction r of answers and hand them to an oracle; the quality
  at r is the fraction right afterwards. PRR = (area under the estimator's
  curve − random rejection's) / (the oracle's − random's): 1 is perfect, 0 is
  random, negative is worse than random.
- ``ece``: expected calibration error with equal-width bins: Σ_b (n_b/n) ·
  |accuracy_b − mean score_b|. Only meaningful for scores meant as probabilities
  (the combiner); reported for every estimator.
- ``routing_curve``: escalate every answer scoring below a threshold t to the
  cloud; at each distinct t, the fraction escalated and the accuracy of the
  routed answers (edge when kept, cloud when escalated).

- ``bootstrap_interval``: how far any of these could move on another sample of
  as many items: a percentile interval over resamples of the items.

Ties are handled in expectation over random tie-breaking everywhere, so no
result depends on the order of the items.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Mann–Whitney AUROC; None when every answer is right or every one is wrong."""
    positives = sum(correct)
    negatives = len(correct) - positives
    if positives == 0 or negatives == 0:
        return None
    pairs = sorted(zip(scores, correct, strict=True), key=lambda p: p[0])
    wins = 0.0  # Σ over positives of (#negatives below + ½ #negatives tied)
    negatives_below = 0
    for _, group in groupby(pairs, key=lambda p: p[0]):
        members = list(group)
        pos = sum(1 for _, c in members if c)
        neg = len(members) - pos
        wins += pos * (negatives_below + 0.5 * neg)
        negatives_below += neg
    return wins / (positives * negatives)


def _rejection_area(order_groups: list[tuple[int, int]], n: int, right: int) -> float:
    """Area under quality(r), r from 0 to 1, rejecting groups in the given order.

    ``order_groups``: (size, #right) per group of tied items, lowest score first.
    Within a group the expected quality is linear in the number rejected, so each
    item's step contributes the trapezoid between its two end qualities.
    """
    area = 0.0
    quality = right / n  # nothing rejected: the fraction right
    for size, good in order_groups:
        wrong = size - good
        # Each rejected item becomes right; in expectation a fraction wrong/size of
        # them were wrong, so quality rises by wrong/size/n per rejected item.
        step = wrong / size / n
        for _ in range(size):
            area += (quality + (quality + step)) / 2 / n
            quality += step
    return area


def prr(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Prediction-rejection ratio; None when every answer is right or every one wrong."""
    n = len(correct)
    right = sum(correct)
    if right in (0, n):
        return None
    pairs = sorted(zip(scores, correct, strict=True), key=lambda p: p[0])
    groups = []
    for _, group in groupby(pairs, key=lambda p: p[0]):
        members = list(group)
        groups.append((len(members), sum(1 for _, c in members if c)))
    estimator = _rejection_area(groups, n, right)
    random = _rejection_area([(n, right)], n, right)
    oracle = _rejection_area([(n - right, 0), (right, right)], n, right)
    return (estimator - random) / (oracle - random)


def ece(scores: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float | None:
    """Expected calibration error over ``bins`` equal-width bins of [0, 1]."""
    n = len(scores)
    if n == 0:
        return None
    totals = [[0, 0.0, 0] for _ in range(bins)]  # count, Σ score, #right
    for score, ok in zip(scores, correct, strict=True):
        index = min(bins - 1, max(0, int(score * bins)))
        totals[index][0] += 1
        totals[index][1] += score
        totals[index][2] += int(ok)
    return sum(
        abs(good / count - total / count) * count / n for count, total, good in totals if count
    )


@dataclass(frozen=True)
class CurvePoint:
    threshold: float  # escalate when score < threshold
    escalated: float  # fraction of items sent to the cloud
    accuracy: float  # fraction right after routing

    def to_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "escalated": self.escalated, "accuracy": self.accuracy}


def routing_curve(
    scores: Sequence[float], edge_correct: Sequence[bool], cloud_correct: Sequence[bool]
) -> list[CurvePoint]:
    """One point per distinct threshold, from escalating nothing to escalating everything.

    The threshold of each point is the smallest score that is kept; the last
    point (everything escalated) has threshold just above the largest score
    (reported as ``inf`` → use any value above 1 for scores in [0, 1]).
    """
    n = len(scores)
    if n == 0:
        return []
    triples = sorted(zip(scores, edge_correct, cloud_correct, strict=True), key=lambda t: t[0])
    right = sum(edge_correct)  # escalate nothing
    escalated = 0
    distinct = sorted({s for s in scores})
    points = [CurvePoint(distinct[0], 0.0, right / n)]
    i = 0
    for index, value in enumerate(distinct):
        while i < n and triples[i][0] == value:
            _, edge_ok, cloud_ok = triples[i]
            right += int(cloud_ok) - int(edge_ok)
            escalated += 1
            i += 1
        threshold = distinct[index + 1] if index + 1 < len(distinct) else float("inf")
        points.append(CurvePoint(threshold, escalated / n, right / n))
    return points


def oracle_point(edge_correct: Sequence[bool], cloud_correct: Sequence[bool]) -> CurvePoint:
    """Escalate exactly the items the edge gets wrong and the cloud gets right."""
    n = len(edge_correct)
    send = sum(1 for e, c in zip(edge_correct, cloud_correct, strict=True) if not e and c)
    right = sum(1 for e, c in zip(edge_correct, cloud_correct, strict=True) if e or c)
    return CurvePoint(float("nan"), send / n, right / n)


def escalation_for_accuracy(curve: Sequence[CurvePoint], target: float) -> CurvePoint | None:
    """The point escalating the least that reaches ``target`` accuracy; None if none does."""
    reaching = [p for p in curve if p.accuracy >= target - 1e-12]
    return min(reaching, key=lambda p: (p.escalated, -p.accuracy)) if reaching else None


def accuracy_at_escalation(curve: Sequence[CurvePoint], budget: float) -> CurvePoint | None:
    """The most accurate point escalating at most ``budget``; None if none does."""
    within = [p for p in curve if p.escalated <= budget + 1e-12]
    return max(within, key=lambda p: (p.accuracy, -p.escalated)) if within else None


BOOTSTRAP_DRAWS = 1000


def bootstrap_interval(
    statistic: Callable[[Sequence[int]], float | None],
    n: int,
    draws: int = BOOTSTRAP_DRAWS,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The percentile interval of ``statistic`` over ``draws`` resamples of the items.

    ``statistic`` gets the item indices of one resample (``n`` drawn with replacement)
    and computes its value on those items; resamples where it is undefined (None: one
    class only) are skipped. None when fewer than half of them are defined. Paired by
    design: every statistic of one item set sees the same resamples (a fixed seed), so
    two estimators' intervals differ by their scores, not by luck of the draw.
    """
    if n <= 0:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        value = statistic([rng.randrange(n) for _ in range(n)])
        if value is not None:
            values.append(value)
    if 2 * len(values) < draws:
        return None
    values.sort()
    tail = (1.0 - level) / 2.0
    last = len(values) - 1
    return values[round(tail * last)], values[round((1.0 - tail) * last)]
