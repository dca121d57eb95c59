"""Fitting the combiner's weights from an evaluation's items (``tidegate fit-combiner``,
``tidegate calibrate --fit-combiner``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.errors import ConfigError

HEADS = ("both", "edge", "cloud")  # which heads fit-combiner fits (the others are kept)


@dataclass(frozen=True)
class EvaluatedRun:
    """What the metrics.json beside an ``items.jsonl`` says about the run (read once)."""

    edge_model: str
    cloud_model: str | None
    data: str  # the data file, with its sha256 prefix (provenance)

    @classmethod
    def of(cls, items_path: Path) -> EvaluatedRun:
        """ConfigError when the items file is missing or metrics.json is unreadable,
        not JSON or has no ``run`` object."""
        from tidegate.evaluation.dataset import not_utf8, unreadable

        if items_path.is_dir():
            raise ConfigError(f"items file {items_path} is a folder, not a file")
        if not items_path.exists():
            raise ConfigError(f"items file {items_path} does not exist")
        metrics = items_path.parent / "metrics.json"
        if not metrics.exists():
            return cls.from_run({}, items_path)
        try:
            data = metrics.read_bytes()
        except OSError as exc:
            raise unreadable(metrics, exc, "file") from exc
        try:
            loaded = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise not_utf8(metrics, data, exc) from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{metrics}:{exc.lineno}: not valid JSON ({exc.msg}); run `tidegate eval` again"
            ) from exc
        run = loaded.get("run", {}) if isinstance(loaded, dict) else None
        if not isinstance(run, dict):
            raise ConfigError(
                f"{metrics}: expected a JSON object with a 'run' object; run `tidegate eval` again"
            )
        return cls.from_run(run, items_path)

    @classmethod
    def from_run(cls, run: Mapping[str, Any], items_path: Path) -> EvaluatedRun:
        """From metrics.json's ``run`` section (as ``evaluate`` returns it)."""
        if not run.get("edge_model"):
            metrics = items_path.parent / "metrics.json"
            raise ConfigError(f"{metrics} does not name the edge model; run `tidegate eval` again")
        data = str(items_path)
        if run.get("data"):
            digest = str(run.get("data_sha256") or "")[:12]
            data = f"{run['data']}" + (f" (sha256 {digest})" if digest else "")
        return cls(str(run["edge_model"]), run.get("cloud_model"), data)


@dataclass(frozen=True)
class Fitted:
    edge: Any  # CombinerWeights: P(the edge answer is right)
    cloud: Any | None  # CombinerWeights: P(the cloud's answer is right); None without cloud labels
    path: Path
    summary: str

    def rescore(self, records: Sequence[dict[str, Any]]) -> None:
        """Score the records with the new weights (combiner, and gain with a cloud head):
        both read only the recorded features and hidden states (an eval record holds
        them under the names the probes read, so it is passed as it is)."""
        from edge_node.combiner import gain_score

        for r in records:
            if not r.get("features") or r.get("edge_correct") is None:
                continue
            p_edge = self.edge.probability(r["features"], r)
            r["confidence"]["combiner"] = p_edge
            if self.cloud is not None:
                p_cloud = self.cloud.probability(r["features"], r)
                r["confidence"]["gain"] = gain_score(p_edge, p_cloud)


def _fit_head(
    usable: Sequence[Mapping[str, Any]],
    label: str,
    model: str,
    provenance: dict[str, Any],
    l2: float | None,
    predicts: str,
) -> Any:
    from edge_node.combiner import STATES, fit_combiner

    # A probe per state every item has (items evaluated before the answer state have
    # only the prompt's).
    probed = [name for name in STATES if all(r.get(name) for r in usable)]
    labels = [bool(r[label]) for r in usable]
    return fit_combiner(
        [r["features"] for r in usable],
        labels,
        model,
        provenance | {"right": sum(labels), "probes": probed},
        l2=l2,
        states={name: [r[name] for r in usable] for name in probed},
        predicts=predicts,
    )


def _write(weights: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(weights.to_json(), indent=2) + "\n")


