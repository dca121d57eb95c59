"""Starting a router for a test with its node targets spelled out (names,
timeouts, expected latencies), beside ``tests.support.stack.Stack``
whose ``router`` takes bare addresses."""

from __future__ import annotations

from typing import Any

import grpc

from router.service import RouterServer, serve_router
from router.settings import RouterSettings
from tidegate.server import wait_for_health
from tidegate.v1 import router_pb2_grpc


def target(name: str, address: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "address": address, **fields}


async def start_router(
    stack: Any, edge: list[dict[str, Any]], cloud: list[dict[str, Any]], **settings: Any
) -> RouterServer:
    """Serve a router (no HTTP or metrics endpoint) until the test's stack closes;
    ``stack.stub`` and ``stack.server`` then point at it."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http": {"enabled": False},
        "metrics": {"enabled": False},
        "edge": edge,
        "cloud": cloud,
        "policy": {"version": "test-7", "default_max_new_tokens": 16},
        **settings,
    }
    server = await serve_router(RouterSettings.model_validate(data))
    stack.exits.push_async_callback(server.stop, 0)
    await wait_for_health(server.address, timeout=10)
    channel = grpc.aio.insecure_channel(server.address)
    stack.exits.push_async_callback(channel.close)
    stack.stub = router_pb2_grpc.RouterStub(channel)
    stack.server = server
    return server
