"""``tidegate calibrate``: pick a routing threshold from an evaluation, write it into a policy.

The evaluation is an ``items.jsonl`` written by ``tidegate eval`` (each item's
edge/cloud correctness and every estimator's score). For one estimator the
routing curve says, at each threshold, which fraction escalates and how
accurate the routed answers are; the target picks the point:

- ``--target-escalation F``: the most accurate point escalating at most F;
- ``--target-accuracy A``: the point escalating least whose accuracy is ≥ A
  (A absolute, e.g. ``0.6``, or relative to cloud-only accuracy: ``0.95xcloud``).

The threshold written is the midpoint between the highest escalated score and
the lowest kept one (a margin for unseen items), rounded to 4 decimals where that
keeps every item on its side; the file gets exactly the number reported.
With rules carrying their own thresholds (``policy.rules`` matching tags or
tenants), each rule is calibrated on the items it matches, the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tidegate.evaluation.metrics import (
    CurvePoint,
    accuracy_at_escalation,
    bootstrap_interval,
    escalation_for_accuracy,
    routing_curve,
)


@dataclass(frozen=True)
class Target:
    escalation: float | None = None  # at most this fraction escalated
    accuracy: float | None = None  # at least this accuracy…
    relative_to_cloud: bool = False  # …as a fraction of cloud-only accuracy

    @classmethod
    def parse(cls, escalation: float | None, accuracy: str | None) -> Target:
        if (escalation is None) == (accuracy is None):
            raise ValueError("give exactly one of --target-escalation and --target-accuracy")
        if escalation is not None:
            if not 0.0 <= escalation <= 1.0:
                raise ValueError(f"--target-escalation must be in [0, 1] (got {escalation})")
            return cls(escalation=escalation)
        assert accuracy is not None
        relative = accuracy.endswith("xcloud")
        try:
            value = float(accuracy.removesuffix("xcloud"))
        except ValueError:
            raise ValueError(
                f"--target-accuracy takes a fraction (0.6) or a fraction of cloud-only "
                f"accuracy (0.95xcloud), not {accuracy!r}"
            ) from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--target-accuracy must be in (0, 1] (got {value})")
        return cls(accuracy=value, relative_to_cloud=relative)

    def describe(self) -> str:
        if self.escalation is not None:
            return f"escalation ≤ {100 * self.escalation:.1f}%"
        assert self.accuracy is not None
        if self.relative_to_cloud:
            return f"accuracy ≥ {100 * self.accuracy:.1f}% of cloud-only"
        return f"accuracy ≥ {100 * self.accuracy:.1f}%"


@dataclass(frozen=True)
class Calibration:
    threshold: float  # keep the edge answer when its score is ≥ this
    escalated: float  # expected fraction escalated (on the calibration items)
    accuracy: float  # expected routed accuracy
    edge_accuracy: float
    cloud_accuracy: float
    items: int
    reached: bool  # False: no threshold meets the target; the closest is reported


def _usable(records: Sequence[Mapping[str, Any]], estimator: str) -> list[Mapping[str, Any]]:
    return [
        r
        for r in records
        if r.get("edge_correct") is not None
        and r.get("cloud_correct") is not None
        and estimator in (r.get("confidence") or {})
    ]


def _between(scores: Sequence[float], point: CurvePoint) -> float:
    """A threshold between the highest escalated score and the lowest kept one."""
    kept_low = point.threshold
    below = [s for s in scores if s < kept_low]
    if not math.isfinite(kept_low):  # escalate everything
        return min(1.0, round(max(scores) + 1e-4, 4)) if max(scores) < 1.0 else 1.0
    if not below:  # escalate nothing
        return 0.0
    mid = (max(below) + kept_low) / 2
    rounded = round(mid, 4)
    return rounded if max(below) < rounded <= kept_low else mid


def calibrate(records: Sequence[Mapping[str, Any]], estimator: str, target: Target) -> Calibration:
    """The threshold meeting ``target`` on ``records`` (see the module docstring)."""
    usable = _usable(records, estimator)
    if not usable:
        raise ValueError(
            f"no items with an edge and a cloud answer and a {estimator!r} score; run "
            "`tidegate eval` without --edge-only (and with this estimator)"
        )
    scores = [float(r["confidence"][estimator]) for r in usable]
    edge = [bool(r["edge_correct"]) for r in usable]
    cloud = [bool(r["cloud_correct"]) for r in usable]
    curve = routing_curve(scores, edge, cloud)
    cloud_accuracy = sum(cloud) / len(cloud)
    if target.escalation is not None:
        point = accuracy_at_escalation(curve, target.escalation)
        reached = point is not None
        point = point or curve[0]
    else:
        assert target.accuracy is not None
        goal = target.accuracy * (cloud_accuracy if target.relative_to_cloud else 1.0)
        point = escalation_for_accuracy(curve, goal)
        reached = point is not None
        point = point or max(curve, key=lambda p: (p.accuracy, -p.escalated))
    threshold = _between(scores, point)
    sent, right = _route(usable, estimator, threshold)
    # What the threshold written does (the router escalates score < threshold): the
    # curve's point, except where no threshold ≤ 1 can escalate a score of 1 — and then
    # the accuracy target may be missed where the curve's point met it.
    escalated, accuracy = sum(sent) / len(sent), sum(right) / len(right)
    if target.accuracy is not None:
        reached = reached and accuracy >= goal - 1e-12
    return Calibration(
        threshold=threshold,
        escalated=escalated,
        accuracy=accuracy,
        edge_accuracy=sum(edge) / len(edge),
        cloud_accuracy=cloud_accuracy,
        items=len(usable),
        reached=reached,
    )


@dataclass(frozen=True)
class Replay:
    """A fixed threshold on other items (a held-out split)."""

    escalated: float
    accuracy: float  # routed
    items: int
    cloud_accuracy: float
    # routed accuracy / cloud-only accuracy, and its 95% bootstrap interval over the
    # items: how far from a "95% of cloud-only" target this sample can tell it is
    of_cloud: float
    of_cloud_ci95: tuple[float, float] | None


def _route(
    usable: Sequence[Mapping[str, Any]], estimator: str, threshold: float
) -> tuple[list[bool], list[bool]]:
    """Per item: escalated (as the router decides: score < threshold), and routed right."""
    sent = [float(r["confidence"][estimator]) < threshold for r in usable]
    right = [
        bool(r["cloud_correct"] if s else r["edge_correct"])
        for r, s in zip(usable, sent, strict=True)
    ]
    return sent, right


def replay(records: Sequence[Mapping[str, Any]], estimator: str, threshold: float) -> Replay:
    """What a fixed threshold does on other items (a held-out split)."""
    usable = _usable(records, estimator)
    if not usable:
        return Replay(math.nan, math.nan, 0, math.nan, math.nan, None)
    sent, right = _route(usable, estimator, threshold)
    cloud = [bool(r["cloud_correct"]) for r in usable]

    def of_cloud(idx: Sequence[int]) -> float | None:
        clouds = sum(cloud[i] for i in idx)
        return sum(right[i] for i in idx) / clouds if clouds else None

    n = len(usable)
    whole = of_cloud(range(n))
    return Replay(
        escalated=sum(sent) / n,
        accuracy=sum(right) / n,
        items=n,
        cloud_accuracy=sum(cloud) / n,
        of_cloud=math.nan if whole is None else whole,
        of_cloud_ci95=bootstrap_interval(of_cloud, n),
    )


def route_groups(
    records: Sequence[Mapping[str, Any]], rules: Sequence[Any]
) -> dict[int | None, list[Mapping[str, Any]]]:
    """Items by the threshold that judges them, as the router's first-match rules do
    (its own ``match_rule``, the PII detector run on the item's question).

    Key ``i``: the rule at index i sets ``min_confidence`` and is the first rule the
    item matches; key ``None``: the policy's own threshold. Items whose first match
    forces or pins a tier are left out (no threshold judges them). An item written
    before ``tidegate eval`` recorded the question counts as carrying no PII.
    """
    from router.rules import match_rule
    from tidegate.chat import ChatMessage

    index = {rule.name: i for i, rule in enumerate(rules)}
    groups: dict[int | None, list[Mapping[str, Any]]] = {None: []}
    for record in records:
        question = (ChatMessage("user", record.get("question") or ""),)
        match = match_rule(rules, record.get("tenant") or "", record.get("tags") or [], question)
        if match.route != "auto":
            continue  # a forced or pinned tier: no threshold judges it
        # A rule that only sets a deadline decides the route: the policy threshold.
        key = index[match.name] if match.min_confidence is not None else None
        groups.setdefault(key, []).append(record)
    return groups
