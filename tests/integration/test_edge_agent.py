"""The edge agent on a device: real gRPC on loopback, tiny real models.

The story of issue 6 §3, as a user lives it: the agent starts while its router
is away and still answers the device's applications (flagged ``offline``);
the router starts on the address the agent was given, the agent registers and
answers now come through the router; the router dies and answers are offline
again; it comes back having forgotten the edge, and the agent registers again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest

from edge_node.agent import EdgeAgentServer, MeteredBackend, RegistrationAgent, RegistrationInfo
from edge_node.agent_settings import RegisterSettings
from edge_node.service import serve_edge
from edge_node.settings import EdgeSettings
from router.service import RouterServer, serve_router
from router.settings import RouterSettings
from tests.support.tiny_models import start_tiny_node, tiny_backend
from tidegate.client import build_request
from tidegate.errors import ConfigError
from tidegate.server import wait_for_health
from tidegate.v1 import router_pb2, router_pb2_grpc

FAST_AGENT = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 0.5}
FAST_REGISTRY = {"heartbeat_interval_s": 0.1, "ttl_s": 1.0, "refresh_interval_s": 0.05}
EDGE_MODEL = "tiny-llama-s0@tiny/none"


def free_address() -> str:
    """A loopback address nothing listens on yet (the router starts there later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


class Device:
    """An edge agent, a router that comes and goes, and clients of both."""

    def __init__(self, exits: AsyncExitStack, router_address: str) -> None:
        self.exits = exits
        self.router_address = router_address
        self.router: RouterServer | None = None
        self.agent: EdgeAgentServer | None = None
        self.app: router_pb2_grpc.RouterStub | None = None  # an app on the device

    async def start_agent(self, **register: Any) -> EdgeAgentServer:
        settings = EdgeSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "default_max_new_tokens": 8,
                "register": {"router": self.router_address, **FAST_AGENT, **register},
            }
        )
        backend = tiny_backend(seed=0)
        agent = await serve_edge(settings, backend)
        assert isinstance(agent, EdgeAgentServer)
        self.exits.push_async_callback(backend.close)
        self.exits.push_async_callback(agent.stop, 0)
        await wait_for_health(agent.address, timeout=10)
        channel = grpc.aio.insecure_channel(agent.address)
        self.exits.push_async_callback(channel.close)
        self.agent, self.app = agent, router_pb2_grpc.RouterStub(channel)
        return agent

    async def start_router(
        self, cloud_address: str, **overrides: Any
    ) -> router_pb2_grpc.RouterStub:
        data = {
            "listen": self.router_address,
            "http": {"enabled": False},
            "metrics": {"enabled": False},  # not the shared default port 9464
            "edge": [],
            "cloud": [{"name": "cloud", "address": cloud_address}],
            "policy": {
                "version": "device-test",
                "default_max_new_tokens": 8,
                "escalate_truncated": False,  # tiny random models rarely finish
                **overrides.pop("policy", {}),
            },
            "registry": FAST_REGISTRY,
            **overrides,
        }
        self.router = await serve_router(RouterSettings.model_validate(data))
        await wait_for_health(self.router.address, timeout=10)
        channel = grpc.aio.insecure_channel(self.router.address)
        self.exits.push_async_callback(channel.close)
        return router_pb2_grpc.RouterStub(channel)

    async def stop_router(self) -> None:
        assert self.router is not None
        await self.router.stop(0)
        self.router = None

    async def ask(self, min_confidence: float = 0.0, **kwargs: Any) -> router_pb2.GenerateResponse:
        assert self.app is not None
        question = kwargs.pop("question", f"What is new on the device {uuid.uuid4().hex}?")
        request = build_request(question, min_confidence=min_confidence, **kwargs)
        return await self.app.Generate(request, timeout=30)


@pytest.fixture
async def device():
    async with AsyncExitStack() as exits:
        d = Device(exits, free_address())
        yield d
        if d.router is not None:
            await d.router.stop(0)


@pytest.fixture
async def cloud():
    server, backend = await start_tiny_node("cloud", seed=1, estimator=None)
    yield server
    await server.stop(0)
    await backend.close()


