"""bench/consistency_agreement.py: it reads the sampled answers `tidegate eval` cached
(nothing is generated), scores agreement greedy-first or pairwise, and stacks it on the
combiner with weights learned on ``calib`` only."""

from __future__ import annotations

import random

import pytest

from edge_node.estimators_sampling import ConsistencyEstimator, same_answer
from tests.support.scripts import load_script
from tests.support.tiny_models import tiny_backend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.evaluation.gencache import CachedBackend
from tidegate.evaluation.metrics import auroc

Q = "What is 4 + 9?"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/consistency_agreement.py", "consistency_agreement")


def test_agreement_greedy_first_and_pairwise(bench):
    sampled = ["13", "12", "thirteen"]
    assert bench.agreement(same_answer, Q, "13", sampled, pairwise=False) == pytest.approx(2 / 3)
    # pairs among all four: 13=13, 13=thirteen, 13=thirteen of six pairs
    assert bench.agreement(same_answer, Q, "13", sampled, pairwise=True) == pytest.approx(3 / 6)


def test_stacking_learns_on_calib_only(bench):
    rng = random.Random(0)
    records, agreement = [], []
    for i in range(400):
        right = rng.random() < 0.4
        split = "calib" if i % 2 else "test"
        combiner = min(max(rng.gauss(0.4, 0.2), 0.01), 0.99)  # noise
        confidence = {"combiner": combiner}
        records.append({"split": split, "edge_correct": right, "confidence": confidence})
        agreement.append(rng.choice([0.8, 1.0]) if right else rng.choice([0.0, 0.2, 0.4]))
    stacked = bench._stacked(records, agreement)
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    right = [records[i]["edge_correct"] for i in test]
    assert auroc([stacked[i] for i in test], right) > 0.95  # the agreement carries the signal
    # Flipping the test items' labels changes nothing: they are not fitted on.
    for i in test:
        records[i]["edge_correct"] = not records[i]["edge_correct"]
    assert bench._stacked(records, agreement) == pytest.approx(stacked)


async def test_the_samples_come_from_the_eval_cache(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("TIDEGATE_EVAL_CACHE_DIR", str(tmp_path / "not-this-one"))
    backend = tiny_backend()
    try:
        cached = CachedBackend(backend, tmp_path)
        request = GenerationRequest(
            (ChatMessage("user", Q),), SamplingParams(max_new_tokens=6), request_id="q1"
        )
        greedy = await cached.generate(request)
        said = await ConsistencyEstimator(cached, samples=2, temperature=0.7).sample(request)
    finally:
        await backend.close()
    record = {"id": "q1", "question": Q, "edge_text": greedy.text}
    # the cache the evaluation wrote (metrics.json's run names it), not the default
    run = {"edge_model": backend.info.model, "max_new_tokens": 6, "cache": {"dir": str(tmp_path)}}
    rows = await bench._answers([record], run, 2, 0.7)
    assert rows == [(Q, greedy.text, [s.text for s in said])]
    # an empty greedy reply was never sampled (the estimator scores it 0): nothing to read
    empty = {"id": "q2", "question": "Say nothing.", "edge_text": "", "edge_tokens": 0}
    assert await bench._answers([empty], run, 2, 0.7) == [("Say nothing.", "", [])]
    assert bench.agreement(same_answer, "Say nothing.", "", [], pairwise=False) == 0.0
    with pytest.raises(LookupError, match="not in the eval cache"):
        await bench._answers([record], run, 3, 0.7)  # a third sample was never generated
