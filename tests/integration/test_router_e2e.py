"""The router end to end: real gRPC servers on loopback (port 0), real ModelNode
servers over tiny random transformers models, a real Redis for the Redis cache.

A tiny random model's confidence means nothing, so decisions are driven by the
per-request min_confidence: 0 keeps the edge answer, 1 escalates (a random
model is never certain). Node calls are counted on the node side by wrapping
the real backend (``CountingBackend``), not by mocking the router. The stack
helpers live in tests/support/stack.py.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.stack import (
    REDIS_URL,
    CountingBackend,
    FixedEstimator,
    ask,
    closed_port_address,
    cloud_backend,
    status_code,
)
from tests.support.tiny_models import tiny_backend
from tidegate.chat import SamplingParams
from tidegate.v1 import common_pb2, router_pb2


@pytest.fixture
async def duo(stack):
    """A counted edge and a counted cloud, and a router over both."""
    edge, cloud = await stack.counted_pair()
    return stack, edge, cloud


# -- routing ---------------------------------------------------------------------


async def test_confident_edge_answer_is_served_by_the_edge(duo):
    stack, edge, cloud = duo
    r = await stack.stub.Generate(ask(min_confidence=0.0, tenant="t-edge"), timeout=30)
    assert r.tier == router_pb2.TIER_EDGE
    assert r.escalation_code == router_pb2.ESCALATION_CODE_NONE and r.escalation_reason == ""
    assert r.model == "tiny-llama-s0@tiny/none"
    assert r.estimator == "seq_prob" and 0.0 <= r.confidence <= 1.0
    assert r.threshold == 0.0 and r.policy_version == "test-7"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert len(r.request_id) == 32  # generated: build_request sets one, see below
    assert r.timings.edge_ms > 0 and r.timings.cloud_ms == 0
    assert r.timings.total_ms >= r.timings.edge_ms
    assert r.timings.router_overhead_ms == pytest.approx(
        r.timings.total_ms - r.timings.edge_ms, abs=1e-6
    )
    assert (edge.calls, cloud.calls) == (1, 0)


async def test_empty_request_id_gets_a_generated_one(duo):
    stack, _, _ = duo
    request = ask(min_confidence=0.0)
    request.request_id = ""
    r = await stack.stub.Generate(request, timeout=30)
    assert len(r.request_id) == 32 and int(r.request_id, 16) >= 0


async def test_low_confidence_escalates_keeping_the_edge_confidence(duo):
    stack, edge, cloud = duo
    r = await stack.stub.Generate(ask(min_confidence=1.0, tenant="t-esc"), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD
    assert r.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    assert r.escalation_reason.startswith("edge confidence ")
    assert "< min_confidence 1.00 (estimator seq_prob)" in r.escalation_reason
    assert r.confidence < 1.0 and r.estimator == "seq_prob"  # the edge's, to show why
    assert r.model == "tiny-cloud@tiny/none"
    assert r.timings.edge_ms > 0 and r.timings.cloud_ms > 0
    assert (edge.calls, cloud.calls) == (1, 1)


async def test_repeat_is_a_cache_hit_from_the_cloud(duo):
    stack, edge, cloud = duo
    first = await stack.stub.Generate(ask(min_confidence=1.0, tenant="t-hit"), timeout=30)
    second = await stack.stub.Generate(ask(min_confidence=1.0, tenant="t-hit"), timeout=30)
    assert second.tier == router_pb2.TIER_CACHE
    assert second.source_tier == router_pb2.TIER_CLOUD
    assert second.text == first.text and second.model == first.model
    assert second.usage == first.usage
    assert second.timings.edge_ms == 0 and second.timings.cloud_ms == 0
    assert (edge.calls, cloud.calls) == (1, 1)  # the hit asked nobody
    other_tenant = await stack.stub.Generate(ask(min_confidence=1.0, tenant="t-other"), timeout=30)
    assert other_tenant.tier == router_pb2.TIER_CLOUD  # tenants never share entries


async def test_over_budget_goes_straight_to_the_cloud(duo):
    stack, edge, cloud = duo
    request = ask(min_confidence=0.0, sampling=SamplingParams(max_new_tokens=300))
    r = await stack.stub.Generate(request, timeout=60)
    assert r.tier == router_pb2.TIER_CLOUD
    assert r.escalation_code == router_pb2.ESCALATION_CODE_OVER_EDGE_BUDGET
    assert r.escalation_reason == "max_new_tokens 300 is over the edge budget of 256"
    assert r.confidence == 1.0 and r.timings.edge_ms == 0
    assert (edge.calls, cloud.calls) == (0, 1)


async def test_edge_over_its_context_escalates_to_a_larger_cloud(stack):
    long_cloud = cloud_backend(context_length=4096)
    edge = CountingBackend(tiny_backend(seed=0))  # context 512
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", long_cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    long_question = "zq xj " * 200  # ~400 bytes / 3 estimated: within the router's budget
    r = await stack.stub.Generate(ask(long_question, min_confidence=0.0), timeout=120)
    assert edge.calls == 1
    assert r.tier == router_pb2.TIER_CLOUD, r.escalation_reason
    assert r.escalation_code == router_pb2.ESCALATION_CODE_OVER_EDGE_BUDGET
    assert "edge node edge0 rejected the request" in r.escalation_reason
    assert "context of 512 tokens" in r.escalation_reason


async def test_prompt_too_long_for_every_node_is_invalid_argument(duo):
    stack, edge, cloud = duo  # both tiny: context 512
    code, details = await status_code(
        stack.stub.Generate(ask("zq xj " * 200, min_confidence=0.0), timeout=60)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cloud node cloud0 rejected the request" in details and "context" in details
    assert (edge.calls, cloud.calls) == (1, 1)


async def test_redis_cache_serves_hits_and_isolates_tenants(stack):
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router(
        [edge_server.address],
        [cloud_server.address],
        cache={"url": REDIS_URL, "key_prefix": prefix, "ttl_s": 60},
    )
    client = aioredis.from_url(REDIS_URL)
    try:
        first = await stack.stub.Generate(ask(min_confidence=1.0, tenant="a"), timeout=30)
        assert first.tier == router_pb2.TIER_CLOUD
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        assert len(keys) == 1 and 0 < await client.ttl(keys[0]) <= 60
        again = await stack.stub.Generate(ask(min_confidence=1.0, tenant="a"), timeout=30)
        assert again.tier == router_pb2.TIER_CACHE and again.text == first.text
        other = await stack.stub.Generate(ask(min_confidence=1.0, tenant="b"), timeout=30)
        assert other.tier == router_pb2.TIER_CLOUD
        assert cloud.calls == 2
        status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
        assert status.cache_entries == 2 and status.cache_hits == 1
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_wrong_redis_url_fails_at_startup(stack):
    from tidegate.errors import ConfigError

    settings = RouterSettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "http": {"listen": "127.0.0.1:0"},
            "cache": {"url": f"redis://{closed_port_address()}/0"},
        }
    )
    with pytest.raises(ConfigError, match="cache.url"):
        await serve_router(settings)


# -- cache admission and serving rules --------------------------------------------


async def test_edge_answer_below_the_policy_bar_is_served_but_not_cached(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    # The policy bar is 1.0; the client lowers its own to 0 and gets the edge answer.
    await stack.router(
        [edge_server.address], [cloud_server.address], policy={"min_confidence": 1.0}
    )
    first = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert first.tier == router_pb2.TIER_EDGE and first.confidence < 1.0
    second = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert second.tier == router_pb2.TIER_EDGE  # asked the edge again: nothing was cached
    assert edge.calls == 2
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    assert status.cache_entries == 0 and status.cache_hits == 0


async def test_cached_edge_answer_serves_only_thresholds_it_meets(stack):
    edge = CountingBackend(tiny_backend(seed=0))
    edge_server = await stack.node("edge", edge, estimator=FixedEstimator(0.8))
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router(
        [edge_server.address], [cloud_server.address], policy={"min_confidence": 0.5}
    )
    first = await stack.stub.Generate(ask(min_confidence=0.7), timeout=30)
    assert first.tier == router_pb2.TIER_EDGE and first.confidence == pytest.approx(0.8)
    hit = await stack.stub.Generate(ask(min_confidence=0.75), timeout=30)
    assert hit.tier == router_pb2.TIER_CACHE and hit.source_tier == router_pb2.TIER_EDGE
    assert hit.confidence == pytest.approx(0.8) and hit.estimator == "fixed_0.8"
    assert hit.threshold == pytest.approx(0.75)
    strict = await stack.stub.Generate(ask(min_confidence=0.9), timeout=30)
    assert strict.tier == router_pb2.TIER_CLOUD  # 0.8 < 0.9: the entry may not answer it
    assert strict.escalation_reason == (
        "edge confidence 0.80 < min_confidence 0.90 (estimator fixed_0.8)"
    )
    assert (edge.calls, cloud.calls) == (2, 1)


async def test_truncated_edge_answer_escalates_and_truncated_cloud_is_not_cached(stack):
    edge, cloud = await stack.counted_pair()
    request = ask(min_confidence=0.0, sampling=SamplingParams(max_new_tokens=1))
    r = await stack.stub.Generate(request, timeout=30)
    if r.tier == router_pb2.TIER_EDGE:  # the edge ended in one token: nothing to test
        pytest.skip("tiny edge answered in one token")
    assert r.escalation_code == router_pb2.ESCALATION_CODE_EDGE_TRUNCATED
    assert r.escalation_reason == "edge answer was cut at max_new_tokens 1"
    if r.finish_reason == common_pb2.FINISH_REASON_LENGTH:
        again = await stack.stub.Generate(request, timeout=30)
        assert again.tier == router_pb2.TIER_CLOUD  # a truncated answer is never cached
        assert cloud.calls == 2


async def test_sampled_answers_are_not_cached(duo):
    stack, edge, cloud = duo
    request = ask(min_confidence=1.0, sampling=SamplingParams(temperature=0.8, seed=3))
    for _ in range(2):
        r = await stack.stub.Generate(request, timeout=30)
        assert r.tier == router_pb2.TIER_CLOUD
    assert cloud.calls == 2


# -- coalescing --------------------------------------------------------------------


async def test_identical_concurrent_requests_make_one_model_call(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=0.3)
    cloud = CountingBackend(cloud_backend(), delay_s=0.3)
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    requests = [ask(min_confidence=1.0, tenant="t-co") for _ in range(6)]
    results = await asyncio.gather(*(stack.stub.Generate(r, timeout=60) for r in requests))
    assert (edge.calls, cloud.calls) == (1, 1)
    assert len({r.text for r in results}) == 1
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert sum("coalesced" in r.flags for r in results) == 5
    assert all(r.tier == router_pb2.TIER_CLOUD for r in results)


# -- failures ----------------------------------------------------------------------


async def test_edge_down_escalates_with_edge_unavailable(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    dead = closed_port_address()
    await stack.router([dead], [cloud_server.address])
    r = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD
    assert r.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert f"edge node edge0 at {dead} is unavailable" in r.escalation_reason
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    edge_status = next(n for n in status.nodes if n.tier == "edge")
    assert not edge_status.healthy and "UNAVAILABLE" in edge_status.last_error


async def test_slow_edge_times_out_and_the_cloud_answers(stack):
    edge = CountingBackend(tiny_backend(seed=0), delay_s=5.0)
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([edge_server.address], [cloud_server.address], edge_timeout_s=0.3)
    r = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD
    assert r.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert "DEADLINE_EXCEEDED" in r.escalation_reason
    assert r.timings.edge_ms < 2000


async def test_cloud_down_is_unavailable_naming_the_node(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    dead = closed_port_address()
    await stack.router([edge_server.address], [dead])
    code, details = await status_code(stack.stub.Generate(ask(min_confidence=1.0), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(f"cloud node cloud0 at {dead} is unavailable: ")
    kept = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)  # the edge still serves
    assert kept.tier == router_pb2.TIER_EDGE


async def test_second_cloud_answers_when_the_first_is_down(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [closed_port_address(), cloud_server.address])
    r = await stack.stub.Generate(ask(), timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and cloud.calls == 1
    assert r.escalation_reason == "no edge node is configured"


async def test_degraded_policy_serves_the_edge_answer_flagged(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    await stack.router(
        [edge_server.address],
        [closed_port_address()],
        policy={"on_cloud_unavailable": "degraded"},
    )
    r = await stack.stub.Generate(ask(min_confidence=1.0), timeout=30)
    assert r.tier == router_pb2.TIER_EDGE and list(r.flags) == ["degraded"]
    assert r.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    assert "cloud node cloud0" in r.escalation_reason
    again = await stack.stub.Generate(ask(min_confidence=1.0), timeout=30)
    assert again.tier == router_pb2.TIER_EDGE  # degraded answers are never cached


# -- bad input ---------------------------------------------------------------------


def _bad_requests() -> list[tuple[str, router_pb2.GenerateRequest, str]]:
    empty = router_pb2.GenerateRequest()
    blank = ask("   ")
    role = ask()
    role.messages.add(role="wizard", content="hi")
    role.messages.add(role="user", content="hi")
    zero = ask(sampling=SamplingParams(max_new_tokens=0))
    over = ask(sampling=SamplingParams(max_new_tokens=2049))
    conf = ask(min_confidence=1.5)
    return [
        ("empty conversation", empty, "conversation is empty"),
        ("empty question", blank, "question is empty"),
        ("unknown role", role, "unknown role 'wizard'"),
        ("max_new_tokens 0", zero, "max_new_tokens must be at least 1"),
        ("over the hard limit", over, "over this server's limit of 2048"),
        ("min_confidence out of range", conf, "min_confidence must be in [0, 1]"),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _bad_requests()])
async def test_bad_input_is_invalid_argument_and_the_router_keeps_serving(duo, case):
    stack, edge, cloud = duo
    _, request, words = _bad_requests()[case]
    for call in (
        stack.stub.Generate(request, timeout=10),
        _drain(stack.stub.GenerateStream(request, timeout=10)),
    ):
        code, details = await status_code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
    assert (edge.calls, cloud.calls) == (0, 0)
    ok = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert ok.tier == router_pb2.TIER_EDGE


async def test_non_utf8_payload_is_invalid_argument(duo):
    stack, _, _ = duo
    raw = ask("XQXQ").SerializeToString()
    assert raw.count(b"XQXQ") == 1
    payload = raw.replace(b"XQXQ", b"\xff\xfe\xfd\xfc")
    call = stack.channel.unary_unary(
        "/tidegate.v1.Router/Generate",
        request_serializer=lambda b: b,
        response_deserializer=router_pb2.GenerateResponse.FromString,
    )
    code, details = await status_code(call(payload, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details
    ok = await stack.stub.Generate(ask(min_confidence=0.0), timeout=30)
    assert ok.tier == router_pb2.TIER_EDGE


# -- streaming ---------------------------------------------------------------------


async def _drain(call: Any) -> tuple[list[str], router_pb2.GenerateResponse | None]:
    deltas: list[str] = []
    final = None
    async for event in call:
        if event.HasField("response"):
            final = event.response
        else:
            deltas.append(event.delta)
    return deltas, final


async def test_stream_of_a_kept_edge_answer_is_one_delta(duo):
    stack, edge, cloud = duo
    deltas, final = await _drain(
        stack.stub.GenerateStream(ask(min_confidence=0.0, tenant="s-edge"), timeout=30)
    )
    assert final is not None and final.tier == router_pb2.TIER_EDGE
    assert deltas == ([final.text] if final.text else [])
    assert (edge.calls, cloud.calls) == (1, 0)


async def test_stream_of_an_escalated_answer_relays_the_cloud_and_is_cached(duo):
    stack, edge, cloud = duo
    request = ask(min_confidence=1.0, tenant="s-cloud")
    deltas, final = await _drain(stack.stub.GenerateStream(request, timeout=30))
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    assert final.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    assert "".join(deltas) == final.text and len(deltas) > 1
    deltas2, hit = await _drain(stack.stub.GenerateStream(request, timeout=30))
    assert hit.tier == router_pb2.TIER_CACHE and "".join(deltas2) == final.text
    unary = await stack.stub.Generate(request, timeout=30)
    assert unary.tier == router_pb2.TIER_CACHE and unary.text == final.text
    assert (edge.calls, cloud.calls) == (1, 1)


async def test_cut_cloud_stream_is_unavailable_and_not_cached(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud = CountingBackend(cloud_backend(), cut_stream=True)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    request = ask(min_confidence=1.0)
    deltas: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stack.stub.GenerateStream(request, timeout=30):
            assert not event.HasField("response")
            deltas.append(event.delta)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cloud node cloud0" in info.value.details() and "cut the stream" in info.value.details()
    assert len(deltas) == 1
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    assert status.cache_entries == 0


# -- status ------------------------------------------------------------------------


async def test_status_reports_nodes_cache_and_policy(duo):
    stack, _, _ = duo
    await stack.stub.Generate(ask(min_confidence=1.0, tenant="st"), timeout=30)
    await stack.stub.Generate(ask(min_confidence=1.0, tenant="st"), timeout=30)
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    assert status.policy_version == "test-7"
    assert [(n.name, n.tier, n.healthy) for n in status.nodes] == [
        ("edge0", "edge", True),
        ("cloud0", "cloud", True),
    ]
    assert [n.model for n in status.nodes] == ["tiny-llama-s0@tiny/none", "tiny-cloud@tiny/none"]
    assert all(n.address.startswith("127.0.0.1:") and not n.last_error for n in status.nodes)
    assert (status.cache_entries, status.cache_hits, status.cache_misses) == (1, 1, 1)


async def test_build_router_connects_nothing_and_closes_cleanly():
    from router.service import build_router

    servicer = build_router(RouterSettings(edge=[], cloud=[{"address": closed_port_address()}]))
    await servicer.close()