async def registered_names(stub: router_pb2_grpc.RouterStub) -> set[str]:
    status = await stub.Status(router_pb2.StatusRequest(), timeout=10)
    return {n.name for n in status.nodes if n.registered}


async def test_offline_then_through_the_router_then_offline_again(device, cloud):
    agent = await device.start_agent()

    # 1. No router anywhere: the local model answers, flagged offline.
    offline = await device.ask(min_confidence=0.8)
    assert list(offline.flags) == ["offline"]
    assert offline.tier == router_pb2.TIER_EDGE and offline.model == EDGE_MODEL
    assert offline.estimator == "seq_prob" and 0.0 < offline.confidence < 1.0
    assert offline.threshold == pytest.approx(0.8)  # the request's own, reported as is
    assert offline.policy_version == "edge-offline" and offline.usage.completion_tokens > 0
    assert offline.timings.edge_ms > 0 and len(offline.request_id) == 32

    # 2. The router starts on the address the agent was given: the agent registers.
    router = await device.start_router(cloud.address)

    async def listed() -> bool:
        return await registered_names(router) == {agent.agent.name}

    await eventually(listed)
    assert agent.agent.name == agent.address  # default name: the advertised address
    status = await router.Status(router_pb2.StatusRequest(), timeout=10)
    [edge] = [n for n in status.nodes if n.registered]
    assert edge.address == agent.address and edge.model == EDGE_MODEL and edge.healthy

    # 3. Answers now come through the router: its policy, its tiers, no offline flag.
    kept = await device.ask(min_confidence=0.0)
    assert kept.policy_version == "device-test" and "offline" not in kept.flags
    assert kept.tier == router_pb2.TIER_EDGE and kept.model == EDGE_MODEL  # the router asked us
    escalated = await device.ask(min_confidence=1.0)
    assert escalated.tier == router_pb2.TIER_CLOUD and escalated.model.startswith("tiny-llama-s1")
    assert escalated.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE

    # 4. The router dies: offline again, at once (no error reaches the app).
    await device.stop_router()
    again = await device.ask(min_confidence=1.0)
    assert list(again.flags) == ["offline"] and again.tier == router_pb2.TIER_EDGE


async def test_a_restarted_router_that_forgot_the_edge_gets_it_back(device, cloud):
    agent = await device.start_agent()
    router = await device.start_router(cloud.address)

    async def listed() -> bool:
        return agent.agent.name in await registered_names(router)

    await eventually(listed)
    first = agent.agent.state.registrations
    await device.stop_router()
    router = await device.start_router(cloud.address)  # a fresh in-memory registry
    await eventually(listed)
    assert agent.agent.state.registrations > first
    assert "offline" not in (await device.ask()).flags


async def test_an_edge_whose_lease_expired_registers_again(device, cloud):
    """Heartbeats slower than the router's ttl: each one finds the lease gone
    (NOT_FOUND), and the agent registers again at once (not after a backoff:
    the router is up throughout)."""
    router = await device.start_router(cloud.address)  # ttl 1 s
    agent = await device.start_agent(
        heartbeat_interval_s=1.5, backoff_initial_s=20.0, backoff_max_s=20.0
    )

    async def re_registered() -> bool:
        return agent.agent.state.registrations >= 3

    await eventually(re_registered, timeout=9.0)  # a backoff of 10-20 s would miss it
    assert agent.agent.state.reachable and agent.agent.state.last_error == ""
    assert "offline" not in (await device.ask()).flags

    async def listed() -> bool:
        return agent.agent.name in await registered_names(router)

    await eventually(listed)


async def test_clean_shutdown_deregisters(device, cloud):
    router = await device.start_router(cloud.address, registry={**FAST_REGISTRY, "ttl_s": 60})
    agent = await device.start_agent()

    async def listed() -> bool:
        return agent.agent.name in await registered_names(router)

    await eventually(listed)
    await agent.stop(0)  # the lease would live 60 s; deregistering drops it now
    assert await registered_names(router) == set()


