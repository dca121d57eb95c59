"""The combiner's probe on the prompt state, the cross-validated penalty, and the gain
estimator (the combiner against a fitted P(the cloud is right))."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from edge_node.combiner import (
    L2_GRID,
    CombinerEstimator,
    CombinerWeights,
    GainEstimator,
    choose_l2,
    cloud_head_path,
    features,
    fit_combiner,
    gain_score,
)
from edge_node.estimators_registry import edge_estimator
from edge_node.settings import EstimatorSettings
from tests.support.tiny_models import tiny_backend
from tidegate.backend import ConfidenceEstimator, Generation
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest
from tidegate.errors import ConfigError
from tidegate.evaluation.fitting import fit_from_items
from tidegate.evaluation.metrics import auroc

REQUEST = GenerationRequest((ChatMessage("user", "q"),))
HIDDEN = 8


def _item(rng: random.Random) -> tuple[Generation, bool, bool]:
    """An answer whose token signals are noise, and whose prompt state says whether the
    question is one the edge knows (dimension 0) and one the cloud knows (dimension 1)."""
    knows_edge, knows_cloud = rng.random() < 0.4, rng.random() < 0.7
    state = [rng.gauss(0, 1) for _ in range(HIDDEN)]
    state[0] += 2.0 if knows_edge else -2.0
    state[1] += 2.0 if knows_cloud else -2.0
    lps = [-rng.random() * 2 for _ in range(4)]
    g = Generation("x", [1, 2, 3, 4], lps, [-x for x in lps], FinishReason.STOP, 3, "m",
                   prompt_state=state)  # fmt: skip
    return g, knows_edge and rng.random() < 0.95, knows_cloud and rng.random() < 0.95


def _records(n: int, seed: int, split: str = "calib") -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        g, edge_ok, cloud_ok = _item(rng)
        records.append(
            {"id": str(i), "split": split, "features": features(g), "prompt_state": g.prompt_state,
             "edge_correct": edge_ok, "cloud_correct": cloud_ok, "confidence": {}}
        )  # fmt: skip
    return records


def test_the_probe_reads_what_the_token_signals_cannot():
    train, fresh = _records(400, seed=1), _records(400, seed=2)
    labels = [r["edge_correct"] for r in train]
    without = fit_combiner([r["features"] for r in train], labels, "m", {})
    with_probe = fit_combiner(
        [r["features"] for r in train], labels, "m", {}, states=[r["prompt_state"] for r in train]
    )
    right = [r["edge_correct"] for r in fresh]
    plain = [without.probability(r["features"]) for r in fresh]
    probed = [with_probe.probability(r["features"], r["prompt_state"]) for r in fresh]
    assert auroc(probed, right) > 0.9 > 0.65 > auroc(plain, right)
    assert with_probe.probe is not None
    assert abs(with_probe.probe.coef[0]) == max(abs(c) for c in with_probe.probe.coef)
    # the JSON file keeps the probe; a state of another size is refused
    loaded = CombinerWeights.from_json(json.loads(json.dumps(with_probe.to_json())))
    assert loaded == with_probe
    with pytest.raises(ValueError, match="3 dimensions, the probe 8"):
        loaded.probability(fresh[0]["features"], [0.0, 0.0, 0.0])
    # no state (a backend without hidden states): the probe adds nothing
    assert 0.0 < loaded.probability(fresh[0]["features"]) < 1.0


def test_cross_validation_picks_a_penalty_from_the_grid():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 40))  # 40 features, one of which matters
    y = (x[:, 0] + rng.normal(scale=0.5, size=120) > 0).astype(float)
    l2 = choose_l2(x, y)
    assert l2 in L2_GRID
    samples = [{"mean_logprob": float(v)} for v in x[:, 0]]
    weights = fit_combiner(samples, [bool(v) for v in y], "m", {}, ("mean_logprob",), l2=None)
    assert weights.provenance["l2"] in L2_GRID


def test_gain_is_half_plus_half_the_difference():
    assert gain_score(0.9, 0.2) == pytest.approx(0.85)
    assert gain_score(0.1, 0.9) == pytest.approx(0.1)
    assert gain_score(0.3, 0.3) == 0.5


async def test_fitting_both_heads_and_the_gain_estimator(tmp_path):
    train, fresh = _records(400, seed=3), _records(300, seed=4, split="test")
    path = tmp_path / "m.json"
    fitted = fit_from_items(train + fresh, "m", "calib", "synthetic", out=path, cloud_model="big")
    assert fitted.cloud is not None and fitted.cloud.predicts == "big"
    assert fitted.edge.predicts == "edge" and fitted.edge.probe is not None
    assert "cloud head (gain)" in fitted.summary and cloud_head_path(path).is_file()
    fitted.rescore(fresh)
    estimator = GainEstimator.for_model("m", path)
    assert isinstance(estimator, ConfidenceEstimator) and estimator.extra_cost == "none"
    rng = random.Random(5)
    g, _, _ = _item(rng)
    expected = gain_score(
        fitted.edge.probability(features(g, "q"), g.prompt_state),
        fitted.cloud.probability(features(g, "q"), g.prompt_state),
    )
    assert await estimator.score(REQUEST, g) == pytest.approx(expected)
    # the gain escalates where the cloud wins: questions only the cloud knows score lowest
    by_gain = sorted(fresh, key=lambda r: r["confidence"]["gain"])
    lowest = by_gain[: len(fresh) // 4]
    wins = sum(r["cloud_correct"] and not r["edge_correct"] for r in lowest) / len(lowest)
    by_combiner = sorted(fresh, key=lambda r: r["confidence"]["combiner"])[: len(fresh) // 4]
    wins_combiner = sum(r["cloud_correct"] and not r["edge_correct"] for r in by_combiner)
    assert wins > 0.8 and wins * len(lowest) > wins_combiner


def test_without_cloud_labels_only_the_combiner_is_fitted(tmp_path):
    records = _records(200, seed=6)
    for r in records:
        r["cloud_correct"] = None
    fitted = fit_from_items(records, "m", "calib", "synthetic", out=tmp_path / "m.json")
    assert fitted.cloud is None and not cloud_head_path(tmp_path / "m.json").exists()
    with pytest.raises(FileNotFoundError, match="no cloud-head weights"):
        GainEstimator.for_model("m", tmp_path / "m.json")


def test_the_heads_can_be_fitted_on_different_items(tmp_path):
    """The combiner on a large edge-only fitting set, the cloud head where the cloud
    answered too: each fit keeps the other head's file as it is."""
    path = tmp_path / "m.json"
    edge_only = _records(400, seed=7, split="fit")
    for r in edge_only:
        r["cloud_correct"] = None
    with_cloud = _records(300, seed=8)
    with pytest.raises(ConfigError, match="keeps the edge head"):
        fit_from_items(with_cloud, "m", "calib", "synthetic", out=path, heads="cloud")
    first = fit_from_items(edge_only, "m", "fit", "fitting set", out=path, heads="edge")
    assert first.cloud is None and not cloud_head_path(path).exists()
    with pytest.raises(ConfigError, match="cannot fit the cloud head"):
        fit_from_items(edge_only, "m", "fit", "fitting set", out=path, heads="cloud")
    second = fit_from_items(
        with_cloud, "m", "calib", "dev", out=path, cloud_model="big", heads="cloud"
    )
    assert second.edge.to_json() == first.edge.to_json()  # the combiner kept
    assert second.cloud is not None and second.cloud.provenance["split"] == "calib"
    assert json.loads(path.read_text())["provenance"]["split"] == "fit"
    cloud_file = cloud_head_path(path).read_text()
    third = fit_from_items(edge_only, "m", "fit", "fitting set", out=path, heads="edge")
    assert cloud_head_path(path).read_text() == cloud_file  # the cloud head kept
    assert third.cloud is not None and "kept as it is" in third.summary
    records = _records(50, seed=9, split="test")
    third.rescore(records)
    assert all(0.0 <= r["confidence"]["gain"] <= 1.0 for r in records)


