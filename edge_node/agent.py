"""The edge agent: an edge node that registers with a router and serves its device.

``tidegate edge serve --register ROUTER`` (or ``register:`` in the edge's YAML)
starts one process serving, on the edge's one port:

* ``tidegate.v1.ModelNode``: what the router calls (unchanged);
* ``tidegate.v1.Router``: the router's API for applications on the device
  (``edge_node.facade``): forwarded to the router, answered from the local
  model and flagged ``offline`` while the router cannot be reached.

and keeps, in the background, a lease at the router (``RegistrationAgent``):
register, heartbeat with the current load, register again when the router
forgot the edge (restart, expiry), retry with capped jittered exponential
backoff while the router is away, deregister on a clean shutdown. With
``register.announce: false`` it only probes the router's health, for devices
the router cannot dial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.agent_settings import RegisterSettings
from edge_node.settings import EdgeSettings
from tidegate.backend import BackendInfo, Generation, ModelBackend
from tidegate.chat import GenerationRequest
from tidegate.errors import ConfigError
from tidegate.registration import (
    EDGE_NAME_PATTERN,
    EDGE_NAME_RULE,
    TOKEN_METADATA,
    WILDCARD_HOSTS,
)
from tidegate.server import GRACE_SECONDS, RunningServer, split_address, start_server
from tidegate.tls import open_channel
from tidegate.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

DEREGISTER_TIMEOUT_S = 2.0
# The router's connection retries follow our own backoff, not gRPC's (up to 120 s).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
]
# Codes that mean "the router is away" rather than "the router said no".
AWAY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# A heartbeat answered so: the router no longer holds this edge's lease.
FORGOTTEN = grpc.StatusCode.NOT_FOUND


class MeteredBackend:
    """A ModelBackend that counts the requests it is serving: the load the
    heartbeat reports (router calls and local applications alike)."""

    def __init__(self, inner: ModelBackend, capacity: int) -> None:
        self.inner = inner
        self.capacity = capacity
        self.in_flight = 0

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.capacity)

    def __getattr__(self, name: str) -> object:
        # Estimators that need more than the interface (the model, the tokenizer).
        return getattr(self.inner, name)

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    async def generate(self, request: GenerationRequest) -> Generation:
        self.in_flight += 1
        try:
            return await self.inner.generate(request)
        finally:
            self.in_flight -= 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        self.in_flight += 1
        try:
            async for item in self.inner.stream(request):
                yield item
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        await self.inner.close()


class Backoff:
    """Exponential, capped, with jitter in [delay/2, delay]: many edges that
    lost one router do not all come back at the same instant."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2**self.failures)
        self.failures = min(self.failures + 1, 62)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class AgentState:
    """What the agent knows about the router (shown by the facade's Status)."""

    reachable: bool = False  # the last call to the router got through
    registered: bool = False  # holds a lease right now
    registrations: int = 0  # successful Register calls (re-registrations count)
    last_error: str = ""
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # set while reachable


