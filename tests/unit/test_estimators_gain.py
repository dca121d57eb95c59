"""The combiner's probes on the hidden states, the cross-validated penalty, and the gain
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
    states_of,
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


def _item(rng: random.Random, slip: float = 0.05) -> tuple[Generation, bool, bool]:
    """An answer whose token signals are noise, whose prompt state says whether the
    question is one the edge knows (dimension 0) and one the cloud knows (dimension 1),
    and whose answer state says whether the edge slipped on a question it knows
    (dimension 2: right only if it knows and did not slip)."""
    knows_edge, knows_cloud = rng.random() < 0.4, rng.random() < 0.7
    state = [rng.gauss(0, 1) for _ in range(HIDDEN)]
    state[0] += 2.0 if knows_edge else -2.0
    state[1] += 2.0 if knows_cloud else -2.0
    slipped = rng.random() < slip
    answer = [rng.gauss(0, 1) for _ in range(HIDDEN)]
    answer[2] += 2.0 if slipped else -2.0
    lps = [-rng.random() * 2 for _ in range(4)]
    g = Generation("x", [1, 2, 3, 4], lps, [-x for x in lps], FinishReason.STOP, 3, "m",
                   prompt_state=state, answer_state=answer)  # fmt: skip
    return g, knows_edge and not slipped, knows_cloud and rng.random() < 0.95


def _records(n: int, seed: int, split: str = "calib", slip: float = 0.05) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        g, edge_ok, cloud_ok = _item(rng, slip)
        records.append(
            {"id": str(i), "split": split, "features": features(g), **states_of(g),
             "edge_correct": edge_ok, "cloud_correct": cloud_ok, "confidence": {}}
        )  # fmt: skip
    return records


def _prompt_only(r: dict) -> dict:
    return {"prompt_state": r["prompt_state"]}


def test_the_probes_read_what_the_token_signals_cannot():
    """The prompt state knows which questions the edge knows; the answer state, which
    answers it slipped on: each probe adds what the other cannot see."""
    train, fresh = _records(400, seed=1, slip=0.3), _records(400, seed=2, slip=0.3)
    labels = [r["edge_correct"] for r in train]
    samples = [r["features"] for r in train]
    without = fit_combiner(samples, labels, "m", {})
    prompt = {"prompt_state": [r["prompt_state"] for r in train]}
    with_prompt = fit_combiner(samples, labels, "m", {}, states=prompt)
    both = {name: [r[name] for r in train] for name in ("prompt_state", "answer_state")}
    with_both = fit_combiner(samples, labels, "m", {}, states=both)
    right = [r["edge_correct"] for r in fresh]
    plain = [without.probability(r["features"]) for r in fresh]
    prompt_only = [with_prompt.probability(r["features"], _prompt_only(r)) for r in fresh]
    probed = [with_both.probability(r["features"], r) for r in fresh]
    assert auroc(probed, right) > 0.97 > auroc(prompt_only, right) > 0.8
    assert auroc(plain, right) < 0.65
    assert list(with_both.probes) == ["prompt_state", "answer_state"]
    for name, dimension in (("prompt_state", 0), ("answer_state", 2)):
        coef = with_both.probes[name].coef
        assert abs(coef[dimension]) == max(abs(c) for c in coef)
    # the JSON file keeps the probes; a state of another size is refused
    loaded = CombinerWeights.from_json(json.loads(json.dumps(with_both.to_json())))
    assert loaded == with_both
    with pytest.raises(ValueError, match="3 dimensions, the probe 8"):
        loaded.probability(fresh[0]["features"], {"answer_state": [0.0, 0.0, 0.0]})
    # no state (a backend without hidden states): the probes add nothing
    assert 0.0 < loaded.probability(fresh[0]["features"]) < 1.0


def test_weights_from_before_the_answer_state_load_with_their_prompt_probe():
    train = _records(200, seed=10)
    states = {"prompt_state": [r["prompt_state"] for r in train]}
    weights = fit_combiner(
        [r["features"] for r in train], [r["edge_correct"] for r in train], "m", {}, states=states
    )
    legacy = weights.to_json()
    legacy["probe"] = legacy.pop("probes")["prompt_state"]  # the older file's one probe
    assert CombinerWeights.from_json(legacy) == weights
    legacy["probes"] = {"middle_state": legacy["probe"]}
    with pytest.raises(ValueError, match="probe unknown states: middle_state"):
        CombinerWeights.from_json(legacy)
    with pytest.raises(ValueError, match="no probe for states middle_state"):
        fit_combiner(
            [r["features"] for r in train], [r["edge_correct"] for r in train], "m", {},
            states={"middle_state": states["prompt_state"]},
        )  # fmt: skip


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
    assert fitted.edge.predicts == "edge" and list(fitted.edge.probes) == [
        "prompt_state",
        "answer_state",
    ]
    assert "cloud head (gain)" in fitted.summary and cloud_head_path(path).is_file()
    fitted.rescore(fresh)
    estimator = GainEstimator.for_model("m", path)
    assert isinstance(estimator, ConfidenceEstimator) and estimator.extra_cost == "none"
    rng = random.Random(5)
    g, _, _ = _item(rng)
    expected = gain_score(
        fitted.edge.probability(features(g, "q"), states_of(g)),
        fitted.cloud.probability(features(g, "q"), states_of(g)),
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
        states={"prompt_state": [r["prompt_state"] for r in train]},
    )  # fmt: skip
    for scale in (1e3, -1e3):
        p = weights.probability(train[0]["features"], {"prompt_state": [scale] * HIDDEN})
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


def test_the_probe_ablation_bench_compares_the_four_fits(tmp_path):
    """bench/probe_ablation.py (the README's table of what each probe buys), run as a
    user runs it, on items whose answer state knows the slips the prompt state cannot."""
    import subprocess
    import sys
    from pathlib import Path

    fit = tmp_path / "fit.jsonl"
    dev = tmp_path / "dev.jsonl"
    fit.write_text("".join(json.dumps(r) + "\n" for r in _records(300, seed=11, slip=0.3)))
    held_out = _records(200, seed=12, slip=0.3) + _records(200, seed=13, split="test", slip=0.3)
    dev.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    script = Path(__file__).resolve().parents[2] / "bench" / "probe_ablation.py"
    out = subprocess.run(
        [sys.executable, str(script), "--fit", str(fit), "--dev", str(dev)],
        capture_output=True, text=True, check=True, cwd=script.parents[1],
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["calib", "test"] and len(lines) == 5
    rows = {line.rsplit(maxsplit=3)[0]: [float(v) for v in line.split()[-2:]] for line in lines[1:]}
    tokens, both = rows["tokens"], rows["tokens + prompt_state + answer_state"]
    prompt = rows["tokens + prompt_state"]
    assert all(b > p + 0.03 > t + 0.03 for b, p, t in zip(both, prompt, tokens, strict=True))
