"""Hot reload over a real router: a new policy, tenants and budgets take effect;
an invalid file is rejected with a log line and the old policy stays; SIGHUP
to a real `tidegate router serve` process, and the optional file watch."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from router.auth import hash_key
from router.service import serve_router
from router.settings import load_router_settings
from tests.support.cli import spawn_tidegate
from tests.support.stack import (
    CountingBackend,
    Stack,
    ask,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.server import wait_for_health
from tidegate.v1 import router_pb2, router_pb2_grpc


@pytest.fixture
async def nodes(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    return stack, edge_server.address, cloud_server.address, cloud


def config(edge: str, cloud: str, **sections: Any) -> dict[str, Any]:
    policy = {"version": "v1", "min_confidence": 0.0, "default_max_new_tokens": 16}
    return {
        "listen": "127.0.0.1:0",
        "http": {"enabled": False},
        "metrics": {"enabled": False},
        "edge": [{"name": "edge", "address": edge}],
        "cloud": [{"name": "cloud", "address": cloud}],
        **sections,
        "policy": {**policy, **sections.get("policy", {})},
    }


def write(path: Path, data: dict[str, Any] | str) -> None:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")


async def serve(stack: Stack, path: Path):  # type: ignore[no-untyped-def]
    server = await serve_router(load_router_settings(path), path)
    stack.exits.push_async_callback(server.stop, 0)
    channel = grpc.aio.insecure_channel(server.address)
    stack.exits.push_async_callback(channel.close)
    return server, router_pb2_grpc.RouterStub(channel)


async def status(stub: Any, **kwargs: Any) -> router_pb2.StatusResponse:
    return await stub.Status(router_pb2.StatusRequest(), timeout=10, **kwargs)


async def test_reload_applies_a_new_policy_and_keeps_it_when_the_next_file_is_bad(
    nodes, tmp_path, caplog
):
    stack, edge, cloud_address, cloud = nodes
    path = tmp_path / "router.yaml"
    write(path, config(edge, cloud_address))
    server, stub = await serve(stack, path)
    assert (await stub.Generate(ask(tenant="a"), timeout=30)).tier == router_pb2.TIER_EDGE

    write(path, config(edge, cloud_address, policy={"version": "v2", "min_confidence": 1.0}))
    assert server.reloader.reload()
    assert (await status(stub)).policy_version == "v2"
    r = await stub.Generate(ask(tenant="b"), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and r.policy_version == "v2" and r.threshold == 1.0

    write(path, config(edge, cloud_address, policy={"version": "v3", "min_confidence": 2}))
    with caplog.at_level(logging.ERROR, logger="router.reload"):
        assert not server.reloader.reload()
    [line] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "router.reload" and r.levelno >= logging.ERROR
    ]
    assert line.startswith("config reload (SIGHUP) rejected, keeping policy v2: ")
    assert "policy.min_confidence" in line
    report = await status(stub)
    assert report.policy_version == "v2" and "policy.min_confidence" in report.last_reload_error
    kept = await stub.Generate(ask(tenant="c"), timeout=30)
    assert kept.policy_version == "v2" and kept.threshold == 1.0  # the old policy serves

    write(path, "policy: [unclosed")
    assert not server.reloader.reload()
    assert "not valid YAML" in (await status(stub)).last_reload_error
    write(path, config(edge, cloud_address, policy={"version": "v4"}))
    assert server.reloader.reload()
    assert (await status(stub)).last_reload_error == ""


async def test_reload_rotates_keys_and_budgets_but_not_restart_only_fields(nodes, tmp_path, caplog):
    stack, edge, cloud_address, cloud = nodes
    path = tmp_path / "router.yaml"
    write(path, config(edge, cloud_address))
    server, stub = await serve(stack, path)
    assert (await stub.Generate(ask(), timeout=30)).text  # no tenants: no key needed

    tenants = [{"name": "acme", "api_key_hashes": [hash_key("tg_new-key")]}]
    budget = {"tenants": [{"tenant": "acme", "cloud_tokens_per_minute": 1}]}
    changed = config(edge, cloud_address, tenants=tenants, budgets=budget)
    changed["cloud"][0]["timeout_s"] = 5.0  # needs a restart: reported, not applied
    write(path, changed)
    with caplog.at_level(logging.WARNING, logger="router.reload"):
        assert server.reloader.reload()
    assert "cloud changed but only take effect after a restart" in caplog.text
    assert server.servicer.pipeline.clouds[0].timeout_s != 5.0
    code, _ = await status_code(stub.Generate(ask(tenant="x"), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    key = (("authorization", "Bearer tg_new-key"),)
    code, details = await status_code(
        stub.Generate(ask("Budgeted?", min_confidence=1.0), timeout=10, metadata=key)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cloud_tokens_per_minute" in details


async def test_the_file_watch_reloads_on_change(nodes, tmp_path):
    stack, edge, cloud_address, _ = nodes
    path = tmp_path / "router.yaml"
    watched = {"reload": {"watch_file": True, "poll_s": 0.1}}
    write(path, config(edge, cloud_address, **watched))
    _, stub = await serve(stack, path)
    write(path, config(edge, cloud_address, policy={"version": "watched-2"}, **watched))
    for _ in range(50):
        if (await status(stub)).policy_version == "watched-2":
            break
        await asyncio.sleep(0.1)
    assert (await status(stub)).policy_version == "watched-2"


async def test_sighup_reloads_a_running_router_process(nodes, tmp_path):
    stack, edge, cloud_address, _ = nodes
    path = tmp_path / "router.yaml"
    write(path, config(edge, cloud_address))
    process = await spawn_tidegate(
        "router", "serve", "--config", str(path), env={"PYTHONUNBUFFERED": "1"}
    )
    try:
        assert process.stdout is not None
        lines = [(await asyncio.wait_for(process.stdout.readline(), 60)).decode() for _ in "ab"]
        assert lines[0] == f"SIGHUP reloads {path}\n"
        assert lines[1].startswith("tidegate router serving on "), lines
        address = lines[1].split()[-1]
        await wait_for_health(address, timeout=10)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert (await status(stub)).policy_version == "v1"
            write(path, config(edge, cloud_address, policy={"version": "hup-2"}))
            process.send_signal(signal.SIGHUP)
            for _ in range(50):
                if (await status(stub)).policy_version == "hup-2":
                    break
                await asyncio.sleep(0.1)
            assert (await status(stub)).policy_version == "hup-2"
            write(path, config(edge, cloud_address, policy={"version": "hup-3", "bogus": 1}))
            process.send_signal(signal.SIGHUP)
            for _ in range(50):
                if (await status(stub)).last_reload_error:
                    break
                await asyncio.sleep(0.1)
            report = await status(stub)
            assert report.policy_version == "hup-2" and "policy.bogus" in report.last_reload_error
            assert (await stub.Generate(ask(min_confidence=0.0), timeout=30)).text
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    log = err.decode()
    assert "config reloaded (SIGHUP)" in log and "policy v1 -> hup-2" in log
    assert "config reload (SIGHUP) rejected, keeping policy hup-2" in log
    assert process.returncode == 0
