"""gRPC server bootstrap shared by the router and the model nodes.

Every server gets the standard health service and reflection, rejects
unparsable requests with INVALID_ARGUMENT (``PayloadGuard``), binds the port it
is given (0 = any free port, reported back) and stops gracefully.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tidegate.errors import PayloadGuard
from tidegate.tls import ClientTls, ServerTls, open_channel, server_credentials

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Service:
    """One servicer to mount: the generated ``add_*_to_server`` and its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str  # e.g. "tidegate.v1.Router", from the generated DESCRIPTOR


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    host: str
    health: health.aio.HealthServicer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must look like HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def start_server(
    services: Sequence[Service],
    address: str,
    tls: ServerTls | None = None,
    tls_field: str = "tls",
) -> RunningServer:
    """Start an aio server on ``address`` (port 0 picks a free port); TLS (or
    mutual TLS) when ``tls`` is given, plaintext otherwise. ``tls_field`` names
    the config section in errors about the certificate files."""
    credentials = server_credentials(tls, tls_field) if tls is not None else None
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    for service in services:
        service.add_to_server(service.servicer, PayloadGuard(server))  # type: ignore[arg-type]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    host, _ = split_address(address)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ", ".join(names), host, port)
    return RunningServer(server=server, port=port, host=host, health=health_servicer)


async def wait_for_health(
    address: str, timeout: float = 30.0, service: str = "", tls: ClientTls | None = None
) -> None:
    """Block until ``address`` answers SERVING on the standard health service."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{address} did not become healthy within {timeout:.0f}s")
            await asyncio.sleep(0.1)
