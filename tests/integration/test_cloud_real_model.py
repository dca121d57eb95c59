"""The cloud node with its real default model: the bundled Qwen2.5-Coder-0.5B (slow)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cloud_node.service import build_cloud_servicer
from cloud_node.settings import CloudSettings
from tidegate.server import start_server, wait_for_health
from tidegate.v1 import common_pb2, model_node_pb2, model_node_pb2_grpc

pytestmark = pytest.mark.slow


async def test_default_cloud_node_answers_with_the_bundled_qwen() -> None:
    settings = CloudSettings(listen="127.0.0.1:0")
    # Loading is synchronous (seconds; the first run converts the GGUF once).
    servicer = await asyncio.to_thread(build_cloud_servicer, settings)
    running = await start_server([servicer.service()], settings.listen)
    try:
        await wait_for_health(running.address, timeout=10)
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = model_node_pb2_grpc.ModelNodeStub(channel)
            info = await stub.Info(model_node_pb2.NodeInfoRequest(), timeout=10)
            assert (info.role, info.backend) == ("cloud", "transformers")
            assert "qwen2.5-coder-0.5b" in info.model
            assert info.quantization == "int8"
            request = model_node_pb2.NodeGenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="What is 2+2?")],
                sampling=common_pb2.SamplingParams(max_new_tokens=32),
                return_tokens=True,
            )
            reply = await stub.Generate(request, timeout=300)
    finally:
        await running.stop(0)
        await servicer.backend.close()
    assert "4" in reply.text, reply.text
    assert reply.usage.completion_tokens == len(reply.tokens) > 0
    assert all(t.logprob <= 0.0 for t in reply.tokens)
