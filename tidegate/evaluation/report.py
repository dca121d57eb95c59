"""From per-item records to metrics.json and the summary table ``tidegate eval`` prints."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from tidegate.evaluation.metrics import (
    BOOTSTRAP_DRAWS,
    accuracy_at_escalation,
    auroc,
    bootstrap_interval,
    ece,
    escalation_for_accuracy,
    oracle_point,
    prr,
    routing_curve,
)

# The targets: routed accuracy ≥ 95% of cloud-only accuracy, escalating ≤ 25%.
TARGET_FRACTION_OF_CLOUD = 0.95
ESCALATION_BUDGET = 0.25


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def build_metrics(
    records: Sequence[Mapping[str, Any]], identity: Mapping[str, Any]
) -> dict[str, Any]:
    """metrics.json: per estimator AUROC/PRR/ECE, accuracies, the routing curves."""
    edge = [r for r in records if r.get("edge_correct") is not None]
    both = [r for r in edge if r.get("cloud_correct") is not None]
    cloud = [r for r in records if r.get("cloud_correct") is not None]
    names = sorted({name for r in edge for name in r["confidence"]}, key=lambda n: n)
    costs = identity.get("estimators", {})
    metrics: dict[str, Any] = {
        "run": dict(identity),
        "items": len(records),
        "edge_accuracy": _mean([r["edge_correct"] for r in edge]),
        "cloud_accuracy": _mean([r["cloud_correct"] for r in cloud]),
        "estimators": {},
        "routing": {},
    }
    edge_ok = [bool(r["edge_correct"]) for r in both]
    cloud_ok = [bool(r["cloud_correct"]) for r in both]
    target = cloud_rate = None
    if both:
        oracle = oracle_point(edge_ok, cloud_ok)
        metrics["oracle"] = {"escalated": oracle.escalated, "accuracy": oracle.accuracy}
        cloud_rate = sum(cloud_ok) / len(cloud_ok)
        target = TARGET_FRACTION_OF_CLOUD * cloud_rate
        metrics["targets"] = {
            "accuracy": target,
            "fraction_of_cloud": TARGET_FRACTION_OF_CLOUD,
            "escalation_budget": ESCALATION_BUDGET,
        }
    for name in names:
        scored = [r for r in edge if name in r["confidence"]]
        scores = [float(r["confidence"][name]) for r in scored]
        right = [bool(r["edge_correct"]) for r in scored]
        entry: dict[str, Any] = {
            "items": len(scored),
            "extra_cost": costs.get(name),
            "auroc": auroc(scores, right),
            "auroc_ci95": _auroc_interval(scores, right),
            "within_category_auroc": within_category_auroc(scored, scores, right),
            "prr": prr(scores, right),
            "ece": ece(scores, right),
        }
        paired = [r for r in both if name in r["confidence"]]
        if paired and len(paired) == len(both) and target is not None:
            routed = [float(r["confidence"][name]) for r in paired]
            curve = routing_curve(routed, edge_ok, cloud_ok)
            metrics["routing"][name] = [
                {**p.to_dict(), "threshold": _finite(p.threshold)} for p in curve
            ]
            reach = escalation_for_accuracy(curve, target)
            budget = accuracy_at_escalation(curve, ESCALATION_BUDGET)
            entry["to_reach_target"] = (
                {**reach.to_dict(), "threshold": _finite(reach.threshold)} if reach else None
            )
            entry["at_escalation_budget"] = (
                {
                    **budget.to_dict(),
                    "threshold": _finite(budget.threshold),
                    "fraction_of_cloud": budget.accuracy / cloud_rate if cloud_rate else None,
                    "fraction_of_cloud_ci95": _budget_interval(routed, edge_ok, cloud_ok),
                }
                if budget
                else None
            )
        metrics["estimators"][name] = entry
    metrics["category_reference_auroc"] = _category_reference_auroc(edge)
    metrics["by_category"] = _by_category(records)
    return metrics


def _auroc_interval(scores: Sequence[float], right: Sequence[bool]) -> list[float] | None:
    """AUROC's 95% bootstrap interval over these items."""
    interval = bootstrap_interval(
        lambda idx: auroc([scores[i] for i in idx], [right[i] for i in idx]), len(scores)
    )
    return list(interval) if interval else None


def _budget_interval(
    scores: Sequence[float], edge_ok: Sequence[bool], cloud_ok: Sequence[bool]
) -> list[float] | None:
    """The 95% bootstrap interval of the best routed accuracy within the escalation
    budget as a fraction of cloud-only accuracy, both measured on each resample (paired):
    whether a distance from the 95% target is more than the luck of the items."""

    def fraction_of_cloud(idx: Sequence[int]) -> float | None:
        cloud = sum(cloud_ok[i] for i in idx)
        curve = routing_curve(
            [scores[i] for i in idx], [edge_ok[i] for i in idx], [cloud_ok[i] for i in idx]
        )
        best = accuracy_at_escalation(curve, ESCALATION_BUDGET)
        return best.accuracy * len(idx) / cloud if best and cloud else None

    interval = bootstrap_interval(fraction_of_cloud, len(scores))
    return list(interval) if interval else None