async def test_the_routers_own_errors_pass_through(device, cloud):
    """Reachable router, failed request: the router's status, not an offline answer."""
    await device.start_agent()
    await device.start_router(cloud.address, cloud=[{"name": "gone", "address": free_address()}])

    async def through_router() -> bool:
        return device.agent.agent.state.reachable

    await eventually(through_router)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await device.ask(question="")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await device.ask(min_confidence=1.0)  # escalates; the router's cloud is down
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "cloud node gone" in (err.value.details() or "")
    assert "offline" not in (await device.ask(min_confidence=0.0)).flags


async def test_streaming_offline_and_through_the_router(device, cloud):
    await device.start_agent()
    request = build_request("Stream to me.", min_confidence=0.0)

    async def stream() -> tuple[str, router_pb2.GenerateResponse]:
        deltas, final = [], None
        async for event in device.app.GenerateStream(request, timeout=30):
            if event.HasField("response"):
                final = event.response
            else:
                deltas.append(event.delta)
        assert final is not None
        return "".join(deltas), final

    text, final = await stream()
    assert list(final.flags) == ["offline"] and text == final.text and final.text
    router = await device.start_router(cloud.address)

    async def listed() -> bool:
        return bool(await registered_names(router))

    await eventually(listed)
    text, final = await stream()
    assert final.policy_version == "device-test" and "offline" not in final.flags
    assert text == final.text


async def test_an_agent_that_does_not_announce_only_forwards(device, cloud):
    agent = await device.start_agent(announce=False)
    router = await device.start_router(cloud.address)

    async def reachable() -> bool:
        return agent.agent.state.reachable

    await eventually(reachable)
    assert await registered_names(router) == set()
    answer = await device.ask(min_confidence=0.0)
    assert answer.policy_version == "device-test" and answer.tier == router_pb2.TIER_CLOUD


async def test_the_agents_status_shows_the_router_it_talks_to(device, cloud):
    agent = await device.start_agent()

    async def first_attempt_failed() -> bool:  # the agent tries the router in the background
        return bool(agent.agent.state.last_error)

    await eventually(first_attempt_failed)
    status = await device.app.Status(router_pb2.StatusRequest(), timeout=10)
    edge, router = status.nodes
    assert (edge.tier, edge.model, edge.registered) == ("edge", EDGE_MODEL, False)
    assert (router.tier, router.address, router.healthy) == ("router", device.router_address, False)
    assert "UNAVAILABLE" in router.last_error and status.policy_version == "edge-offline"


async def test_an_error_that_is_not_a_grpc_status_never_ends_the_agent(device, cloud, caplog):
    """gRPC refuses to send a token with a newline (cygrpc's ExecuteBatchError, not
    an AioRpcError), and a bug can raise anything: the agent logs it with its
    traceback, shows it in its state, backs off and retries, at Register and at
    Heartbeat alike, comes back when the fault goes away, and still stops."""
    await device.start_router(cloud.address)
    backend = tiny_backend(seed=0)
    device.exits.push_async_callback(backend.close)
    channel = grpc.aio.insecure_channel(device.router_address)
    device.exits.push_async_callback(channel.close)
    settings = RegisterSettings.model_validate({"router": device.router_address, **FAST_AGENT})
    info = RegistrationInfo(model=EDGE_MODEL, estimator="seq_prob", context_length=512)

    def start(token: str | None) -> tuple[RegistrationAgent, MeteredBackend]:
        meter = MeteredBackend(backend, capacity=1)
        agent = RegistrationAgent(settings, channel, info, meter, token)
        device.exits.push_async_callback(agent.stop)
        agent.start(cloud.address)  # a node the router can dial
        return agent, meter

    def unexpected() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]

    # 1. Register itself fails, every time: still retried, logged, and visible.
    caplog.set_level(logging.ERROR, logger="edge_node.agent")
    refused, _ = start("s3cret\n")  # what a Kubernetes secret's env var often holds

    async def retried() -> bool:
        return len(unexpected()) >= 2

    await eventually(retried)
    assert all(r.exc_info is not None for r in unexpected())
    assert "ExecuteBatchError" in refused.state.last_error and not refused.state.reachable
    await asyncio.wait_for(refused.stop(), 5)  # cancellation still ends the loop
    logged = len(unexpected())
    await asyncio.sleep(0.5)
    assert len(unexpected()) == logged

    # 2. Registered, then heartbeats fail: lost, retried, registered again once fixed.
    agent, meter = start(None)

    async def registered() -> bool:
        return agent.state.registered and agent.state.reachable

    await eventually(registered)
    meter.in_flight = -1  # a counting bug: the load no longer fits its uint32 field

    async def broken() -> bool:
        return not agent.state.reachable and "ValueError" in agent.state.last_error

    await eventually(broken)
    first = agent.state.registrations
    meter.in_flight = 0

    async def back() -> bool:
        return agent.state.registrations > first and await registered()

    await eventually(back)


