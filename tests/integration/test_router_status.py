"""The router's view, as an operator sees it: the Status RPC, `tidegate status`,
and JSON logs from a real `tidegate router serve` process whose request ids are
the ones in the responses."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from tests.support.cli import spawn_tidegate, tidegate
from tests.support.stack import (
    CountingBackend,
    Stack,
    ask,
    closed_port_address,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.v1 import router_pb2, router_pb2_grpc


async def test_status_reports_cooldowns_cache_and_budgets(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    dead = closed_port_address()
    address = await stack.router(
        [edge_server.address],
        [dead, cloud_server.address],
        breaker={"failure_threshold": 1, "cooldown_s": 60},
        budgets={
            "prompt_token_factor": 4.0,
            "tenants": [{"tenant": "acme", "cloud_tokens_per_day": 5000}],
        },
    )
    first = await stack.stub.Generate(ask(min_confidence=1.0, tenant="acme"), timeout=30)
    assert first.tier == router_pb2.TIER_CLOUD  # cloud0 failed, cloud1 answered
    await stack.stub.Generate(ask(min_confidence=1.0, tenant="acme"), timeout=30)  # a hit
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    nodes = {n.name: n for n in status.nodes}
    assert nodes["cloud0"].cooldown_remaining_s > 50 and nodes["cloud0"].breaker == "open"
    assert nodes["cloud0"].consecutive_failures >= 1 and not nodes["cloud0"].healthy
    assert nodes["cloud1"].cooldown_remaining_s == 0 and nodes["cloud1"].healthy
    assert (status.cache_entries, status.cache_hits, status.cache_misses) == (1, 1, 1)
    assert not status.cache_shared
    spent = first.usage.prompt_tokens + first.usage.completion_tokens
    day = next(b for b in status.budgets if b.tenant == "acme" and b.window == "day")
    assert (day.unit, day.limit, day.remaining) == ("cloud_tokens", 5000, 5000 - spent)

    code, out, err = await tidegate("status", "--router", address)
    assert code == 0, err
    assert f"cloud0       {dead}" in out and "UNAVAILABLE" in out
    assert "cooled down for" in out and "consecutive failures" in out
    assert "cache (in-process): 1 entries, 1 hits (0 semantic), 1 misses, hit rate 50.0%" in out
    assert f"budget acme: {5000 - spent:g} of 5000 cloud_tokens left this day" in out
    code, out, _ = await tidegate("status", "--router", address, "--json")
    data = json.loads(out)
    assert data["cache_hits"] == 1 and data["budgets"][0]["tenant"] == "acme"
    assert data["cache_shared"] is False and data["cache_semantic_hits"] == 0
    by_name = {n["name"]: n for n in data["nodes"]}
    assert by_name["cloud0"]["healthy"] is False and by_name["cloud1"]["healthy"] is True


def test_status_json_has_every_field_with_integers_as_numbers(monkeypatch, capsys):
    """False, zero and empty fields are there (an absent ``healthy`` would read as
    unknown), and uint64 counters are JSON numbers, not strings."""
    import tidegate.client
    from tidegate.cli import run

    reply = router_pb2.StatusResponse(
        nodes=[router_pb2.NodeStatus(name="e", tier="edge", healthy=False)],
        cache_hits=2**40,
        budgets=[router_pb2.BudgetStatus(tenant="acme", limit=5, remaining=0)],
    )

    class FakeClient:
        def __init__(self, *_args, **_kwargs):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *_exc):
            return None

        async def status(self):
            return reply

    monkeypatch.setattr(tidegate.client, "RouterClient", FakeClient)
    assert run(["status", "--router", "127.0.0.1:1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cache_hits"] == 2**40 and data["cache_misses"] == 0 and data["cache_entries"] == 0
    assert data["cache_shared"] is False and data["last_reload_error"] == ""
    node = data["nodes"][0]
    assert node["healthy"] is False and node["consecutive_failures"] == 0
    assert node["cooldown_remaining_s"] == 0 and node["registered"] is False
    assert data["budgets"] == [
        {"tenant": "acme", "window": "", "unit": "", "limit": 5, "remaining": 0}
    ]


async def test_json_logs_carry_the_request_id_of_the_response(tmp_path: Path):
    """A real `tidegate --log-format json router serve` process."""
    cloud_stack = AsyncExitStack()
    async with cloud_stack:
        stack = Stack(cloud_stack)
        cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
        config = tmp_path / "router.yaml"
        config.write_text(
            "listen: 127.0.0.1:0\n"
            "edge: []\n"
            f"cloud: [{{name: cloud, address: '{cloud_server.address}'}}]\n"
            "http: {enabled: false}\n"
            "metrics: {port: 0}\n"
            "registry: {enabled: false}\n"
            "policy: {default_max_new_tokens: 8}\n"
        )
        proc = await spawn_tidegate(
            "--log-format",
            "json",
            "router",
            "serve",
            "--config",
            str(config),
            env={"TIDEGATE_LOG_FORMAT": "text"},  # the flag wins
        )
        try:
            line = b""
            while b" serving on " not in line:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
                assert line, "the router exited"
            address = line.decode().split(" serving on ")[1].split()[0]
            async with grpc.aio.insecure_channel(address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                answered = await stub.Generate(ask(tenant="logs"), timeout=30)
                bad = router_pb2.GenerateRequest(request_id="bad-request-1")
                code, _ = await status_code(stub.Generate(bad, timeout=10))
        finally:
            proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 30)
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert records, "no log lines"  # every line parsed as JSON: one object per line
    done = [r for r in records if r.get("request_id") == answered.request_id]
    assert done and done[-1]["event"] == "request" and done[-1]["tier"] == "cloud"
    assert done[-1]["tenant"] == "logs" and done[-1]["total_ms"] > 0
    failed = [r for r in records if r.get("request_id") == "bad-request-1"]
    assert code.name == "INVALID_ARGUMENT"
    assert failed and failed[-1]["code"] == "INVALID_ARGUMENT"
    assert any("serving on" in r["msg"] and "request_id" not in r for r in records)
