"""AUROC, PRR, ECE and the routing curve on examples small enough to check by hand."""

from __future__ import annotations

import math
import random

import pytest

from tidegate.evaluation.metrics import (
    accuracy_at_escalation,
    auroc,
    bootstrap_interval,
    ece,
    escalation_for_accuracy,
    oracle_point,
    prr,
    routing_curve,
)

T, F = True, False


def test_auroc_counts_pairs():
    # right: 0.9, 0.3; wrong: 0.8, 0.1 → 3 of 4 (right, wrong) pairs ordered correctly.
    assert auroc([0.9, 0.8, 0.3, 0.1], [T, F, T, F]) == pytest.approx(0.75)
    assert auroc([0.9, 0.1], [T, F]) == 1.0
    assert auroc([0.1, 0.9], [T, F]) == 0.0


def test_auroc_ties_count_half_and_one_class_is_undefined():
    assert auroc([0.5, 0.5], [T, F]) == 0.5
    assert auroc([0.5, 0.5, 0.9], [T, F, T]) == pytest.approx((0.5 + 1) / 2)
    assert auroc([0.2, 0.4], [T, T]) is None
    assert auroc([0.2, 0.4], [F, F]) is None


def test_auroc_ignores_item_order():
    rng = random.Random(0)
    scores = [rng.random() for _ in range(50)]
    right = [rng.random() < s for s in scores]
    pairs = list(zip(scores, right, strict=True))
    rng.shuffle(pairs)
    assert auroc(scores, right) == pytest.approx(auroc(*map(list, zip(*pairs, strict=True))))


def test_prr_by_hand():
    # quality after rejecting 0..4 lowest: .5 .75 .75 1 1 → trapezoids 0.8125;
    # random .5→1 linearly: 0.75; oracle (both wrong first): 0.875 → (0.0625)/(0.125).
    assert prr([0.1, 0.2, 0.3, 0.4], [F, T, F, T]) == pytest.approx(0.5)


def test_prr_perfect_random_reversed():
    right = [F, F, T, T, T]
    assert prr([0.1, 0.2, 0.7, 0.8, 0.9], right) == pytest.approx(1.0)
    assert prr([0.5] * 5, right) == pytest.approx(0.0)  # all tied: random rejection
    assert prr([0.9, 0.8, 0.3, 0.2, 0.1], right) < 0
    assert prr([0.3, 0.4], [T, T]) is None


def test_ece_by_hand():
    # bin [0.9, 1): accuracy 0.5 vs 0.95; bin [0.1, 0.2): accuracy 0 vs 0.15; half the items each.
    assert ece([0.95, 0.95, 0.15, 0.15], [T, F, F, F]) == pytest.approx(0.45 / 2 + 0.15 / 2)
    assert ece([1.0, 0.0], [T, F]) == pytest.approx(0.0)  # 1.0 falls in the top bin
    assert ece([], []) is None


def test_routing_curve_by_hand():
    curve = routing_curve([0.1, 0.2, 0.3], [F, T, T], [T, T, F])
    got = [(p.threshold, p.escalated, p.accuracy) for p in curve]
    expected = [(0.1, 0, 2 / 3), (0.2, 1 / 3, 1.0), (0.3, 2 / 3, 1.0), (math.inf, 1.0, 2 / 3)]
    for (t, e, a), (te, ee, ae) in zip(got, expected, strict=True):
        assert t == te and e == pytest.approx(ee) and a == pytest.approx(ae)


def test_routing_curve_moves_tied_items_together():
    curve = routing_curve([0.5, 0.5, 0.9], [T, F, T], [F, T, T])
    assert [(p.escalated, p.accuracy) for p in curve] == [
        (0.0, pytest.approx(2 / 3)),
        (pytest.approx(2 / 3), pytest.approx(2 / 3)),
        (1.0, pytest.approx(2 / 3)),
    ]


def test_oracle_and_targets():
    edge, cloud = [F, T, T], [T, T, F]
    oracle = oracle_point(edge, cloud)
    assert (oracle.escalated, oracle.accuracy) == (pytest.approx(1 / 3), 1.0)
    curve = routing_curve([0.1, 0.2, 0.3], edge, cloud)
    reach = escalation_for_accuracy(curve, 1.0)
    assert reach is not None and reach.escalated == pytest.approx(1 / 3) and reach.threshold == 0.2
    assert escalation_for_accuracy(curve, 1.01) is None
    budget = accuracy_at_escalation(curve, 0.5)
    assert (
        budget is not None and budget.accuracy == 1.0 and budget.escalated == pytest.approx(1 / 3)
    )
    none = accuracy_at_escalation(curve, 0.0)
    assert none is not None and none.escalated == 0.0