async def test_misconfigured_agents_fail_at_startup(monkeypatch):
    backend = tiny_backend(seed=0)
    wildcard = EdgeSettings.model_validate(
        {"listen": "0.0.0.0:0", "register": {"router": "127.0.0.1:1"}}
    )
    with pytest.raises(ConfigError, match="register.advertise"):
        await serve_edge(wildcard, backend)
    monkeypatch.delenv("TIDEGATE_TEST_NO_SUCH_TOKEN", raising=False)
    tokenless = EdgeSettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "register": {"router": "127.0.0.1:1", "token_env": "TIDEGATE_TEST_NO_SUCH_TOKEN"},
        }
    )
    with pytest.raises(ConfigError, match="register.token_env"):
        await serve_edge(tokenless, backend)
    await backend.close()


async def test_the_apps_api_key_reaches_the_router(device, cloud):
    """The router authenticates tenants: the app's key travels through the agent,
    and a missing key is the router's UNAUTHENTICATED, not an offline answer."""
    from router.auth import hash_key

    key = "tg_device-test-key-0123456789abcdef"
    await device.start_agent()
    await device.start_router(
        cloud.address, tenants=[{"name": "phone", "api_key_hashes": [hash_key(key)]}]
    )

    async def reachable() -> bool:
        return device.agent.agent.state.reachable

    await eventually(reachable)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await device.ask()
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    request = build_request("Who am I?", min_confidence=0.0)
    answer = await device.app.Generate(
        request, timeout=30, metadata=(("authorization", f"Bearer {key}"),)
    )
    assert answer.policy_version == "device-test" and "offline" not in answer.flags


async def test_tidegate_edge_serve_register_as_a_user_runs_it(cloud, tmp_path):
    """The real CLI in its own process: offline first, registered once the router
    is up, and deregistered by SIGTERM."""
    import signal
    import sys

    from tests.support.tiny_models import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = tmp_path / "edge.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        "default_max_new_tokens: 8\n"
        f"model: {{source: {tmp_path / 'model'}, quantization: none, cache_dir: {tmp_path}}}\n"
        "register: {backoff_initial_s: 0.05, backoff_max_s: 0.2}\n"
    )
    router_address = free_address()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidegate",
        "edge",
        "serve",
        "--config",
        str(config),
        "--register",
        router_address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    router: RouterServer | None = None
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        assert line.startswith("tidegate edge serving on 127.0.0.1:"), line
        agent_address = line.split()[-1]
        async with grpc.aio.insecure_channel(agent_address) as channel:
            app = router_pb2_grpc.RouterStub(channel)
            offline = await app.Generate(build_request("Hi", min_confidence=0.0), timeout=30)
            assert list(offline.flags) == ["offline"]
            router = await serve_router(
                RouterSettings.model_validate(
                    {
                        "listen": router_address,
                        "http": {"enabled": False},
                        "metrics": {"enabled": False},  # not the shared default port 9464
                        "edge": [],
                        "cloud": [{"address": cloud.address}],
                        "registry": {**FAST_REGISTRY, "ttl_s": 60},  # only Deregister drops it
                    }
                )
            )
            async with grpc.aio.insecure_channel(router_address) as router_channel:
                stub = router_pb2_grpc.RouterStub(router_channel)

                async def listed() -> bool:
                    return await registered_names(stub) == {agent_address}

                await eventually(listed)
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 30) == 0
                assert await registered_names(stub) == set()  # deregistered on the way out
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if router is not None:
            await router.stop(0)
