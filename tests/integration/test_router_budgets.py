"""Budgets over the real router: concurrent requests never overshoot a budget,
in-process and with two routers sharing the real Redis; the over-budget outcome
follows the policy; requests per second; streams pay too.

The tiny test tokenizer counts far more tokens per byte than real ones, so
these routers reserve with ``prompt_token_factor: 4`` (the router warns when a
call used more than it reserved; the tests check it never did).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from tests.support.stack import (
    REDIS_URL,
    CountingBackend,
    ask,
    cloud_backend,
    collect,
    status_code,
)
from tidegate.v1 import router_pb2

LIMIT = 400
FACTOR = 4.0


def budgets(**limits: Any) -> dict[str, Any]:
    return {"prompt_token_factor": FACTOR, "tenants": [{"tenant": "acme", **limits}]}


async def fire(stubs: list[Any], count: int) -> tuple[list[Any], list[grpc.aio.AioRpcError]]:
    """``count`` distinct escalating requests at once, spread over ``stubs``."""

    async def one(i: int) -> Any:
        stub = stubs[i % len(stubs)]
        request = ask(f"Question {i}: what is the capital of France?", tenant="acme")
        try:
            return await stub.Generate(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc

    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    answers = [o for o in outcomes if not isinstance(o, grpc.aio.AioRpcError)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    return answers, refused


def check_never_overshot(answers, refused, cloud, window: str) -> int:
    spent = sum(a.usage.prompt_tokens + a.usage.completion_tokens for a in answers)
    assert answers and refused, "the budget must let some through and refuse others"
    assert all(a.tier == router_pb2.TIER_CLOUD for a in answers)
    assert spent <= LIMIT, f"overshot: {spent} cloud tokens spent against a budget of {LIMIT}"
    assert cloud.calls == len(answers)  # a refused request never reached the cloud
    for exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"tenant 'acme' is over its {window} budget" in exc.details()
    return spent


async def test_concurrent_requests_never_overshoot_an_in_process_budget(stack, caplog):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([], [cloud_server.address], budgets=budgets(cloud_tokens_per_day=LIMIT))
    with caplog.at_level(logging.WARNING, logger="router.budgets"):
        answers, refused = await fire([stack.stub], 24)
    spent = check_never_overshot(answers, refused, cloud, "cloud_tokens_per_day")
    assert "more than reserved" not in caplog.text
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    [day] = [b for b in status.budgets if b.tenant == "acme"]
    assert (day.window, day.unit, day.limit) == ("day", "cloud_tokens", LIMIT)
    assert day.remaining == LIMIT - spent  # settled with the real usage


async def test_two_routers_sharing_redis_share_one_budget(stack, caplog):
    prefix = f"tidegate-test:{uuid.uuid4().hex}:"
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    shared = {**budgets(cloud_tokens_per_day=LIMIT), "url": REDIS_URL, "key_prefix": prefix}
    stubs = []
    for _ in range(2):
        await stack.router([], [cloud_server.address], budgets=shared)
        stubs.append(stack.stub)
    client = aioredis.from_url(REDIS_URL)
    try:
        with caplog.at_level(logging.WARNING, logger="router.budgets"):
            answers, refused = await fire(stubs, 24)
        spent = check_never_overshot(answers, refused, cloud, "cloud_tokens_per_day")
        assert "more than reserved" not in caplog.text
        assert {a.request_id for a in answers}  # both routers answered some
        # the counter (and, for a minute, the markers of single takes: router.budgets)
        [key] = [k async for k in client.scan_iter(match=prefix + "*") if b":take:" not in k]
        assert key.decode().startswith(prefix + "acme:day:")
        assert int(await client.get(key)) == spent
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def tight(stack):
    """A budget no cloud call fits in, over a counted edge and cloud."""

    async def start(on_over_budget: str) -> tuple[CountingBackend, CountingBackend]:
        return await stack.counted_pair(
            budgets=budgets(cloud_tokens_per_minute=20),
            policy={"on_over_budget": on_over_budget},
        )

    return start


async def test_over_budget_serves_the_edge_answer_flagged_when_the_policy_says_so(stack, tight):
    edge, cloud = await tight("edge")
    r = await stack.stub.Generate(ask(min_confidence=1.0, tenant="acme"), timeout=30)
    assert r.tier == router_pb2.TIER_EDGE and list(r.flags) == ["over_budget"]
    assert r.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    assert "but tenant 'acme' is over its cloud_tokens_per_minute budget" in r.escalation_reason
    again = await stack.stub.Generate(ask(min_confidence=1.0, tenant="acme"), timeout=30)
    assert again.tier == router_pb2.TIER_EDGE  # a flagged answer is never cached
    assert (edge.calls, cloud.calls) == (2, 0)
    other = await stack.stub.Generate(ask(min_confidence=1.0, tenant="free"), timeout=30)
    assert other.tier == router_pb2.TIER_CLOUD  # budgets are per tenant


async def test_over_budget_is_resource_exhausted_by_default_and_streams_pay_too(stack, tight):
    edge, cloud = await tight("error")
    code, details = await status_code(
        stack.stub.Generate(ask(min_confidence=1.0, tenant="acme"), timeout=30)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'acme' is over its cloud_tokens_per_minute budget: 0 of 20" in details
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stack.stub.GenerateStream(
            ask(min_confidence=1.0, tenant="acme"), timeout=30
        ):
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    kept = await stack.stub.Generate(ask(min_confidence=0.0, tenant="acme"), timeout=30)
    assert kept.tier == router_pb2.TIER_EDGE  # a confident edge answer costs no budget
    assert cloud.calls == 0


async def test_requests_per_second(stack):
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([], [cloud_server.address], budgets=budgets(requests_per_second=3))
    await stack.stub.Generate(ask(tenant="acme"), timeout=30)  # warm: the rest are cache hits
    await asyncio.sleep(1.0)
    outcomes = await asyncio.gather(
        *(stack.stub.Generate(ask(tenant="acme"), timeout=30) for _ in range(10)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    # Ten at once span at most two calendar seconds: at most 3 + 3 pass.
    assert len(refused) >= 4 and len(refused) < 10
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    assert "requests_per_second budget" in refused[0].details()
    await asyncio.sleep(1.0)
    assert (await stack.stub.Generate(ask(tenant="acme"), timeout=30)).text


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_budget_store_that_stops_answering_degrades_as_the_policy_says(stack, streamed):
    from tests.support.redis_proxy import SlowReplies

    async with SlowReplies() as store:
        edge, cloud = await stack.counted_pair(
            budgets={**budgets(cloud_tokens_per_day=LIMIT), "url": store.url},
            policy={"on_cloud_unavailable": "degraded"},
        )
        store.delay_s = 3.0  # past the client's 2 s: every reservation goes unanswered
        request = ask(min_confidence=1.0, tenant="acme")  # escalates
        if streamed:
            _, answer = await collect(stack.stub.GenerateStream(request, timeout=30))
        else:
            answer = await stack.stub.Generate(request, timeout=30)
    assert answer.tier == router_pb2.TIER_EDGE and "degraded" in answer.flags
    assert cloud.calls == 0
