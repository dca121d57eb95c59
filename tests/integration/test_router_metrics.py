"""Prometheus metrics, scraped over real HTTP from a real router after real
requests (tiny model nodes on loopback)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.stack import (
    CountingBackend,
    ask,
    busy_port,
    closed_port_address,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.errors import ConfigError
from tidegate.v1 import router_pb2


class Scrape:
    """One scrape's samples, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def has(self, name: str, **labels: str) -> bool:
        return any(
            s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            for s in self.samples
        )


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def test_metrics_after_real_requests(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    url = stack.server.metrics_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    kept = await stack.stub.Generate(ask(min_confidence=0.0, tenant="a"), timeout=30)
    escalated = await stack.stub.Generate(ask(min_confidence=1.0, tenant="b"), timeout=30)
    hit = await stack.stub.Generate(ask(min_confidence=1.0, tenant="b"), timeout=30)
    assert (kept.tier, escalated.tier, hit.tier) == (
        router_pb2.TIER_EDGE,
        router_pb2.TIER_CLOUD,
        router_pb2.TIER_CACHE,
    )
    async for _ in stack.stub.GenerateStream(ask(min_confidence=0.0, tenant="a"), timeout=30):
        pass
    await status_code(stack.stub.Generate(router_pb2.GenerateRequest(tenant="a"), timeout=10))

    m = await scrape(url)
    assert m.value("tidegate_requests_total", rpc="generate", tier="edge", tenant="a") == 1
    assert m.value("tidegate_requests_total", rpc="generate", tier="cloud", tenant="b") == 1
    assert m.value("tidegate_requests_total", rpc="generate", tier="cache", tenant="b") == 1
    assert m.value("tidegate_requests_total", rpc="stream", tier="edge", tenant="a") == 1
    assert m.value("tidegate_escalations_total", reason="low_confidence") == 1
    assert m.value("tidegate_request_errors_total", code="INVALID_ARGUMENT", tenant="a") == 1
    assert m.value("tidegate_cache_hits_total", match="exact") == 1
    assert m.value("tidegate_cache_misses_total") == 3
    assert m.value("tidegate_cache_entries") == 1
    usage = escalated.usage
    assert m.value("tidegate_cloud_tokens_total", tenant="b", kind="prompt") == usage.prompt_tokens
    assert (
        m.value("tidegate_cloud_tokens_total", tenant="b", kind="completion")
        == usage.completion_tokens
    )
    assert not m.has("tidegate_cloud_tokens_total", tenant="a")  # edge answers cost nothing
    count = "tidegate_request_duration_seconds_count"
    assert m.value(count, rpc="generate", tier="cache") == 1
    assert m.value("tidegate_router_overhead_seconds_count", rpc="generate", tier="edge") == 1
    total = m.value("tidegate_request_duration_seconds_sum", rpc="generate", tier="cloud")
    assert total == pytest.approx(escalated.timings.total_ms / 1000, rel=1e-3)
    for node, tier in (("edge0", "edge"), ("cloud0", "cloud")):
        assert m.value("tidegate_node_healthy", node=node, tier=tier) == 1
        assert m.value("tidegate_node_cooldown_seconds", node=node, tier=tier) == 0
    assert m.value("tidegate_requests_in_flight") == 0


async def test_a_failing_node_shows_unhealthy_and_cooled_down(stack):
    dead = closed_port_address()
    await stack.router(
        [],
        [dead],
        breaker={"failure_threshold": 1, "cooldown_s": 60},
        retries={"cloud_attempts": 1},
    )
    code, _ = await status_code(stack.stub.Generate(ask(), timeout=30))
    assert code.name == "UNAVAILABLE"
    m = await scrape(stack.server.metrics_url)
    assert m.value("tidegate_node_healthy", node="cloud0", tier="cloud") == 0
    assert 50 < m.value("tidegate_node_cooldown_seconds", node="cloud0", tier="cloud") <= 60
    assert m.value("tidegate_node_consecutive_failures", node="cloud0", tier="cloud") >= 1
    assert m.value("tidegate_request_errors_total", code="UNAVAILABLE", tenant="(none)") == 1


async def test_budget_remaining(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router(
        [],
        [cloud_server.address],
        budgets={
            "prompt_token_factor": 4.0,
            "tenants": [{"tenant": "acme", "cloud_tokens_per_day": 1000}],
        },
    )
    labels = {"tenant": "acme", "window": "day", "unit": "cloud_tokens"}
    before = await scrape(stack.server.metrics_url)
    assert before.value("tidegate_budget_remaining", **labels) == 1000
    assert before.value("tidegate_budget_limit", **labels) == 1000
    r = await stack.stub.Generate(ask(tenant="acme"), timeout=30)
    after = await scrape(stack.server.metrics_url)
    spent = r.usage.prompt_tokens + r.usage.completion_tokens
    assert after.value("tidegate_budget_remaining", **labels) == 1000 - spent


async def test_tenant_labels_are_capped(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([], [cloud_server.address], metrics={"port": 0, "max_tenants": 2})
    for tenant in ("t1", "t2", "t3", "t4"):
        await stack.stub.Generate(ask(tenant=tenant), timeout=30)
    m = await scrape(stack.server.metrics_url)
    assert m.value("tidegate_requests_total", tier="cloud", tenant="t2") == 1
    assert m.value("tidegate_requests_total", tier="cloud", tenant="other") == 2
    assert not m.has("tidegate_requests_total", tenant="t3")


async def test_only_the_metrics_path_is_served_and_openmetrics_is_negotiated(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([], [cloud_server.address])
    url = stack.server.metrics_url
    async with httpx.AsyncClient() as client:
        missing = await client.get(url.removesuffix("/metrics") + "/other", timeout=10)
        posted = await client.post(url, timeout=10)
        openmetrics = await client.get(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=10
        )
    assert missing.status_code == 404 and posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


async def test_a_port_in_use_fails_the_startup_naming_the_field():
    with busy_port() as port:
        settings = RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "http": {"enabled": False},
                "registry": {"enabled": False},
                "metrics": {"port": port},
                "edge": [],
            }
        )
        with pytest.raises(ConfigError, match=f"metrics.port {port}"):
            await serve_router(settings)


async def test_metrics_can_be_turned_off(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([], [cloud_server.address], metrics={"enabled": False})
    assert stack.server.metrics_url is None


async def test_a_tenant_named_default_and_requests_without_a_tenant_are_two_series(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router(
        [],
        [cloud_server.address],
        budgets={
            "default": {"cloud_tokens_per_minute": 1000},
            "tenants": [{"tenant": "default", "cloud_tokens_per_minute": 5000}],
        },
    )
    scraped = await scrape(stack.server.metrics_url)  # Scrape's parser refuses duplicates…
    window = {"window": "minute", "unit": "cloud_tokens"}
    # …and each label set is one series: the tenant "default" and the requests naming none
    assert scraped.value("tidegate_budget_limit", tenant="default", **window) == 5000
    assert scraped.value("tidegate_budget_limit", tenant="(none)", **window) == 1000
