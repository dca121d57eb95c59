"""The "done when" of tidegate end to end, with the real bundled models.

Starts what `tidegate up` starts (cloud: Qwen2.5-Coder-0.5B, edge: SmolLM2-135M,
router with an in-process cache) on free ports and asks what a new user asks.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest

from tidegate.chat import SamplingParams
from tidegate.cli import start_local_stack
from tidegate.client import RouterClient, build_request, response_to_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def router_address(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    config_dir = tmp_path_factory.mktemp("stack")
    (config_dir / "cloud.yaml").write_text("listen: 127.0.0.1:0\n")
    (config_dir / "edge.yaml").write_text("listen: 127.0.0.1:0\n")
    servers = await start_local_stack(
        str(config_dir),
        log=lambda _m: None,
        router_overrides={
            "listen": "127.0.0.1:0",
            "http": {"enabled": False},
            "metrics": {"enabled": False},
        },
    )
    try:
        yield servers[-1].address
    finally:
        for server in reversed(servers):
            await server.stop(0)


async def ask(address: str, question: str, **kwargs: object) -> dict:
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    request = build_request(
        question,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        **kwargs,  # type: ignore[arg-type]
    )
    async with RouterClient(address, timeout_s=300) as client:
        return response_to_dict(await client.generate(request))


async def test_a_simple_question_is_answered_by_the_edge(router_address: str) -> None:
    data = await ask(router_address, "What is the capital of France?", min_confidence=0.0)
    assert data["tier"] == "edge"
    assert "Paris" in data["text"]
    assert 0.0 <= data["confidence"] <= 1.0 and data["estimator"]


async def test_min_confidence_one_escalates_then_the_cache_answers(router_address: str) -> None:
    question = "What is the capital of Japan?"
    first = await ask(router_address, question, min_confidence=1.0)
    assert first["tier"] == "cloud"
    assert "confidence" in first["escalation_reason"]
    assert "Tokyo" in first["text"]
    again = await ask(router_address, question, min_confidence=1.0)
    assert again["tier"] == "cache" and again["source_tier"] == "cloud"
    assert again["text"] == first["text"]


async def test_over_the_edge_budget_goes_to_the_cloud(router_address: str) -> None:
    data = await ask(
        router_address, "Name the largest planet in our solar system.", max_new_tokens=1000
    )
    assert data["tier"] == "cloud"
    assert "budget" in data["escalation_reason"]


async def test_an_empty_question_is_refused_and_the_router_keeps_answering(
    router_address: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(router_address, "")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in (info.value.details() or "")
    data = await ask(router_address, "What is 2 + 2?", min_confidence=0.0)
    assert data["tier"] == "edge"


def test_the_cache_dir_is_the_users() -> None:
    # The models were converted once into the user's cache, not into the repo.
    assert not os.path.exists("models")
