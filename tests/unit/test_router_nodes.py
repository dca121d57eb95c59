"""router.nodes: per-call timeouts, error mapping and health records."""

from __future__ import annotations

import asyncio
import socket

import pytest

from router.nodes import NodeClient, NodeUnavailable, node_request
from tidegate.chat import ChatMessage, SamplingParams
from tidegate.errors import DeadlineExceeded


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


REQUEST = node_request((ChatMessage("user", "hi"),), SamplingParams(max_new_tokens=4), "r1")


async def test_timeout_is_the_smaller_of_target_and_client_deadline():
    node = NodeClient("e", "127.0.0.1:1", "edge", timeout_s=10.0)
    now = asyncio.get_running_loop().time()
    assert node._timeout(None) == 10.0
    assert node._timeout(now + 100) == 10.0
    assert node._timeout(now + 2) == pytest.approx(2, abs=0.1)
    with pytest.raises(DeadlineExceeded, match="deadline passed before the edge node e"):
        node._timeout(now - 1)


async def test_unreachable_node_is_unavailable_and_recorded():
    address = dead_address()
    node = NodeClient("c", address, "cloud", timeout_s=5.0)
    try:
        with pytest.raises(NodeUnavailable) as info:
            await node.generate(REQUEST, None)
        assert str(info.value).startswith(f"cloud node c at {address}: UNAVAILABLE")
        assert not node.health.healthy and node.health.consecutive_failures == 1
        assert node.health.last_error.startswith("UNAVAILABLE")
        with pytest.raises(NodeUnavailable):
            async for _ in node.stream(REQUEST, None):
                pass
        assert node.health.consecutive_failures == 2
        health = await node.probe()
        assert not health.healthy and health.last_ok is None
    finally:
        await node.close()


async def test_a_probe_cut_short_by_the_node_leaving_reports_it_and_never_cancels(tiny_edge_node):
    """The edge directory closes a node's channel when the node leaves, maybe while a
    Status probe of it is in flight: grpc.aio then raises CancelledError in the probe,
    which took the whole Status RPC down (the client waited out its deadline)."""
    node = NodeClient("e", tiny_edge_node.address, "edge", timeout_s=5.0)
    cut = 0
    for attempt in range(40):
        probe = asyncio.create_task(node.probe())
        await asyncio.sleep(attempt % 4 * 0.0005)  # the Info call is on the wire
        await node.close()
        health = await probe  # an answer either way, never CancelledError
        cut += "closed" in health.last_error
    assert cut >= 1  # the race was really exercised
    assert (await node.probe()).healthy  # a fresh channel once asked again
    await node.close()


@pytest.mark.parametrize("score", [float("nan"), 1.5, -0.1])
def test_a_score_that_is_no_probability_counts_as_none(score):
    from router.nodes import _answer_from_pb
    from tidegate.v1 import common_pb2, model_node_pb2

    reply = model_node_pb2.NodeGenerateResponse(
        text="x", confidence=common_pb2.Confidence(score=score, estimator="gain")
    )
    assert _answer_from_pb(reply, "e").confidence is None  # judged as no score: escalated
    reply.confidence.score = 0.7
    assert _answer_from_pb(reply, "e").confidence == pytest.approx(0.7)
