"""The real bundled edge model (slow: converts the GGUF once, then loads from the cache)."""

from __future__ import annotations

import pytest

from edge_node.estimators import ESTIMATORS, build_estimator
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.config import ModelSettings
from tidegate.inference import list_bundled_models, load_backend

pytestmark = pytest.mark.slow


def _require(name: str) -> None:
    status = {s.name: s for s in list_bundled_models()}[name]
    if not status.available:
        pytest.skip(f"{name} is not installed: {status.install_command}")


@pytest.fixture(scope="module")
def smollm2():
    _require("smollm2-135m")
    # The first run converts the GGUF into the cache (~20 s); later runs load it (~0.3 s).
    load_backend(ModelSettings(source="smollm2-135m", quantization="none", threads=2))
    return load_backend(ModelSettings(source="smollm2-135m", quantization="int8", threads=2))


def test_listing_sees_the_conversion(smollm2):
    status = {s.name: s for s in list_bundled_models()}["smollm2-135m"]
    assert status.available and status.converted
    assert smollm2.info.model == f"smollm2-135m@{status.sha256[:12]}/int8"
    assert smollm2.info.context_length == 8192


async def test_answers_paris_with_a_confidence(smollm2):
    request = GenerationRequest(
        (ChatMessage("user", "What is the capital of France?"),),
        SamplingParams(max_new_tokens=48),
    )
    generation = await smollm2.generate(request)
    assert "Paris" in generation.text
    assert generation.finish_reason is FinishReason.STOP
    for name in ESTIMATORS:
        score = await build_estimator(name).score(request, generation)
        assert 0.0 <= score <= 1.0
    assert await build_estimator("seq_prob").score(request, generation) > 0.5


async def test_stream_equals_generate(smollm2):
    request = GenerationRequest(
        (ChatMessage("user", "Name three colors."),), SamplingParams(max_new_tokens=32)
    )
    items = [item async for item in smollm2.stream(request)]
    generation = await smollm2.generate(request)
    assert "".join(items[:-1]) == items[-1].text == generation.text