async def test_gain_without_weights_falls_back_with_a_warning(caplog):
    backend = tiny_backend()
    try:
        with caplog.at_level(logging.WARNING):
            estimator = edge_estimator("gain", backend, EstimatorSettings())
        assert estimator.name == "seq_prob"
        assert "no combiner weights for edge model tiny-llama-s0@tiny/none" in caplog.text
    finally:
        await backend.close()


def test_probabilities_stay_finite_for_extreme_states():
    train = _records(200, seed=7)
    weights = fit_combiner(
        [r["features"] for r in train], [r["edge_correct"] for r in train], "m", {},
        states=[r["prompt_state"] for r in train],
    )  # fmt: skip
    for scale in (1e3, -1e3):
        p = weights.probability(train[0]["features"], [scale] * HIDDEN)
        assert 0.0 <= p <= 1.0 and not math.isnan(p)


async def test_gain_without_a_cloud_head_falls_back_to_the_combiner(tmp_path, caplog, monkeypatch):
    import edge_node.combiner as combiner_module

    backend = tiny_backend()
    try:
        records = _records(200, seed=8)
        for r in records:
            r["cloud_correct"] = None
        model = backend.info.model
        monkeypatch.setattr(combiner_module, "CALIBRATION_DIR", tmp_path)
        fit_from_items(records, model, "calib", "synthetic", out=tmp_path / "w.json")
        monkeypatch.setattr(
            combiner_module,
            "calibration_path",
            lambda _model, directory=tmp_path: tmp_path / "w.json",
        )
        with caplog.at_level(logging.WARNING):
            estimator = edge_estimator("gain", backend, EstimatorSettings())
        assert estimator.name == "combiner"
        assert "no cloud-head weights" in caplog.text and "serving with combiner" in caplog.text
    finally:
        await backend.close()


def test_the_edge_names_the_cloud_its_gain_was_fitted_for(tmp_path):
    from edge_node.service import _describe

    fitted = fit_from_items(
        _records(200, seed=9), "m", "calib", "synthetic", out=tmp_path / "m.json", cloud_model="big"
    )
    gain = GainEstimator.for_model("m", fitted.path)
    assert _describe(gain) == "gain, cloud head fitted for big"
    assert _describe(CombinerEstimator(fitted.edge)) == "combiner"
    assert _describe(None) == "none"