class RegistrationAgent:
    """Keeps this edge registered with (or at least in touch with) the router."""

    def __init__(
        self,
        settings: RegisterSettings,
        channel: grpc.aio.Channel,
        describe: RegistrationInfo,
        meter: MeteredBackend,
        token: str | None,
    ) -> None:
        self.settings = settings
        self.name = settings.name or ""  # set by start() once the port is known
        self.advertise = settings.advertise or ""
        self.instance_id = uuid.uuid4().hex
        self.state = AgentState()
        self._describe = describe
        self._meter = meter
        self._registry = registry_pb2_grpc.EdgeRegistryStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata = ((TOKEN_METADATA, token),) if token else ()
        self._task: asyncio.Task[None] | None = None

    # -- state the facade reads and writes ------------------------------------

    def _reachable(self) -> None:
        self.state.reachable = True
        self.state.last_error = ""
        self.state.reached.set()

    def lost(self, detail: str) -> None:
        """The router could not be reached (by us or by a forwarded request)."""
        if self.state.reachable:
            log.warning("router %s is unreachable: %s", self.settings.router, detail)
        self.state.reachable = False
        self.state.last_error = detail
        self.state.reached.clear()

    # -- the loop -------------------------------------------------------------

    def start(self, advertise: str) -> None:
        """Begin registering as ``advertise`` (the HOST:PORT the router dials)."""
        self.advertise = advertise
        self.name = edge_name(self.settings, advertise)
        self._task = asyncio.create_task(self._run(), name=f"edge-agent-{self.name}")

    def _load(self) -> registry_pb2.EdgeLoad:
        return registry_pb2.EdgeLoad(in_flight=self._meter.in_flight, queued=self._meter.queued)

    async def _contact(self) -> float:
        """Register (or probe, when not announcing); returns the heartbeat interval."""
        timeout = self.settings.rpc_timeout_s
        if not self.settings.announce:
            await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return self.settings.heartbeat_interval_s or 5.0
        info = self._describe
        reply = await self._registry.Register(
            registry_pb2.RegisterRequest(
                name=self.name,
                address=self.advertise,
                instance_id=self.instance_id,
                model=info.model,
                capacity=self._meter.capacity,
                estimator=info.estimator,
                context_length=info.context_length,
                load=self._load(),
            ),
            timeout=timeout,
            metadata=self._metadata,
        )
        self.state.registered = True
        self.state.registrations += 1
        log.info(
            "registered with router %s as %s (%s); heartbeat every %.1fs",
            self.settings.router,
            self.name,
            self.advertise,
            self.settings.heartbeat_interval_s or reply.heartbeat_interval_s,
        )
        return self.settings.heartbeat_interval_s or reply.heartbeat_interval_s

    async def _renew(self) -> None:
        timeout = self.settings.rpc_timeout_s
        if not self.settings.announce:
            await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return
        await self._registry.Heartbeat(
            registry_pb2.HeartbeatRequest(
                name=self.name, instance_id=self.instance_id, load=self._load()
            ),
            timeout=timeout,
            metadata=self._metadata,
        )

    def _failed(self, exc: Exception, doing: str) -> None:
        self.state.registered = False
        if not isinstance(exc, grpc.aio.AioRpcError):
            self._broke(exc, doing)
            return
        detail = f"{doing}: {exc.code().name}: {exc.details()}"
        if exc.code() in AWAY_CODES:
            self.lost(detail)
            return
        # The router answered, but refused: a configuration problem on one side.
        self._reachable()
        self.state.last_error = detail
        log.error("router %s refused %s (retrying with backoff)", self.settings.router, detail)

    def _broke(self, exc: Exception, doing: str) -> None:
        """Anything but a status from the router: a bug, or a call gRPC refused to
        send (an illegal metadata value raises cygrpc's ExecuteBatchError). Left
        uncaught it would end the task silently and the edge would never
        register; log it with its traceback, and retry."""
        log.error(
            "edge agent: %s with router %s failed unexpectedly (retrying with backoff)",
            doing,
            self.settings.router,
            exc_info=exc,
        )
        self.lost(f"{doing}: {type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        doing = "register" if self.settings.announce else "health check"
        while True:
            try:
                interval = await self._contact()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any error
                self._failed(exc, doing)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._reachable()
            while True:  # keep the lease until the router forgets it or goes away
                await asyncio.sleep(interval)
                try:
                    await self._renew()
                except Exception as exc:  # noqa: BLE001 - as above: log, back off, register again
                    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is FORGOTTEN:
                        log.info(
                            "router %s forgot this edge (%s); registering again",
                            self.settings.router,
                            exc.details(),
                        )
                        self.state.registered = False
                    else:
                        self._failed(exc, "heartbeat")
                        await asyncio.sleep(backoff.next_delay())
                    break
                self._reachable()

    async def stop(self) -> None:
        """Stop the loop and give the lease back (best effort, short deadline)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.state.registered and self.settings.announce:
            try:
                await self._registry.Deregister(
                    registry_pb2.DeregisterRequest(name=self.name, instance_id=self.instance_id),
                    timeout=min(DEREGISTER_TIMEOUT_S, self.settings.rpc_timeout_s),
                    metadata=self._metadata,
                )
                log.info("deregistered %s from router %s", self.name, self.settings.router)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not deregister from %s: %s", self.settings.router, exc.details())
            except Exception as exc:  # noqa: BLE001 - best effort: never fail a shutdown
                log.warning("could not deregister from %s: %r", self.settings.router, exc)
            self.state.registered = False


@dataclass(frozen=True)
class RegistrationInfo:
    """What Register tells the router about this edge."""

    model: str
    estimator: str
    context_length: int


def advertised_address(settings: EdgeSettings, bound_port: int) -> str:
    """``register.advertise``, else the listen host with the port actually bound."""
    registration = settings.registration
    assert registration is not None
    if registration.advertise:
        return registration.advertise
    host, _ = split_address(settings.listen)
    if host in WILDCARD_HOSTS:
        raise ConfigError(
            f"register.advertise: listen is {settings.listen}, which the router cannot "
            "dial; set register.advertise to this edge's HOST:PORT as the router sees it"
        )
    return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"


def edge_name(registration: RegisterSettings, advertise: str) -> str:
    """``register.name``, else the advertised address as a name the router accepts.

    An IPv6 address (``[::1]:50052``) starts with ``[``, which the router refuses
    as a first character, hence the ``edge@`` before it.
    """
    if registration.name:
        return registration.name
    name = f"edge@{advertise}" if advertise.startswith("[") else advertise
    if not EDGE_NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"register.name: the default name {name!r} (from the advertised address) is "
            f"not one the router accepts ({EDGE_NAME_RULE}); set register.name"
        )
    return name


def registry_token(registration: RegisterSettings) -> str | None:
    """The registry token from ``register.token_env``, as gRPC metadata can carry it.

    Surrounding whitespace is dropped: a token read from a file or a Kubernetes
    secret often ends in a newline. Anything else outside printable ASCII cannot
    be sent at all (gRPC refuses the call before it leaves), so fail at startup.
    """
    if registration.token_env is None:
        return None
    name = registration.token_env
    token = os.environ.get(name, "").strip()
    if not token:
        raise ConfigError(
            f"register.token_env: the environment variable {name} is not set (or empty)"
        )
    if not all(" " <= char <= "~" for char in token):
        raise ConfigError(
            f"register.token_env: the token in the environment variable {name} has "
            "characters gRPC metadata cannot carry; use printable ASCII only"
        )
    return token


@dataclass
class EdgeAgentServer(RunningServer):
    """A running edge agent; ``stop`` deregisters, then stops serving."""

    agent: RegistrationAgent | None = None
    channel: grpc.aio.Channel | None = None  # to the router

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        try:
            if self.agent is not None:
                await self.agent.stop()
            await super().stop(grace)
        finally:
            if self.channel is not None:
                await self.channel.close()


async def serve_edge_agent(settings: EdgeSettings, backend: ModelBackend) -> EdgeAgentServer:
    """Serve ModelNode + the Router facade on ``settings.listen`` and start the agent."""
    from edge_node.facade import EdgeFacade
    from edge_node.service import build_edge_servicer

    registration = settings.registration
    assert registration is not None
    token = registry_token(registration)
    # Fail now on a wildcard listen without advertise, or a default name the router
    # would refuse. The widest port stands in for the one not bound yet: a name
    # that fits with it fits with any.
    edge_name(registration, advertised_address(settings, 65535))
    meter = MeteredBackend(backend, registration.capacity)
    node = build_edge_servicer(settings, meter)
    channel = open_channel(
        registration.router, registration.tls, RECONNECT_OPTIONS, field="register.tls"
    )
    info = backend.info
    agent = RegistrationAgent(
        registration,
        channel,
        describe=RegistrationInfo(
            model=info.model,
            estimator=node.estimator.name if node.estimator else "",
            context_length=info.context_length,
        ),
        meter=meter,
        token=token,
    )
    facade = EdgeFacade(meter, node.estimator, node.limits, channel, agent)
    try:
        running = await start_server(
            [node.service(), facade.service()], settings.listen, settings.tls
        )
    except BaseException:
        await channel.close()
        raise
    agent.start(advertised_address(settings, running.port))
    log.info(
        "edge agent %s on %s: Router API for local apps, registering with %s",
        agent.name,
        running.address,
        registration.router,
    )
    return EdgeAgentServer(
        server=running.server,
        port=running.port,
        host=running.host,
        health=running.health,
        agent=agent,
        channel=channel,
    )
