"""A fitting recipe read on held-out items, as the benches that compare recipes read it
(``bench/probe_layers.py``: which inputs; ``bench/fit_data.py``: which fitting items).

The recipe is the shipped one with its inputs or items swapped: the combiner (the edge
head) fitted on the fitting items, gain's cloud head on the development set's ``calib``
split, the threshold ``tidegate calibrate`` picks on ``calib`` for an escalation budget
(its own code), and what that threshold does on ``test``, which nothing was fitted or
picked on. Penalties are fixed, so that compared rows differ only in what they vary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BUDGET = 0.25  # the issue's escalation budget
SPLITS = ("calib", "test")


def usable(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval records a head can learn from or be read on: graded, with token features."""
    return [r for r in records if r.get("edge_correct") is not None and r.get("features")]


def fit_head(
    records: Sequence[Mapping[str, Any]],
    inputs: Sequence[Mapping[str, Any]],
    label: str,
    l2: float,
) -> Any:
    """A combiner head fitted as ``tidegate fit-combiner`` fits one (the same code), on
    the records' token features and ``inputs``' states (probe name → vector), to predict
    ``label``."""
    from edge_node.combiner import fit_combiner

    names = list(inputs[0])
    return fit_combiner(
        [r["features"] for r in records],
        [bool(r[label]) for r in records],
        "held-out",
        {},
        l2=l2,
        states={name: [state[name] for state in inputs] for name in names},
    )


def cloud_head(
    dev: Sequence[Mapping[str, Any]], dev_inputs: Sequence[Mapping[str, Any]], cloud_l2: float
) -> Any | None:
    """Gain's cloud head, fitted on ``dev``'s ``calib`` items; None where ``dev`` can't
    be routed (no ``calib`` or no ``test`` items, or no cloud answers)."""
    on_calib = [i for i, r in enumerate(dev) if r["split"] == "calib"]
    has_test = any(r["split"] == "test" for r in dev)
    if not on_calib or not has_test or dev[0].get("cloud_correct") is None:
        return None
    return fit_head(
        [dev[i] for i in on_calib], [dev_inputs[i] for i in on_calib], "cloud_correct", cloud_l2
    )


def evaluate(
    fit: Sequence[Mapping[str, Any]],
    fit_inputs: Sequence[Mapping[str, Any]],
    dev: Sequence[Mapping[str, Any]],
    dev_inputs: Sequence[Mapping[str, Any]],
    l2: float,
    cloud: Any | None,
    budget: float = BUDGET,
) -> dict[str, float | None]:
    """AUROC per dev split (``calib``, ``test``) of the edge head fitted on ``fit``, and,
    with gain's ``cloud`` head (``cloud_head()``), gain's routing on ``test``
    (``escalated``, ``of_cloud``: routed accuracy as a fraction of cloud-only) at the
    threshold picked on ``calib`` for ≤ ``budget``."""
    from edge_node.combiner import gain_score
    from tidegate.evaluation.calibrate import Target, calibrate, replay
    from tidegate.evaluation.metrics import auroc

    edge = fit_head(fit, fit_inputs, "edge_correct", l2)
    p_edge = [edge.probability(r["features"], s) for r, s in zip(dev, dev_inputs, strict=True)]
    on = {name: [i for i, r in enumerate(dev) if r["split"] == name] for name in SPLITS}
    row: dict[str, float | None] = {
        name: auroc([p_edge[i] for i in on[name]], [bool(dev[i]["edge_correct"]) for i in on[name]])
        for name in SPLITS
    }
    if cloud is None:
        return row | {"escalated": None, "of_cloud": None}
    scored = [
        {**r, "confidence": {"gain": gain_score(p, cloud.probability(r["features"], s))}}
        for p, r, s in zip(p_edge, dev, dev_inputs, strict=True)
    ]
    calib, test = ([scored[i] for i in on[name]] for name in SPLITS)
    picked = calibrate(calib, "gain", Target(escalation=budget))
    held_out = replay(test, "gain", picked.threshold)
    return row | {"escalated": held_out.escalated, "of_cloud": held_out.of_cloud}


def _cell(value: float | None, spec: str) -> str:
    """A table cell: the value formatted, or "-" where there is none."""
    return format(value, spec) if value is not None else "-".rjust(len(format(0.0, spec)))


def print_table(rows: Sequence[Mapping[str, Any]], label: str) -> None:
    """``evaluate()``'s rows as a table, each named by its ``label`` entry."""
    width = max(len(label), *(len(row[label]) for row in rows))
    print(f"{label:{width}} {'calib':>6} {'test':>6}  {'test: escalated':>15} {'of cloud':>8}")
    for row in rows:
        print(
            f"{row[label]:{width}} {_cell(row['calib'], '6.3f')} {_cell(row['test'], '6.3f')}"
            f"  {_cell(row['escalated'], '15.1%')} {_cell(row['of_cloud'], '8.1%')}",
            flush=True,
        )