def _record(category: str, right: bool, score: float) -> dict:
    return {
        "id": f"{category}-x",
        "category": category,
        "edge_correct": right,
        "cloud_correct": None,
        "confidence": {"s": score},
    }


def test_category_reference_and_within_category_auroc_by_hand():
    from tidegate.evaluation.report import build_metrics, summary_table

    records = [
        # easy: 3 of 4 right; the score ranks them perfectly inside the category
        _record("easy", True, 0.9),
        _record("easy", True, 0.8),
        _record("easy", True, 0.7),
        _record("easy", False, 0.6),
        # hard: 1 of 4 right; the score ranks it below every wrong one
        _record("hard", True, 0.1),
        _record("hard", False, 0.2),
        _record("hard", False, 0.3),
        _record("hard", False, 0.4),
    ]
    metrics = build_metrics(records, {})
    # category rate: easy 0.75, hard 0.25. Right/wrong pairs: 4 right × 4 wrong = 16;
    # easy-right vs hard-wrong 9 won, easy-right vs easy-wrong 3 tied, hard-right vs
    # hard-wrong 3 tied, hard-right vs easy-wrong 1 lost: (9 + 3) / 16
    assert metrics["category_reference_auroc"] == pytest.approx(12 / 16)
    # within: easy 1.0 (4 items), hard 0.0 (4 items) → 0.5
    assert metrics["estimators"]["s"]["within_category_auroc"] == pytest.approx(0.5)
    assert "after the fact): 0.750" in summary_table(metrics)
    one_kind = build_metrics([r | {"category": "all"} for r in records], {})
    assert one_kind["category_reference_auroc"] is None
    assert one_kind["estimators"]["s"]["within_category_auroc"] is None


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    right = [i % 10 < 3 for i in range(400)]  # 30% right
    interval = bootstrap_interval(lambda idx: sum(right[i] for i in idx) / len(idx), len(right))
    assert interval is not None
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)  # ≈ 0.045
    assert interval[0] == pytest.approx(0.3 - half, abs=0.01)
    assert interval[1] == pytest.approx(0.3 + half, abs=0.01)
    # the same seed draws the same resamples; another seed other ones
    again = bootstrap_interval(lambda idx: sum(right[i] for i in idx) / len(idx), len(right))
    other = bootstrap_interval(
        lambda idx: sum(right[i] for i in idx) / len(idx), len(right), seed=1
    )
    assert again == interval and other != interval


def test_bootstrap_interval_skips_undefined_resamples_and_gives_up_when_most_are():
    # 1 right answer in 20: most resamples still hold it, some (~36%) lose it (AUROC None)
    scores = [i / 20 for i in range(20)]
    right = [i == 19 for i in range(20)]
    interval = bootstrap_interval(
        lambda idx: auroc([scores[i] for i in idx], [right[i] for i in idx]), 20
    )
    assert interval == (1.0, 1.0)
    assert bootstrap_interval(lambda idx: None, 20) is None
    assert bootstrap_interval(lambda idx: 1.0, 0) is None


def test_metrics_carry_intervals_around_the_point_estimates():
    from tidegate.evaluation.report import build_metrics, summary_table

    rng = random.Random(7)
    records = []
    for i in range(200):
        right = rng.random() < 0.4
        records.append(
            _record("k", right, rng.random() * 0.5 + (0.4 if right else 0.0))
            | {"id": f"k-{i}", "cloud_correct": rng.random() < 0.6}
        )
    metrics = build_metrics(records, {})
    s = metrics["estimators"]["s"]
    low, high = s["auroc_ci95"]
    assert low < s["auroc"] < high and high - low < 0.2
    budget = s["at_escalation_budget"]
    assert budget["fraction_of_cloud"] == pytest.approx(
        budget["accuracy"] / metrics["cloud_accuracy"]
    )
    low, high = budget["fraction_of_cloud_ci95"]
    assert low < budget["fraction_of_cloud"] < high
    table = summary_table(metrics)
    assert f"{s['auroc_ci95'][0]:.2f}–{s['auroc_ci95'][1]:.2f}" in table
    assert f"{100 * low:.0f}–{100 * high:.0f}%" in table
