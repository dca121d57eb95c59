"""The learned combiner (features, logistic fit, weights file) and the estimator registry."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from edge_node.combiner import (
    FEATURES,
    CombinerEstimator,
    CombinerWeights,
    calibration_path,
    features,
    fit_combiner,
    fit_logistic,
)
from edge_node.estimators_registry import ESTIMATOR_NAMES, build_any_estimator, edge_estimator
from edge_node.settings import EdgeSettings, EstimatorSettings
from tests.support.tiny_models import tiny_backend
from tidegate.backend import ConfidenceEstimator, Generation
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest
from tidegate.config import load_config
from tidegate.errors import ConfigError
from tidegate.evaluation.metrics import ece

REQUEST = GenerationRequest((ChatMessage("user", "q"),))


def gen(logprobs, entropies=None, finish=FinishReason.STOP) -> Generation:
    return Generation("x", list(range(len(logprobs))), logprobs, entropies, finish, 3, "m")


def test_features_by_hand():
    f = features(gen([-0.1, -2.0, -0.3], [0.5, 1.5, 1.0], FinishReason.LENGTH))
    assert set(f) == set(FEATURES)
    assert f["mean_logprob"] == pytest.approx(-0.8)
    assert f["min_logprob"] == -2.0 and f["first_logprob"] == -0.1
    assert f["mean_entropy"] == pytest.approx(1.0) and f["max_entropy"] == 1.5
    assert f["log_tokens"] == pytest.approx(math.log(4)) and f["truncated"] == 1.0
    assert features(gen([])) == dict.fromkeys(FEATURES, 0.0)
    assert features(gen([-1e9]))["min_logprob"] == -20.0  # floored


def test_answer_span_and_kind_features():
    texts = ["The", " capital", " of", " Japan", " is", " Tokyo", "."]
    lps = [-0.1, -0.1, -0.1, -0.1, -0.2, -3.0, -0.05]
    g = Generation("The capital of Japan is Tokyo.", list(range(7)), lps, [0.1] * 7,
                   FinishReason.STOP, 30, "m", token_texts=texts)  # fmt: skip
    f = features(g, "What is the capital of Japan?")
    # "The" (an article) and "." are neither; capital/of/Japan/is restate the question.
    assert f["copied_fraction"] == pytest.approx(4 / 7)
    assert f["answer_min_logprob"] == f["answer_mean_logprob"] == -3.0
    assert f["log_prompt_tokens"] == pytest.approx(math.log(31))
    assert (f["multiple_choice"], f["numeric_reply"], f["min_logprob_x_mc"]) == (0.0, 0.0, 0.0)
    mc = features(g, "Which one?\nA. Tokyo\nB. Kyoto\nAnswer with the letter.")
    assert mc["multiple_choice"] == 1.0 and mc["min_logprob_x_mc"] == mc["min_logprob"] == -3.0
    g.text = "It is 42."
    assert features(g, "q")["numeric_reply"] == 1.0


def test_fit_logistic_recovers_known_weights():
    rng = random.Random(7)
    rows, labels = [], []
    for _ in range(4000):
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        p = 1 / (1 + math.exp(-(2.0 * x1 - 1.0 * x2 + 0.5)))
        rows.append([x1, x2])
        labels.append(rng.random() < p)
    coef, intercept = fit_logistic(rows, labels, l2=0.0)
    assert coef[0] == pytest.approx(2.0, abs=0.2)
    assert coef[1] == pytest.approx(-1.0, abs=0.15)
    assert intercept == pytest.approx(0.5, abs=0.12)


def _synthetic(n: int, seed: int):
    """Answers whose chance of being right rises with their mean log-prob."""
    rng = random.Random(seed)
    samples, labels = [], []
    for _ in range(n):
        mean_lp = -rng.random() * 3
        lps = [mean_lp + rng.gauss(0, 0.2) for _ in range(4)]
        g = gen([min(0.0, x) for x in lps], [-x for x in lps])
        samples.append(features(g))
        labels.append(rng.random() < math.exp(mean_lp))
    return samples, labels


def test_fitted_combiner_is_calibrated_on_fresh_data():
    samples, labels = _synthetic(1500, seed=1)
    weights = fit_combiner(samples, labels, "m@x/int8", {"note": "test"})
    fresh, fresh_labels = _synthetic(1500, seed=2)
    probabilities = [weights.probability(s) for s in fresh]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert ece(probabilities, fresh_labels) < 0.06
    # ...and a constant predictor at the base rate is no better ranked, but this one is:
    assert weights.coef[FEATURES.index("mean_logprob")] > 0


def test_fit_needs_both_classes():
    samples, _ = _synthetic(10, seed=3)
    with pytest.raises(ValueError, match="both right and wrong"):
        fit_combiner(samples, [True] * 10, "m", {})


def test_weights_file_round_trip_and_model_check(tmp_path):
    samples, labels = _synthetic(300, seed=4)
    weights = fit_combiner(samples, labels, "m@x/int8", {"split": "calib"})
    path = tmp_path / "w.json"
    path.write_text(json.dumps(weights.to_json()))
    loaded = CombinerEstimator.for_model("m@x/int8", path)
    assert loaded.weights == CombinerWeights.from_json(weights.to_json())
    with pytest.raises(ValueError, match="fitted for edge model m@x/int8, not other"):
        CombinerEstimator.for_model("other", path)
    with pytest.raises(FileNotFoundError, match="no combiner weights for edge model nope"):
        CombinerEstimator.for_model("nope", tmp_path / "missing.json")
    broken = weights.to_json() | {"features": ["mean_logprob", "vibes"], "coef": [1.0, 2.0]}
    with pytest.raises(ValueError, match="unknown features: vibes"):
        CombinerWeights.from_json(broken)


async def test_combiner_scores_like_its_weights(tmp_path):
    samples, labels = _synthetic(300, seed=5)
    weights = fit_combiner(samples, labels, "m", {})
    estimator = CombinerEstimator(weights)
    assert isinstance(estimator, ConfidenceEstimator) and estimator.extra_cost == "none"
    g = gen([-0.2, -0.4], [0.3, 0.5])
    assert await estimator.score(REQUEST, g) == pytest.approx(weights.probability(features(g)))
    assert await estimator.score(REQUEST, gen([])) == 0.0


def test_calibration_path_is_keyed_by_model_identity():
    path = calibration_path("smollm2-135m@b179c9523d0e/int8")
    assert path.name == "smollm2-135m@b179c9523d0e-int8.json"
    assert path.parent.name == "calibration"


@pytest.fixture(scope="module")
async def backend():
    b = tiny_backend()
    yield b
    await b.close()


@pytest.mark.parametrize("name", ["seq_prob", "min_prob", "consistency", "self_verify"])
def test_registry_builds_every_estimator_by_name(name, backend):
    estimator = build_any_estimator(name, backend)
    assert estimator.name == name and isinstance(estimator, ConfidenceEstimator)


def test_registry_rejects_unknown_names(backend):
    with pytest.raises(ValueError, match="unknown confidence estimator 'vibes'"):
        build_any_estimator("vibes", backend)


def test_combiner_without_weights_falls_back_with_a_warning(backend, caplog):
    with caplog.at_level(logging.WARNING):
        estimator = edge_estimator("combiner", backend, EstimatorSettings())
    assert estimator.name == "seq_prob"  # answers carry the estimator actually used
    assert "no combiner weights for edge model tiny-llama-s0@tiny/none" in caplog.text


def test_an_explicit_missing_combiner_file_is_a_config_error(backend, tmp_path):
    options = EstimatorSettings(combiner_file=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="estimator: no combiner weights"):
        edge_estimator("combiner", backend, options)


def test_edge_settings_accept_every_registered_estimator(tmp_path):
    for name in ESTIMATOR_NAMES:
        assert EdgeSettings(estimator=name).estimator == name
    path = tmp_path / "edge.yaml"
    path.write_text("estimator_options:\n  consistency_samples: 1\n")
    with pytest.raises(ConfigError, match="estimator_options.consistency_samples"):
        load_config(EdgeSettings, path)
