"""Real routers and ModelNode servers on loopback for integration tests.

Everything binds port 0 and waits on the gRPC health service; a ``Stack``
stops what it started when the test's ``AsyncExitStack`` closes (the ``stack``
fixture in tests/integration/conftest.py). Node calls are counted on the node
side by wrapping the real backend (``CountingBackend``), never by mocking the
router.

A tiny random model's confidence means nothing, so tests pick the tier with
the per-request ``min_confidence``: 0 keeps the edge answer, 1 escalates (a
random model is never certain).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import grpc
import pytest

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.tiny_models import tiny_backend, tiny_model_and_tokenizer
from tidegate.backend import BackendInfo, Generation, ModelBackend
from tidegate.chat import GenerationRequest
from tidegate.client import build_request
from tidegate.node_servicer import ModelNodeServicer, NodeLimits
from tidegate.server import RunningServer, start_server, wait_for_health
from tidegate.v1 import router_pb2, router_pb2_grpc

REDIS_URL = "redis://127.0.0.1:6379/0"
QUESTION = "What is the capital of France?"


class CountingBackend:
    """A real backend, counted (and optionally slowed or cut) on the node side."""

    def __init__(self, inner: ModelBackend, delay_s: float = 0.0, cut_stream: bool = False) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.cut_stream = cut_stream
        self.calls = 0

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await self.inner.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        async for item in self.inner.stream(request):
            yield item
            if self.cut_stream and isinstance(item, str) and item:
                raise RuntimeError("node crashed mid-stream")

    async def close(self) -> None:
        await self.inner.close()


class PacedBackend(CountingBackend):
    """A real backend whose stream is paced, stalled or cut on the node side.

    ``delta_delay_s``: sleep before each delta. ``stall_after``: after that many
    deltas, hang for ``stall_s`` (a stalled upstream). ``cut_after``: after
    that many deltas, fail (a crashed upstream). Unary calls are only counted.
    """

    def __init__(
        self,
        inner: ModelBackend,
        delta_delay_s: float = 0.0,
        stall_after: int | None = None,
        stall_s: float = 30.0,
        cut_after: int | None = None,
    ) -> None:
        super().__init__(inner)
        self.delta_delay_s = delta_delay_s
        self.stall_after = stall_after
        self.stall_s = stall_s
        self.cut_after = cut_after

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        self.calls += 1
        sent = 0
        async for item in self.inner.stream(request):
            if isinstance(item, str):
                if sent == self.stall_after:
                    await asyncio.sleep(self.stall_s)
                if sent == self.cut_after:
                    raise RuntimeError("node crashed mid-stream")
                await asyncio.sleep(self.delta_delay_s)
                sent += 1
            yield item


class FixedEstimator:
    """A confidence estimator with a known score, to test exact thresholds."""

    extra_cost = "none"

    def __init__(self, score: float) -> None:
        self.name = f"fixed_{score}"
        self.value = score

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        return self.value


def cloud_backend(context_length: int = 512) -> ModelBackend:
    """The cloud stand-in: seed-0 weights under its own model id.

    Random tiny models rarely emit end-of-sequence; seed 0 answers QUESTION in
    9 tokens (finish STOP), so its answers are complete and cacheable.
    """
    from tidegate.inference.transformers_backend import TransformersBackend

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    return TransformersBackend(
        model,
        tokenizer,
        model_id="tiny-cloud@tiny",
        context_length=context_length,
        quantization="none",
    )


def closed_port_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


class Stack:
    """Starts nodes and routers for one test and stops them all afterwards."""

    def __init__(self, exits: AsyncExitStack) -> None:
        self.exits = exits

    async def node(
        self,
        role: str,
        backend: ModelBackend,
        estimator: Any = "seq_prob",
        default_max_new_tokens: int = 16,
        max_new_tokens_limit: int = 4096,
    ) -> RunningServer:
        if estimator == "seq_prob":
            from edge_node.estimators import build_estimator

            estimator = build_estimator("seq_prob")
        limits = NodeLimits(default_max_new_tokens, max_new_tokens_limit)
        servicer = ModelNodeServicer(backend, role, estimator, limits)
        server = await start_server([servicer.service()], "127.0.0.1:0")
        self.exits.push_async_callback(backend.close)
        self.exits.push_async_callback(server.stop, 0)
        await wait_for_health(server.address, timeout=10)
        return server

    async def router(self, edge: list[str], cloud: list[str], **overrides: Any) -> str:
        edge_timeout_s = overrides.pop("edge_timeout_s", 30)
        data: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "http": {"listen": "127.0.0.1:0"},  # not the default 8080: tests run side by side
            "metrics": {"port": 0},  # nor the default 9464
            "edge": [
                {"name": f"edge{i}", "address": a, "timeout_s": edge_timeout_s}
                for i, a in enumerate(edge)
            ],
            "cloud": [{"name": f"cloud{i}", "address": a} for i, a in enumerate(cloud)],
            "policy": {
                "version": "test-7",
                "default_max_new_tokens": 16,
                **overrides.pop("policy", {}),
            },
            **overrides,
        }
        server = await serve_router(RouterSettings.model_validate(data))
        self.exits.push_async_callback(server.stop, 0)
        self.server = server  # the last router started (http_url: its OpenAI endpoint)
        await wait_for_health(server.address, timeout=10)
        channel = grpc.aio.insecure_channel(server.address)
        self.exits.push_async_callback(channel.close)
        self.stub = router_pb2_grpc.RouterStub(channel)
        self.channel = channel
        return server.address

    async def counted_pair(self, **overrides: Any) -> tuple[CountingBackend, CountingBackend]:
        """A counted edge (tiny, seed 0) and a counted cloud (``cloud_backend``),
        and a router over both (``overrides``: as for ``router``).
        Returns (edge, cloud)."""
        edge = CountingBackend(tiny_backend(seed=0))
        cloud = CountingBackend(cloud_backend())
        edge_server = await self.node("edge", edge)
        cloud_server = await self.node("cloud", cloud, estimator=None)
        await self.router([edge_server.address], [cloud_server.address], **overrides)
        return edge, cloud


def ask(question: str = QUESTION, **kwargs: Any) -> router_pb2.GenerateRequest:
    return build_request(question, **kwargs)


async def status_code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def collect(call: Any) -> tuple[list[Any], router_pb2.GenerateResponse | None]:
    """A GenerateStream's events in order (delta strings, Restart messages),
    then its final response."""
    events: list[Any] = []
    final = None
    async for event in call:
        kind = event.WhichOneof("kind")
        if kind == "response":
            final = event.response
        elif kind == "restart":
            events.append(event.restart)
        else:
            events.append(event.delta)
    return events, final
