"""A real gRPC ModelNode server over the tiny backend: answers, errors, robustness."""

from __future__ import annotations

import grpc
import pytest

from tidegate.v1 import common_pb2, model_node_pb2, model_node_pb2_grpc

QUESTION = common_pb2.ChatMessage(role="user", content="What is the capital of France?")


def _request(**kwargs) -> model_node_pb2.NodeGenerateRequest:
    kwargs.setdefault("messages", [QUESTION])
    return model_node_pb2.NodeGenerateRequest(**kwargs)


@pytest.fixture
async def stub(tiny_edge_node):
    async with grpc.aio.insecure_channel(tiny_edge_node.address) as channel:
        yield model_node_pb2_grpc.ModelNodeStub(channel)


async def test_generate_returns_text_confidence_and_tokens(stub):
    reply = await stub.Generate(_request(return_tokens=True), timeout=10)
    assert reply.usage.completion_tokens == len(reply.tokens) > 0
    assert reply.usage.prompt_tokens > 0
    assert 0.0 <= reply.confidence.score <= 1.0
    assert reply.confidence.estimator == "seq_prob"
    assert reply.model == "tiny-llama-s0@tiny/none"
    assert all(t.logprob <= 0.0 and t.entropy >= 0.0 for t in reply.tokens)
    # default_max_new_tokens of the fixture is 16 and the random model rarely stops
    assert reply.usage.completion_tokens <= 16


async def test_stream_matches_unary(stub):
    unary = await stub.Generate(_request(), timeout=10)
    deltas, final = [], None
    async for chunk in stub.GenerateStream(_request(), timeout=10):
        if chunk.HasField("response"):
            final = chunk.response
        else:
            deltas.append(chunk.delta)
    assert final is not None
    assert "".join(deltas) == final.text == unary.text
    assert final.confidence.score == pytest.approx(unary.confidence.score)


async def test_info(stub):
    info = await stub.Info(model_node_pb2.NodeInfoRequest(), timeout=5)
    assert (info.role, info.backend, info.quantization) == ("edge", "transformers", "none")
    assert info.estimator == "seq_prob"
    assert info.context_length == 512


async def test_cloud_fixture_has_no_confidence(tiny_cloud_node):
    async with grpc.aio.insecure_channel(tiny_cloud_node.address) as channel:
        stub = model_node_pb2_grpc.ModelNodeStub(channel)
        reply = await stub.Generate(_request(), timeout=10)
        info = await stub.Info(model_node_pb2.NodeInfoRequest(), timeout=5)
    assert not reply.HasField("confidence")
    assert (info.role, info.estimator) == ("cloud", "")


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"messages": []},
        {"messages": [common_pb2.ChatMessage(role="robot", content="hi")]},
        {"sampling": common_pb2.SamplingParams(max_new_tokens=0)},
        {"sampling": common_pb2.SamplingParams(max_new_tokens=100_000)},
    ],
    ids=["empty", "unknown-role", "max-new-tokens-0", "over-limit"],
)
async def test_bad_requests_are_invalid_argument(stub, request_kwargs):
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(_request(**request_kwargs), timeout=5)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.GenerateStream(_request(**request_kwargs), timeout=5):
            pass
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the server keeps answering
    assert (await stub.Generate(_request(), timeout=10)).text is not None


async def test_context_overflow_is_invalid_argument(stub):
    long = common_pb2.ChatMessage(role="user", content="word " * 600)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(_request(messages=[long]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 512 tokens" in err.value.details()


def _length_delimited(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128  # one-byte varint length is enough here
    return bytes([field << 3 | 2, len(payload)]) + payload


async def test_non_utf8_bytes_are_invalid_argument(tiny_edge_node):
    # NodeGenerateRequest.messages (1) → ChatMessage.content (2) = b"\xff\xfe"
    message = _length_delimited(2, b"\xff\xfe")
    raw = _length_delimited(1, message)
    async with grpc.aio.insecure_channel(tiny_edge_node.address) as channel:
        call = channel.unary_unary(
            "/tidegate.v1.ModelNode/Generate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(raw, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in err.value.details()
        # the same connection keeps working
        stub = model_node_pb2_grpc.ModelNodeStub(channel)
        assert (await stub.Generate(_request(), timeout=10)).usage.completion_tokens > 0


@pytest.mark.parametrize("failure", ["cpu-allocator", "torch-out-of-memory"])
async def test_out_of_memory_is_resource_exhausted(failure):
    """Torch's allocators raise RuntimeErrors, not MemoryError: still RESOURCE_EXHAUSTED
    (the router falls back; the client learns what to change), not INTERNAL."""
    import torch

    from tests.support.tiny_models import start_tiny_node

    def allocate(module, args):
        if failure == "cpu-allocator":
            torch.empty(2**62, dtype=torch.uint8)  # beyond any address space: fails for real
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    server, backend = await start_tiny_node("edge")
    hook = backend.model.get_decoder().register_forward_pre_hook(allocate)  # every step
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = model_node_pb2_grpc.ModelNodeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Generate(_request(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in stub.GenerateStream(_request(), timeout=10):
                    pass
            for err in (unary.value, streamed.value):
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "out of memory" in err.details() and "fewer new tokens" in err.details()
            hook.remove()  # memory is back: the node answers again
            assert (await stub.Generate(_request(), timeout=10)).usage.completion_tokens > 0
    finally:
        await server.stop(0)
        await backend.close()
