"""The shipped calibration fits the shipped edge (slow: loads the bundled SmolLM2).

If the default edge model or its quantization changes, this fails until the combiner
and the thresholds are recalibrated (README, Confidence: "Re-running it").
"""

from __future__ import annotations

import pytest

from edge_node.combiner import calibration_path, cloud_head_path
from edge_node.service import build_edge_servicer
from edge_node.settings import EdgeSettings
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.inference import list_bundled_models, load_backend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_edge():
    settings = EdgeSettings()
    status = {s.name: s for s in list_bundled_models()}.get(settings.model.source)
    if status is None or not status.available:
        pytest.skip(f"{settings.model.source} is not installed")
    return load_backend(settings.model)


async def test_the_default_edge_serves_the_gain_fitted_for_it(default_edge):
    path = calibration_path(default_edge.info.model)
    for weights in (path, cloud_head_path(path)):
        assert weights.is_file(), (
            f"no {weights.name} for the default edge model {default_edge.info.model}: "
            "recalibrate (README, Confidence)"
        )
    servicer = build_edge_servicer(EdgeSettings(), default_edge)
    assert servicer.estimator is not None and servicer.estimator.name == "gain"
    request = GenerationRequest(
        (ChatMessage("user", "What is the capital of France?"),),
        SamplingParams(max_new_tokens=32),
    )
    generation = await default_edge.generate(request)
    score = await servicer.estimator.score(request, generation)
    assert 0.0 < score < 1.0
