"""router.metrics without a server: what each answer counts, and the settings
of the metrics, stream and semantic sections (bounds name the field)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from router.domain import Escalation, RouteResult, Tier, Timings
from router.metrics import RouterMetrics, TenantLabels
from router.settings import MetricsSettings, RouterSettings
from tidegate.chat import FinishReason
from tidegate.config import load_config
from tidegate.errors import ConfigError, ResourceExhausted


def result(tier: Tier, escalation: Escalation = Escalation.NONE, flags=()) -> RouteResult:  # type: ignore[no-untyped-def]
    return RouteResult(
        text="x",
        tier=tier,
        source_tier=None,
        confidence=0.3,
        estimator="seq_prob",
        threshold=0.5,
        escalation=escalation,
        escalation_reason="",
        prompt_tokens=10,
        completion_tokens=5,
        timings=Timings(total_ms=20.0, cloud_ms=19.0, router_overhead_ms=1.0),
        finish_reason=FinishReason.STOP,
        model="m",
        request_id="r",
        policy_version="v",
        flags=tuple(flags),
    )


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_what_an_answer_counts():
    m = RouterMetrics(MetricsSettings())
    m.finished("generate", "acme", result(Tier.CLOUD, Escalation.LOW_CONFIDENCE))
    m.finished("generate", "acme", result(Tier.CACHE, Escalation.NONE))
    shared = result(Tier.CLOUD, Escalation.LOW_CONFIDENCE, flags=["coalesced"])
    m.finished("stream", "acme", shared)
    m.failed("generate", "", ResourceExhausted("over budget"))
    m.failed("generate", "", RuntimeError("bug"))
    assert sample(m, "tidegate_requests_total", rpc="generate", tier="cloud", tenant="acme") == 1
    assert sample(m, "tidegate_requests_total", rpc="stream", tier="cloud", tenant="acme") == 1
    assert sample(m, "tidegate_escalations_total", reason="low_confidence") == 2
    # tokens are spent once: the coalesced answer shared the leader's call
    assert sample(m, "tidegate_cloud_tokens_total", tenant="acme", kind="prompt") == 10
    assert sample(m, "tidegate_answer_flags_total", flag="coalesced") == 1
    errors = "tidegate_request_errors_total"
    assert sample(m, errors, rpc="generate", code="RESOURCE_EXHAUSTED", tenant="(none)") == 1
    assert sample(m, errors, rpc="generate", code="INTERNAL", tenant="(none)") == 1
    overhead = "tidegate_router_overhead_seconds_sum"
    assert sample(m, overhead, rpc="generate", tier="cloud") == pytest.approx(0.001)
    assert b"tidegate_request_duration_seconds_bucket" in generate_latest(m.registry)


def test_tenant_labels_are_capped_and_stable():
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "", "b", "a", "c")] == ["a", "(none)", "other", "a", "other"]


def test_routers_in_one_process_do_not_share_metrics():
    first, second = RouterMetrics(MetricsSettings()), RouterMetrics(MetricsSettings())
    first.finished("generate", "t", result(Tier.EDGE))
    assert sample(second, "tidegate_requests_total", rpc="generate", tier="edge", tenant="t") == 0


@pytest.mark.parametrize(
    "yaml,field",
    [
        ("metrics: {port: 70000}", "metrics.port"),
        ("metrics: {max_tenants: 0}", "metrics.max_tenants"),
        ("stream: {idle_timeout_s: 0}", "stream.idle_timeout_s"),
        ("stream: {early_edge_tokens: maybe}", "stream.early_edge_tokens"),
        ("cache: {semantic: {min_similarity: 0.2}}", "cache.semantic.min_similarity"),
        ("cache: {semantic: {max_entries: 0}}", "cache.semantic.max_entries"),
        ("cache: {semantic: {threshold: 0.9}}", "cache.semantic.threshold"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, yaml, field):
    path = tmp_path / "router.yaml"
    path.write_text(yaml + "\n")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(RouterSettings, path)
