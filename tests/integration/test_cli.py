"""`tidegate` as a user runs it: a real process talking to a real router.

The router and its nodes (tiny random models) run in this test's event loop;
the CLI runs as a subprocess, so argument parsing, output and exit codes are
exactly what a user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.cli import tidegate
from tests.support.tiny_models import start_tiny_node
from tidegate.server import wait_for_health


@pytest.fixture
async def router():
    # Random tiny models rarely finish an answer: keep their truncated answers
    # (escalate_truncated off) so the tier depends only on min_confidence.
    edge, edge_backend = await start_tiny_node("edge", seed=0, max_new_tokens_limit=2048)
    cloud, cloud_backend = await start_tiny_node(
        "cloud", seed=1, estimator=None, max_new_tokens_limit=2048
    )
    settings = RouterSettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "http": {"listen": "127.0.0.1:0"},
            "metrics": {"port": 0},
            "edge": [{"name": "edge", "address": edge.address}],
            "cloud": [{"name": "cloud", "address": cloud.address}],
            "policy": {
                "version": "cli-test",
                "default_max_new_tokens": 8,
                "edge_budget": {"max_new_tokens": 16},
                "escalate_truncated": False,
            },
        }
    )
    server = await serve_router(settings)
    await wait_for_health(server.address)
    yield server.address
    await server.stop(0)
    for node, backend in ((edge, edge_backend), (cloud, cloud_backend)):
        await node.stop(0)
        await backend.close()


async def test_ask_json_reports_the_edge_tier_and_full_provenance(router):
    code, out, err = await tidegate(
        "ask",
        "--router",
        router,
        "--min-confidence",
        "0",
        "--json",
        "What is the capital of France?",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["tier"] == "edge"
    assert 0.0 <= data["confidence"] <= 1.0 and data["estimator"] == "seq_prob"
    assert data["escalation_reason"] == ""
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert set(data["timings_ms"]) == {"total", "edge", "cloud", "router_overhead"}
    assert data["policy_version"] == "cli-test"


async def test_ask_escalates_with_a_reason_that_names_confidence(router):
    code, out, err = await tidegate(
        "ask", "--router", router, "--min-confidence", "1", "--json", "Name a prime number."
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["tier"] == "cloud"
    assert "confidence" in data["escalation_reason"]
    assert data["timings_ms"]["cloud"] > 0


async def test_over_the_edge_budget_goes_to_the_cloud(router):
    code, out, err = await tidegate(
        "ask", "--router", router, "--max-new-tokens", "100", "--json", "Tell me a story."
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["tier"] == "cloud" and "budget" in data["escalation_reason"]


async def test_an_empty_question_fails_clearly_and_the_router_survives(router):
    code, out, err = await tidegate("ask", "--router", router, "")
    assert code != 0
    assert "INVALID_ARGUMENT" in err and "question is empty" in err
    code, _, err = await tidegate("ask", "--router", router, "--min-confidence", "0", "Hi?")
    assert code == 0, err


async def test_plain_output_and_streaming(router):
    code, out, err = await tidegate(
        "ask", "--router", router, "--min-confidence", "0", "--stream", "Say hello."
    )
    assert code == 0, err
    assert "[edge" in err and "confidence" in err


async def test_health_and_status(router):
    code, out, _ = await tidegate("health", router)
    assert code == 0 and "SERVING" in out
    code, out, err = await tidegate("status", "--router", router)
    assert code == 0, err
    assert "cli-test" in out and "edge" in out and "cloud" in out


async def test_an_unreachable_router_is_an_error_not_a_hang():
    code, _, err = await tidegate("ask", "--router", "127.0.0.1:1", "--timeout", "5", "Hi?")
    assert code == 1 and "UNAVAILABLE" in err
    code, _, _ = await tidegate("health", "127.0.0.1:1", "--timeout", "1")
    assert code == 1


async def test_a_bad_config_fails_at_startup_naming_the_field(tmp_path: Path):
    config = tmp_path / "router.yaml"
    config.write_text("policy:\n  min_confidence: 1.5\n")
    code, _, err = await tidegate("router", "serve", "--config", str(config))
    assert code == 2
    assert "policy.min_confidence" in err
    config.write_text("cache:\n  ttl: 5\n")
    code, _, err = await tidegate("router", "serve", "--config", str(config))
    assert code == 2 and "cache.ttl" in err
