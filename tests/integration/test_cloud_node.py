"""The cloud node over real gRPC: ModelNode served by serve_cloud, forwarding to an
OpenAI-compatible HTTP server that answers from a tiny real model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cloud_node.service import CloudServer, build_cloud_servicer, serve_cloud
from cloud_node.settings import CloudSettings, OpenAISettings
from tests.support.openai_server import Failure, OpenAIServer
from tests.support.tiny_models import tiny_backend
from tidegate.backend import ModelBackend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.server import wait_for_health
from tidegate.v1 import common_pb2, model_node_pb2, model_node_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"


def node_request(max_new_tokens: int | None = 16, **extra: object):  # type: ignore[no-untyped-def]
    sampling = common_pb2.SamplingParams()
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    return model_node_pb2.NodeGenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
        sampling=sampling,
        request_id="r1",
        **extra,
    )


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ModelBackend]:
    backend = tiny_backend()
    yield backend
    await backend.close()


@pytest.fixture(scope="module")
async def http_server(model: ModelBackend) -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(model) as running:
        yield running


@pytest.fixture(scope="module")
def settings(http_server: OpenAIServer) -> CloudSettings:
    return CloudSettings(
        listen="127.0.0.1:0",
        backend="openai",
        openai=OpenAISettings(
            base_url=http_server.base_url, model=http_server.model, context_length=512
        ),
        default_max_new_tokens=8,
        max_new_tokens_limit=64,
    )


@pytest.fixture(scope="module")
async def cloud(settings: CloudSettings) -> AsyncIterator[CloudServer]:
    running = await serve_cloud(settings)
    await wait_for_health(running.address, timeout=10)
    yield running
    await running.stop(0)


@pytest.fixture(scope="module")
async def stub(cloud: CloudServer) -> AsyncIterator[model_node_pb2_grpc.ModelNodeStub]:
    async with grpc.aio.insecure_channel(cloud.address) as channel:
        yield model_node_pb2_grpc.ModelNodeStub(channel)


async def direct_answer(model: ModelBackend, max_new_tokens: int):  # type: ignore[no-untyped-def]
    request = GenerationRequest(
        (ChatMessage("user", QUESTION),), SamplingParams(max_new_tokens=max_new_tokens)
    )
    return await model.generate(request)


async def test_info_describes_the_remote_model(
    stub: model_node_pb2_grpc.ModelNodeStub, http_server: OpenAIServer
) -> None:
    info = await stub.Info(model_node_pb2.NodeInfoRequest(), timeout=10)
    assert info.role == "cloud"
    assert info.backend == "openai"
    assert info.model == f"openai:{http_server.model}@{http_server.base_url}"
    assert info.context_length == 512
    assert info.quantization == "remote"
    assert info.estimator == ""


async def test_generate_over_grpc(
    stub: model_node_pb2_grpc.ModelNodeStub, model: ModelBackend, http_server: OpenAIServer
) -> None:
    reply = await stub.Generate(node_request(return_tokens=True), timeout=30)
    direct = await direct_answer(model, 16)
    assert reply.text == direct.text
    assert reply.finish_reason == direct.finish_reason.value
    assert reply.usage.prompt_tokens == direct.prompt_tokens
    assert reply.usage.completion_tokens == direct.completion_tokens
    assert not reply.HasField("confidence")  # cloud nodes run no estimator
    # Per-token log-probs travel; OpenAI servers do not say token ids or entropies.
    assert [t.logprob for t in reply.tokens] == pytest.approx(direct.logprobs)
    assert [t.text for t in reply.tokens] == direct.token_texts
    assert {t.id for t in reply.tokens} == {0}
    assert reply.model.startswith("openai:")


async def test_the_nodes_default_max_new_tokens_reaches_the_server(
    stub: model_node_pb2_grpc.ModelNodeStub, model: ModelBackend, http_server: OpenAIServer
) -> None:
    reply = await stub.Generate(node_request(max_new_tokens=None), timeout=30)
    assert http_server.received[-1].body["max_tokens"] == 8  # type: ignore[index]
    direct = await direct_answer(model, 8)
    assert reply.text == direct.text
    assert reply.finish_reason == direct.finish_reason.value
    assert reply.usage.completion_tokens <= 8


async def test_generate_stream_over_grpc(
    stub: model_node_pb2_grpc.ModelNodeStub, model: ModelBackend
) -> None:
    chunks = [c async for c in stub.GenerateStream(node_request(max_new_tokens=24), timeout=30)]
    deltas = [c.delta for c in chunks if c.WhichOneof("kind") == "delta"]
    assert chunks[-1].WhichOneof("kind") == "response"
    assert all(c.WhichOneof("kind") == "delta" for c in chunks[:-1])
    final = chunks[-1].response
    direct = await direct_answer(model, 24)
    assert "".join(deltas) == final.text == direct.text
    assert final.usage.completion_tokens == direct.completion_tokens


async def test_over_the_limit_is_rejected_before_any_http_call(
    stub: model_node_pb2_grpc.ModelNodeStub, http_server: OpenAIServer
) -> None:
    before = len(http_server.received)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(node_request(max_new_tokens=65), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 64" in (caught.value.details() or "")
    assert len(http_server.received) == before


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, grpc.StatusCode.UNAVAILABLE),
        (401, grpc.StatusCode.UNAVAILABLE),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (400, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_http_failures_become_grpc_status_codes(
    stub: model_node_pb2_grpc.ModelNodeStub,
    http_server: OpenAIServer,
    status: int,
    code: grpc.StatusCode,
) -> None:
    http_server.fail_next(Failure(status=status, message="nope"), times=2)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(node_request(), timeout=10)
    assert unary.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.GenerateStream(node_request(), timeout=10):
            pass
    assert streamed.value.code() == code
    assert "nope" in (streamed.value.details() or "")


async def test_a_cut_http_stream_fails_the_grpc_stream(
    stub: model_node_pb2_grpc.ModelNodeStub, http_server: OpenAIServer
) -> None:
    http_server.fail_next(Failure(drop_after_events=2))
    kinds = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.GenerateStream(node_request(max_new_tokens=24), timeout=10):
            kinds.append(chunk.WhichOneof("kind"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "response" not in kinds  # never a final answer from a cut stream


async def test_stop_closes_the_backend(settings: CloudSettings) -> None:
    running = await serve_cloud(settings)
    assert running.backend is not None
    client = running.backend._client  # type: ignore[attr-defined]
    await running.stop(0)
    assert client.is_closed


def test_build_cloud_servicer_for_openai(settings: CloudSettings) -> None:
    servicer = build_cloud_servicer(settings)
    assert servicer.role == "cloud"
    assert servicer.estimator is None
    assert servicer.limits.default_max_new_tokens == 8
    assert servicer.limits.max_new_tokens_limit == 64


def test_the_openai_path_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from cloud_node.service import build_cloud_servicer\n"
        "from cloud_node.settings import CloudSettings, OpenAISettings\n"
        "build_cloud_servicer(CloudSettings(backend='openai', openai=OpenAISettings()))\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