def _category(record: Mapping[str, Any]) -> str:
    return str(record.get("category") or "-")


def _category_reference_auroc(edge: Sequence[Mapping[str, Any]]) -> float | None:
    """AUROC of scoring each item by its category's edge accuracy on these very items.

    Not an estimator (the accuracy is known only after grading): the share of an
    AUROC that knowing what kind of question it is already explains. An estimator
    near it ranks categories, not answers; above it, it tells answers apart within one.
    """
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in edge:
        groups[_category(r)].append(bool(r["edge_correct"]))
    if len(groups) < 2:
        return None
    rate = {c: sum(v) / len(v) for c, v in groups.items()}
    return auroc([rate[_category(r)] for r in edge], [bool(r["edge_correct"]) for r in edge])


def within_category_auroc(
    scored: Sequence[Mapping[str, Any]], scores: Sequence[float], right: Sequence[bool]
) -> float | None:
    """The AUROC inside each category, averaged weighted by items, over the categories
    that have both right and wrong answers: how well the score tells answers apart
    among questions of one kind."""
    groups: dict[str, tuple[list[float], list[bool]]] = defaultdict(lambda: ([], []))
    for r, score, ok in zip(scored, scores, right, strict=True):
        group_scores, group_right = groups[_category(r)]
        group_scores.append(score)
        group_right.append(ok)
    if len(groups) < 2:
        return None
    weighted = [(len(s), auroc(s, ok)) for s, ok in groups.values()]
    known = [(n, a) for n, a in weighted if a is not None]
    total = sum(n for n, _ in known)
    return sum(n * a for n, a in known) / total if total else None


def _by_category(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r.get("category") or "-"].append(r)
    return {
        category: {
            "items": len(rs),
            "edge_accuracy": _mean(
                [r["edge_correct"] for r in rs if r["edge_correct"] is not None]
            ),
            "cloud_accuracy": _mean(
                [r["cloud_correct"] for r in rs if r["cloud_correct"] is not None]
            ),
        }
        for category, rs in sorted(groups.items())
    }


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _span(interval: Sequence[float] | None, pct: bool = False) -> str:
    """A 95% interval as "lo–hi" (percentages without decimals)."""
    if not interval:
        return "-"
    lo, hi = interval
    return f"{100 * lo:.0f}–{100 * hi:.0f}%" if pct else f"{lo:.2f}–{hi:.2f}"


def summary_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table: one row per estimator, then the accuracies."""
    run = metrics["run"]
    lines = [
        f"edge {run.get('edge_model') or '-'} · cloud {run.get('cloud_model') or '-'} · "
        f"{metrics['items']} items" + (f" (split {run['split']})" if run.get("split") else ""),
    ]
    header = (
        f"{'estimator':14} {'AUROC':>6} {'95% CI':>11} {'in cat.':>7} {'PRR':>6} {'ECE':>6}  "
        f"{'esc. for target':>15}  {'acc. at 25%':>11}  {'of cloud, 95% CI':>19}  extra cost"
    )
    lines += [header, "-" * len(header)]
    for name, e in metrics["estimators"].items():
        reach = e.get("to_reach_target")
        budget = e.get("at_escalation_budget") or {}
        of_cloud = _fmt(budget.get("fraction_of_cloud"), pct=True)
        if budget.get("fraction_of_cloud_ci95"):
            of_cloud += f" ({_span(budget['fraction_of_cloud_ci95'], pct=True)})"
        lines.append(
            f"{name:14} {_fmt(e['auroc']):>6} {_span(e.get('auroc_ci95')):>11} "
            f"{_fmt(e.get('within_category_auroc')):>7} "
            f"{_fmt(e['prr']):>6} {_fmt(e['ece']):>6}  "
            f"{_fmt(reach['escalated'] if reach else None, pct=True):>15}  "
            f"{_fmt(budget.get('accuracy'), pct=True):>11}  {of_cloud:>19}  "
            f"{e.get('extra_cost') or '-'}"
        )
    lines.append(
        f"edge-only accuracy {_fmt(metrics['edge_accuracy'], pct=True)} · "
        f"cloud-only {_fmt(metrics['cloud_accuracy'], pct=True)}"
        + (
            f" · oracle {_fmt(metrics['oracle']['accuracy'], pct=True)} escalating "
            f"{_fmt(metrics['oracle']['escalated'], pct=True)}"
            if "oracle" in metrics
            else ""
        )
    )
    if metrics.get("category_reference_auroc") is not None:
        lines.append(
            f"AUROC of knowing only each category's edge accuracy (after the fact): "
            f"{_fmt(metrics['category_reference_auroc'])}; in cat.: AUROC within each category, "
            "weighted by items"
        )
    if "targets" in metrics:
        lines.append(
            f"target: accuracy ≥ {_fmt(metrics['targets']['accuracy'], pct=True)} "
            f"(95% of cloud-only) escalating ≤ 25%; 95% CI: percentile bootstrap over "
            f"the items ({BOOTSTRAP_DRAWS} resamples)"
        )
    return "\n".join(lines)
