"""The EdgeRegistry gRPC servicer: validate, check the token, update the lease.

Served by the router on its own port, beside the Router service. Leases live
in a ``router.registry`` store; the ``router.directory`` turns them into the
edges the pipeline asks.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import grpc
from redis.exceptions import RedisError

from router.directory import EdgeDirectory
from router.nodes import NodeClient
from router.registry import EdgeRecord, LeaseConflict, RegistryStore, open_registry
from router.settings import RegistrySettings
from tidegate.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    unary_errors,
)
from tidegate.registration import EDGE_NAME_PATTERN, EDGE_NAME_RULE, TOKEN_METADATA, WILDCARD_HOSTS
from tidegate.server import Service, split_address
from tidegate.v1 import registry_pb2, registry_pb2_grpc


def _check_name(name: str) -> None:
    if not EDGE_NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(f"edge name {name!r} is not valid: {EDGE_NAME_RULE}")


def _check_instance(instance_id: str) -> None:
    if not 1 <= len(instance_id) <= 128:
        raise InvalidArgument("instance_id must be 1-128 characters (one per edge process)")


def _check_address(address: str) -> None:
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise InvalidArgument(f"edge address: {exc}") from exc
    if host in WILDCARD_HOSTS or not 1 <= port <= 65535:
        raise InvalidArgument(
            f"edge address {address!r} cannot be dialled (wildcard host or port out of "
            "range); set register.advertise on the edge to the HOST:PORT the router "
            "should dial"
        )


@contextmanager
def _store_errors() -> Iterator[None]:
    """The registry store (Redis) failing is an outage the edge waits out and retries,
    UNAVAILABLE, not a bug (INTERNAL) nor a refusal."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise Unavailable(
            f"the router's edge registry store is unreachable ({type(exc).__name__}: {exc}); "
            "retry with backoff"
        ) from exc


class RegistryServicer(registry_pb2_grpc.EdgeRegistryServicer):
    def __init__(
        self,
        store: RegistryStore,
        directory: EdgeDirectory,
        settings: RegistrySettings,
        reserved_names: set[str],
        token: str | None = None,
    ) -> None:
        self.store = store
        self.directory = directory
        self.settings = settings
        self.reserved_names = reserved_names  # config nodes' names
        self._token = token
        self.redis_field = "registry.url"  # named when its Redis does not answer

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            return
        sent = dict(context.invocation_metadata() or ()).get(TOKEN_METADATA, "")
        if isinstance(sent, bytes):
            sent = sent.decode("utf-8", "replace")
        if not hmac.compare_digest(sent.encode(), self._token.encode()):
            raise Unauthenticated(
                f"edge registration needs the router's registry token in the "
                f"{TOKEN_METADATA!r} metadata (the edge's register.token_env)"
                + ("; the one sent does not match" if sent else "")
            )

    def _timing(self) -> tuple[float, float]:
        return self.settings.heartbeat_interval_s, self.store.ttl_s

    @unary_errors
    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        self._authenticate(context)
        _check_name(request.name)
        _check_instance(request.instance_id)
        _check_address(request.address)
        if request.capacity < 1:
            raise InvalidArgument("capacity must be at least 1 (concurrent requests it serves)")
        if request.name in self.reserved_names:
            raise LeaseConflict(
                f"edge name {request.name!r} is a node in the router's config file; "
                "give the registering edge another register.name"
            )
        with _store_errors():
            await self.store.register(
                EdgeRecord(
                    name=request.name,
                    address=request.address,
                    instance_id=request.instance_id,
                    model=request.model,
                    capacity=request.capacity,
                    estimator=request.estimator,
                    context_length=request.context_length,
                    in_flight=request.load.in_flight,
                    queued=request.load.queued,
                )
            )
            await self.directory.refresh()  # this replica sends it work right away
        interval, ttl = self._timing()
        return registry_pb2.RegisterResponse(heartbeat_interval_s=interval, ttl_s=ttl)

    @unary_errors
    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        self._authenticate(context)
        load = request.load
        with _store_errors():
            leased = await self.store.heartbeat(
                request.name, request.instance_id, load.in_flight, load.queued
            )
        if not leased:
            raise NotFound(
                f"edge {request.name!r} holds no lease here (the router restarted, or "
                "dropped it after a silence longer than its ttl): register again"
            )
        self.directory.heard_from(request.name, load.in_flight, load.queued, time.time())
        interval, ttl = self._timing()
        return registry_pb2.HeartbeatResponse(heartbeat_interval_s=interval, ttl_s=ttl)

    @unary_errors
    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        self._authenticate(context)
        with _store_errors():
            removed = await self.store.deregister(request.name, request.instance_id)
            await self.directory.refresh()
        return registry_pb2.DeregisterResponse(removed=removed)

    async def ping(self) -> None:
        """A Redis store must answer at startup (ConfigError otherwise)."""
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return
        try:
            await ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            raise ConfigError(f"{self.redis_field}: Redis did not answer ({exc})") from exc

    async def close(self) -> None:
        await self.directory.close()  # closes the store too

    def service(self) -> Service:
        return Service(
            add_to_server=registry_pb2_grpc.add_EdgeRegistryServicer_to_server,
            servicer=self,
            name=registry_pb2.DESCRIPTOR.services_by_name["EdgeRegistry"].full_name,
        )


def build_registry(
    settings: RegistrySettings,
    store_kind: str,
    url: str | None,
    edges: list[NodeClient],
    reserved_names: set[str],
    make_client: Callable[[EdgeRecord], NodeClient],
    environ: Mapping[str, str] | None = None,
) -> RegistryServicer:
    """The registry servicer over a new store and a directory that keeps
    ``edges`` (the pipeline's list) in step with it. Connects nothing yet.

    Raises ConfigError when ``token_env`` names an unset variable.
    """
    token = None
    if settings.token_env is not None:
        # Stripped as the edge strips its own: a secret mounted as a variable
        # often ends in a newline, which no gRPC metadata value can carry.
        token = (os.environ if environ is None else environ).get(settings.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"registry.token_env: the environment variable {settings.token_env} "
                "is not set (or empty)"
            )
    store = open_registry(store_kind, url, settings.key_prefix, settings.ttl_s, settings.max_edges)
    directory = EdgeDirectory(edges, store, make_client, settings.refresh_interval_s)
    servicer = RegistryServicer(store, directory, settings, reserved_names, token)
    servicer.redis_field = (
        f"registry.url {url}" if settings.url else f"cache.url {url} (the edge registry's Redis)"
    )
    return servicer
