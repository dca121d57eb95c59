"""Fitting the combiner's weights from an evaluation's items (``tidegate fit-combiner``,
``tidegate calibrate --fit-combiner``)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tidegate.errors import ConfigError


def edge_model_of(items_path: Path) -> str:
    """The edge model identity recorded in the metrics.json beside ``items.jsonl``."""
    metrics = items_path.parent / "metrics.json"
    model = json.loads(metrics.read_text())["run"].get("edge_model") if metrics.exists() else None
    if not model:
        raise ConfigError(f"{metrics} does not name the edge model; run `tidegate eval` again")
    return str(model)


def data_of(items_path: Path) -> str:
    """The data file an items.jsonl was evaluated from, with its sha256 prefix (provenance)."""
    metrics = items_path.parent / "metrics.json"
    run = json.loads(metrics.read_text()).get("run", {}) if metrics.exists() else {}
    if not run.get("data"):
        return str(items_path)
    digest = str(run.get("data_sha256") or "")[:12]
    return f"{run['data']}" + (f" (sha256 {digest})" if digest else "")


def fit_from_items(
    records: Sequence[Mapping[str, Any]],
    model: str,
    split: str | None,
    source: str,
    l2: float = 1.0,
    out: Path | None = None,
) -> tuple[Any, Path, str]:
    """Fit on the ``split`` items' features, write the weights; returns (weights, path, summary)."""
    from edge_node.combiner import FEATURES, calibration_path, fit_combiner
    from tidegate.evaluation.metrics import auroc, ece

    usable = [
        r
        for r in records
        if r.get("edge_correct") is not None
        and set(FEATURES) <= set(r.get("features") or {})
        and (split is None or r.get("split") == split)
    ]
    if not usable:
        raise ConfigError(
            f"no edge items with split {split!r} and the combiner's features in {source}; "
            "run `tidegate eval` (this version) without --cloud-only"
        )
    labels = [bool(r["edge_correct"]) for r in usable]
    provenance = {
        "items": source,
        "split": split,
        "n": len(usable),
        "right": sum(labels),
        "l2": l2,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    try:
        weights = fit_combiner([r["features"] for r in usable], labels, model, provenance, l2=l2)
    except ValueError as exc:
        raise ConfigError(f"cannot fit the combiner on {source}: {exc}") from exc
    path = out or calibration_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(weights.to_json(), indent=2) + "\n")
    scores = [weights.probability(r["features"]) for r in usable]
    summary = (
        f"combiner fitted on {len(usable)} items ({sum(labels)} right): in-sample AUROC "
        f"{auroc(scores, labels) or float('nan'):.3f}, ECE {ece(scores, labels) or 0.0:.3f}; "
        f"wrote {path}"
    )
    return weights, path, summary
