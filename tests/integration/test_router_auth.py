"""Tenants and API keys over the real router: gRPC metadata, the CLI, cache isolation."""

from __future__ import annotations

import json

import grpc
import pytest

from router.auth import hash_key
from tests.support.cli import tidegate
from tests.support.stack import (
    QUESTION,
    CountingBackend,
    ask,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.v1 import router_pb2

KEY_ACME, KEY_GLOBEX, KEY_ADMIN = "tg_acme-secret", "tg_globex-secret", "tg_ops-secret"
TENANTS = [
    {"name": "acme", "api_key_hashes": [hash_key(KEY_ACME)]},
    {"name": "globex", "api_key_hashes": [hash_key(KEY_GLOBEX)]},
    {"name": "ops", "api_key_hashes": [hash_key(KEY_ADMIN)], "admin": True},
]
BUDGETS = {
    "tenants": [
        {"tenant": "acme", "cloud_tokens_per_day": 100_000},
        {"tenant": "globex", "cloud_tokens_per_day": 50_000},
    ]
}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def keyed(stack):
    """A router with tenants, over a counted edge and cloud."""
    edge, cloud = await stack.counted_pair(tenants=TENANTS, budgets=BUDGETS)
    return stack, edge, cloud


async def test_missing_wrong_or_malformed_key_is_unauthenticated(keyed):
    stack, edge, cloud = keyed
    cases = [
        ((), "requires an API key"),
        (bearer("tg_not-a-key"), "not valid"),
        ((("authorization", KEY_ACME),), "must be 'Bearer <api key>'"),
    ]
    for metadata, words in cases:
        for call in (
            stack.stub.Generate(ask(), timeout=10, metadata=metadata),
            _drain(stack.stub.GenerateStream(ask(), timeout=10, metadata=metadata)),
            stack.stub.Status(router_pb2.StatusRequest(), timeout=10, metadata=metadata),
        ):
            code, details = await status_code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED and words in details, details
    assert (edge.calls, cloud.calls) == (0, 0)  # nothing reached a model


async def test_the_key_names_the_tenant_and_tenants_never_share_cache(keyed):
    stack, edge, cloud = keyed
    first = await stack.stub.Generate(
        ask(min_confidence=1.0), timeout=30, metadata=bearer(KEY_ACME)
    )
    assert first.tier == router_pb2.TIER_CLOUD
    hit = await stack.stub.Generate(ask(min_confidence=1.0), timeout=30, metadata=bearer(KEY_ACME))
    assert hit.tier == router_pb2.TIER_CACHE and hit.text == first.text
    # The same question from another tenant: a model answers it, not acme's entry,
    # even when the body claims nothing (the key decides) ...
    other = await stack.stub.Generate(
        ask(min_confidence=1.0), timeout=30, metadata=bearer(KEY_GLOBEX)
    )
    assert other.tier == router_pb2.TIER_CLOUD
    assert cloud.calls == 2
    # ... and a body naming another tenant is refused, not obeyed.
    code, details = await status_code(
        stack.stub.Generate(ask(tenant="acme"), timeout=10, metadata=bearer(KEY_GLOBEX))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to tenant 'globex'" in details
    same = await stack.stub.Generate(
        ask(min_confidence=1.0, tenant="acme"), timeout=30, metadata=bearer(KEY_ACME)
    )
    assert same.tier == router_pb2.TIER_CACHE  # naming one's own tenant is fine


async def test_status_shows_budgets_to_their_tenant_and_all_to_an_admin(keyed):
    stack, _, _ = keyed
    own = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10, metadata=bearer(KEY_ACME))
    assert [(b.tenant, b.window, b.unit, b.limit) for b in own.budgets] == [
        ("acme", "day", "cloud_tokens", 100_000)
    ]
    admin = await stack.stub.Status(
        router_pb2.StatusRequest(), timeout=10, metadata=bearer(KEY_ADMIN)
    )
    assert sorted(b.tenant for b in admin.budgets) == ["acme", "globex"]


async def test_without_tenants_auth_is_off_and_the_body_names_the_tenant(duo_stack):
    stack, cloud = duo_stack
    a = await stack.stub.Generate(ask(min_confidence=1.0, tenant="a"), timeout=30)
    b = await stack.stub.Generate(ask(min_confidence=1.0, tenant="b"), timeout=30)
    a2 = await stack.stub.Generate(ask(min_confidence=1.0, tenant="a"), timeout=30)
    assert (a.tier, b.tier, a2.tier) == (
        router_pb2.TIER_CLOUD,
        router_pb2.TIER_CLOUD,
        router_pb2.TIER_CACHE,
    )
    assert cloud.calls == 2


@pytest.fixture
async def duo_stack(stack):
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    return stack, cloud


async def _drain(call):
    return [event async for event in call]


async def test_cli_sends_the_api_key_from_the_flag_or_the_environment(keyed):
    stack, _, _ = keyed
    router = stack.server.address
    question = ["ask", "--router", router, "--json", "--min-confidence", "0", QUESTION]
    env = {"TIDEGATE_API_KEY": ""}
    code, out, err = await tidegate(*question, "--api-key", KEY_ACME, env=env)
    assert code == 0, err
    assert '"tier": "edge"' in out
    code, out, err = await tidegate(*question, env={"TIDEGATE_API_KEY": KEY_GLOBEX})
    assert code == 0, err
    code, out, err = await tidegate(*question, env=env)
    assert code == 1 and "UNAUTHENTICATED" in err and "requires an API key" in err
    code, out, err = await tidegate("hash-key", KEY_ACME)
    assert code == 0 and out.strip() == hash_key(KEY_ACME)
    code, out, err = await tidegate("status", "--router", router, "--json", env=env)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, out, err = await tidegate(
        "status", "--router", router, "--json", "--api-key", KEY_ADMIN, env=env
    )
    assert code == 0, err
    assert sorted(b["tenant"] for b in json.loads(out)["budgets"]) == ["acme", "globex"]