def fit_from_items(
    records: Sequence[Mapping[str, Any]],
    model: str,
    split: str | None,
    source: str,
    l2: float | None = None,
    out: Path | None = None,
    cloud_model: str | None = None,
    heads: str = "both",
) -> Fitted:
    """Fit on the ``split`` items, write the weights; ``l2=None``: chosen by 5-fold
    cross-validation on those items. With a probe per hidden state the items carry
    (``STATES``); with the gain estimator's cloud head (``<out>.cloud.json``) when they
    carry the cloud's correctness too.

    ``heads``: "edge" or "cloud" fits that head only and keeps the other's file, so
    the two can be fitted on different items (the edge head on the large fitting set
    answered by the edge alone, the cloud head where the cloud answered too)."""
    from edge_node.combiner import FEATURES, calibration_path, load_weights
    from tidegate.evaluation.metrics import auroc, ece

    if heads not in HEADS:
        raise ConfigError(f"heads must be one of {', '.join(HEADS)}, not {heads!r}")

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
    provenance = {
        "items": source,
        "split": split,
        "n": len(usable),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    path = out or calibration_path(model)

    def fit(label: str, predicts: str) -> Any:
        return _fit_head(usable, label, model, provenance, l2, predicts)

    if heads == "cloud":
        try:
            edge = load_weights(path, model)  # kept as it is
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--heads cloud keeps the edge head, but: {exc}") from exc
        summary = f"combiner kept as it is ({path})"
    else:
        try:
            edge = fit("edge_correct", "edge")
        except ValueError as exc:
            raise ConfigError(f"cannot fit the combiner on {source}: {exc}") from exc
        _write(edge, path)
        labels, scores = _in_sample(edge, usable, "edge_correct")
        summary = (
            f"combiner fitted on {len(usable)} items ({sum(labels)} right, l2 "
            f"{edge.provenance['l2']:g}, probes on {', '.join(edge.probes) or 'none'}): in-sample "
            f"AUROC {auroc(scores, labels) or float('nan'):.3f}, ECE "
            f"{ece(scores, labels) or 0.0:.3f}; wrote {path}"
        )
    cloud, line = _cloud_head(usable, heads, fit, model, cloud_model, path, source)
    return Fitted(edge, cloud, path, f"{summary}\n{line}")


def _in_sample(
    weights: Any, usable: Sequence[Mapping[str, Any]], label: str
) -> tuple[list[bool], list[float]]:
    """The fitted items' labels and the head's scores for them."""
    labels = [bool(r[label]) for r in usable]
    scores = [weights.probability(r["features"], r) for r in usable]
    return labels, scores


def _cloud_head(
    usable: Sequence[Mapping[str, Any]],
    heads: str,
    fit: Callable[[str, str], Any],
    model: str,
    cloud_model: str | None,
    edge_path: Path,
    source: str,
) -> tuple[Any | None, str]:
    """Gain's cloud head — kept (``--heads edge``), fitted (by ``fit``, the edge head's
    fitter) and written, or none — and the summary line saying which. ``--heads cloud``
    without one is an error."""
    from edge_node.combiner import cloud_head_path, load_weights
    from tidegate.evaluation.metrics import auroc

    path = cloud_head_path(edge_path)
    if heads == "edge":
        if path.is_file():
            kept = load_weights(path, model, "gain's cloud head")
            return kept, f"cloud head (gain) kept as it is ({path})"
        return None, "cloud head (gain) not fitted: --heads edge"
    why = "the items have no cloud answers (evaluated with --edge-only)"
    cloud = None
    if all(r.get("cloud_correct") is not None for r in usable):
        try:
            cloud = fit("cloud_correct", cloud_model or "cloud")
        except ValueError as exc:
            why = str(exc).replace("the combiner", "the cloud head")
    if cloud is None:
        if heads == "cloud":
            raise ConfigError(f"cannot fit the cloud head on {source}: {why}")
        return None, f"cloud head (gain) not fitted: {why}"
    _write(cloud, path)
    right, p_cloud = _in_sample(cloud, usable, "cloud_correct")
    return cloud, (
        f"cloud head (gain) fitted on the same items ({sum(right)} right for "
        f"{cloud.predicts}, l2 {cloud.provenance['l2']:g}): in-sample AUROC "
        f"{auroc(p_cloud, right) or float('nan'):.3f}; wrote {path}"
    )
