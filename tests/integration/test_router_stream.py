"""GenerateStream through the router, with real nodes whose streams are slowed,
stalled or cut on the node side (``tests.support.stack.PacedBackend`` wraps a
real tiny model).

Semantics under test (router.streaming): a cut or stalled node stream falls
back like a failed call; a cloud stream cut after its first delta ends in
UNAVAILABLE, never with another node's text appended; edge tokens streamed
early and then replaced are announced by a Restart event; incomplete streams
are never cached.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from router.budgets import Budgets, MemoryBudgetStore
from router.guard_settings import BudgetSettings
from router.policy import estimate_prompt_tokens
from tests.support.stack import (
    CountingBackend,
    PacedBackend,
    Stack,
    ask,
    closed_port_address,
    cloud_backend,
    collect,
)
from tests.support.tiny_models import tiny_backend
from tidegate.chat import ChatMessage, SamplingParams
from tidegate.v1 import router_pb2

# Long enough that a busy CPU (tests run side by side on 2 cores) never makes a
# healthy tiny model look stalled; far below the 30 s a stalled node hangs.
IDLE_S = 2.0


def after_restart(events: list[Any]) -> str:
    """The text a client shows: what came after the last Restart."""
    text = ""
    for event in events:
        text = "" if isinstance(event, router_pb2.Restart) else text + event
    return text


async def cache_entries(stack: Stack) -> int:
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    return status.cache_entries


# -- stalls and cuts ---------------------------------------------------------------


async def test_stalled_cloud_stream_before_any_delta_falls_back_to_the_next_cloud(stack):
    stalled = PacedBackend(cloud_backend(), stall_after=0, stall_s=30)
    healthy = CountingBackend(cloud_backend())
    first = await stack.node("cloud", stalled, estimator=None)
    second = await stack.node("cloud", healthy, estimator=None)
    await stack.router([], [first.address, second.address], stream={"idle_timeout_s": IDLE_S})
    started = asyncio.get_running_loop().time()
    events, final = await collect(stack.stub.GenerateStream(ask(), timeout=30))
    assert asyncio.get_running_loop().time() - started < 10  # not the 30 s stall
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    assert (stalled.calls, healthy.calls) == (1, 1)
    assert "".join(events) == final.text and final.text
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    cloud0 = next(n for n in status.nodes if n.name == "cloud0")
    assert "stalled" in cloud0.last_error and "stream.idle_timeout_s" in cloud0.last_error


async def test_stalled_cloud_stream_after_deltas_is_unavailable_and_not_cached(stack):
    stalled = PacedBackend(cloud_backend(), stall_after=2, stall_s=30)
    backup = CountingBackend(cloud_backend())
    first = await stack.node("cloud", stalled, estimator=None)
    second = await stack.node("cloud", backup, estimator=None)
    await stack.router([], [first.address, second.address], stream={"idle_timeout_s": IDLE_S})
    deltas: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stack.stub.GenerateStream(ask(), timeout=30):
            assert event.WhichOneof("kind") == "delta"  # no response, no other node's text
            deltas.append(event.delta)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert "cloud node cloud0" in details and "cut the stream" in details
    assert "stalled" in details and "retry the request" in details
    assert len(deltas) == 2
    assert backup.calls == 0  # never silently continued by another node
    assert await cache_entries(stack) == 0


async def test_stalled_edge_stream_escalates_to_the_cloud(stack):
    """Early edge tokens: the edge stalls after two deltas; the client is told
    to discard them (Restart) before the cloud's answer."""
    edge = PacedBackend(tiny_backend(seed=0), stall_after=2, stall_s=30)
    cloud = CountingBackend(cloud_backend())
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router(
        [edge_server.address],
        [cloud_server.address],
        stream={"idle_timeout_s": IDLE_S, "early_edge_tokens": True},
    )
    events, final = await collect(stack.stub.GenerateStream(ask(min_confidence=0.0), timeout=30))
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    assert final.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    restarts = [e for e in events if isinstance(e, router_pb2.Restart)]
    assert len(restarts) == 1 and "stalled" in restarts[0].reason
    assert restarts[0].escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert events.index(restarts[0]) == 2  # after the two edge deltas, before the cloud's
    assert after_restart(events) == final.text
    assert "restarted" in final.flags
    assert cloud.calls == 1


async def test_cut_edge_stream_before_any_delta_asks_the_cloud_without_restart(stack):
    edge = PacedBackend(tiny_backend(seed=0), cut_after=0)
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router(
        [edge_server.address], [cloud_server.address], stream={"early_edge_tokens": True}
    )
    events, final = await collect(stack.stub.GenerateStream(ask(min_confidence=0.0), timeout=30))
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    assert final.escalation_code == router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    assert not any(isinstance(e, router_pb2.Restart) for e in events)  # nothing to unsee
    assert "restarted" not in final.flags and "".join(events) == final.text


# -- early edge tokens -------------------------------------------------------------


async def test_early_edge_tokens_kept_stream_without_restart(stack):
    edge = PacedBackend(tiny_backend(seed=0))
    edge_server = await stack.node("edge", edge)
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router(
        [edge_server.address], [cloud_server.address], stream={"early_edge_tokens": True}
    )
    events, final = await collect(stack.stub.GenerateStream(ask(min_confidence=0.0), timeout=30))
    assert final is not None and final.tier == router_pb2.TIER_EDGE
    assert len(events) > 1 and all(isinstance(e, str) for e in events)  # streamed as decoded
    assert "".join(events) == final.text and cloud.calls == 0


async def test_early_edge_tokens_then_escalation_sends_restart_first(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router(
        [edge_server.address], [cloud_server.address], stream={"early_edge_tokens": True}
    )
    request = ask(min_confidence=1.0, tenant="restart")
    events, final = await collect(stack.stub.GenerateStream(request, timeout=30))
    assert final is not None and final.tier == router_pb2.TIER_CLOUD
    restarts = [i for i, e in enumerate(events) if isinstance(e, router_pb2.Restart)]
    assert len(restarts) == 1 and restarts[0] > 0  # edge text first, then the restart
    restart = events[restarts[0]]
    assert restart.escalation_code == router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    assert restart.reason == final.escalation_reason
    assert after_restart(events) == final.text and "restarted" in final.flags
    # The complete cloud answer was cached; a hit streams it without any restart.
    again, hit = await collect(stack.stub.GenerateStream(request, timeout=30))
    assert hit.tier == router_pb2.TIER_CACHE and again == [final.text]


async def test_default_streams_judge_the_edge_first_and_never_restart(stack):
    edge = PacedBackend(tiny_backend(seed=0))
    edge_server = await stack.node("edge", edge)
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    events, final = await collect(stack.stub.GenerateStream(ask(min_confidence=1.0), timeout=30))
    assert final.tier == router_pb2.TIER_CLOUD
    assert all(isinstance(e, str) for e in events) and "".join(events) == final.text


async def test_degraded_after_restart_sends_the_edge_answer_again(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    await stack.router(
        [edge_server.address],
        [closed_port_address()],
        stream={"early_edge_tokens": True},
        policy={"on_cloud_unavailable": "degraded"},
    )
    events, final = await collect(stack.stub.GenerateStream(ask(min_confidence=1.0), timeout=30))
    assert final.tier == router_pb2.TIER_EDGE
    assert {"degraded", "restarted"} <= set(final.flags)
    assert after_restart(events) == final.text  # the client kept nothing else
    assert await cache_entries(stack) == 0


# -- the CLI -----------------------------------------------------------------------


async def test_ask_stream_prints_the_restart_and_the_whole_answer(stack):
    from tests.support.cli import tidegate

    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    address = await stack.router(
        [edge_server.address], [cloud_server.address], stream={"early_edge_tokens": True}
    )
    code, out, err = await tidegate(
        "ask", "--router", address, "--stream", "--min-confidence", "1", "What is 2+2?"
    )
    assert code == 0, err
    assert "[restart: edge confidence" in err and "[cloud" in err
    final = await stack.stub.Generate(ask("What is 2+2?", min_confidence=1.0), timeout=30)
    assert final.tier == router_pb2.TIER_CACHE  # the streamed cloud answer was cached
    assert out.rstrip("\n").endswith(final.text)


# -- budgets -----------------------------------------------------------------------


async def test_streams_reserve_the_budget_and_settle_their_real_usage(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    limit = 400
    await stack.router(
        [],
        [cloud_server.address],
        budgets={
            "prompt_token_factor": 4.0,  # the tiny tokenizer counts many tokens per byte
            "tenants": [{"tenant": "acme", "cloud_tokens_per_day": limit}],
        },
    )

    async def one(i: int) -> Any:
        request = ask(f"Question {i}: what is the capital of France?", tenant="acme")
        try:
            return await collect(stack.stub.GenerateStream(request, timeout=60))
        except grpc.aio.AioRpcError as exc:
            return exc

    outcomes = await asyncio.gather(*(one(i) for i in range(8)))
    answers = [
        final for o in outcomes if not isinstance(o, grpc.aio.AioRpcError) for final in [o[1]]
    ]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert answers and refused  # some fit in the budget, some did not
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    spent = sum(a.usage.prompt_tokens + a.usage.completion_tokens for a in answers)
    assert spent <= limit and cloud.calls == len(answers)  # never overshot
    status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
    day = next(b for b in status.budgets if b.tenant == "acme" and b.window == "day")
    assert day.remaining == limit - spent  # settled with what the streams really used


def reservation(request: router_pb2.GenerateRequest, max_new_tokens: int = 16) -> int:
    """What the router reserves for a cloud call of ``request`` that may
    generate ``max_new_tokens`` (default budget settings)."""
    prompt = estimate_prompt_tokens([ChatMessage.from_pb(m) for m in request.messages])
    return Budgets(BudgetSettings(), MemoryBudgetStore()).estimate(prompt, max_new_tokens)


async def settled_usage(stack: Stack, tenant: str, limit: int, reserved: int) -> int:
    """The tenant's day usage once the stream's reservation was settled (the
    router settles it when the cut or the cancellation reaches it)."""
    for _ in range(100):
        status = await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)
        day = next(b for b in status.budgets if b.tenant == tenant and b.window == "day")
        used = limit - day.remaining
        if used != reserved:
            return used
        await asyncio.sleep(0.1)
    return reserved


async def test_a_stream_the_client_cuts_off_is_charged_for_the_text_it_received(stack):
    """Sampled streams are not coalesced, so a client that hangs up before the
    final message must not get the streamed text for free."""
    cloud = PacedBackend(cloud_backend(), stall_after=3, stall_s=30)  # no final message
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    limit = 100_000
    await stack.router(
        [],
        [cloud_server.address],
        budgets={"tenants": [{"tenant": "acme", "cloud_tokens_per_day": limit}]},
    )
    sampling = SamplingParams(max_new_tokens=16, temperature=0.8, seed=7)
    request = ask(tenant="acme", sampling=sampling)
    call = stack.stub.GenerateStream(request, timeout=30)
    deltas = []
    async for event in call:
        deltas.append(event.delta)
        if len(deltas) == 3:
            break  # every delta the node sent; hang up before the final message
    call.cancel()
    used = await settled_usage(stack, "acme", limit, reservation(request))
    # The prompt as reserved and at least a token per delta; not the 16 it could have had.
    assert reservation(request, len(deltas)) <= used < reservation(request)


async def test_a_cloud_stream_cut_after_deltas_is_charged_for_the_text_it_sent(stack):
    cloud = PacedBackend(cloud_backend(), cut_after=2)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    limit = 100_000
    await stack.router(
        [],
        [cloud_server.address],
        budgets={"tenants": [{"tenant": "acme", "cloud_tokens_per_day": limit}]},
    )
    request = ask(tenant="acme")
    deltas: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stack.stub.GenerateStream(request, timeout=30):
            deltas.append(event.delta)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and len(deltas) == 2
    used = await settled_usage(stack, "acme", limit, reservation(request))
    assert reservation(request, len(deltas)) <= used < reservation(request)


class NoUsageBackend(CountingBackend):
    """A cloud whose upstream reports no usage (an OpenAI-compatible server that
    sends no ``usage``): its answers say 0 prompt tokens, and 0 completion tokens
    too unless ``counts_completion`` (it sent log-probs, one per token)."""

    def __init__(self, inner: Any, counts_completion: bool) -> None:
        super().__init__(inner)
        self.counts_completion = counts_completion

    def _strip(self, answer: Any) -> None:
        answer.prompt_tokens = 0
        if not self.counts_completion:
            answer.reported_completion_tokens = 0

    async def generate(self, request: Any) -> Any:
        answer = await super().generate(request)
        self._strip(answer)
        return answer

    async def stream(self, request: Any) -> Any:
        async for item in super().stream(request):
            if not isinstance(item, str):
                self._strip(item)
            yield item


@pytest.mark.parametrize("counts_completion", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_cloud_that_reports_no_usage_is_charged_its_text(
    stack, streamed, counts_completion
):
    cloud = NoUsageBackend(cloud_backend(), counts_completion)
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    limit = 100_000
    await stack.router(
        [],
        [cloud_server.address],
        budgets={"tenants": [{"tenant": "acme", "cloud_tokens_per_day": limit}]},
        cache={"enabled": False},
    )
    request = ask(tenant="acme")
    if streamed:
        deltas = [e.delta async for e in stack.stub.GenerateStream(request, timeout=30)]
        text = "".join(deltas)
    else:
        text = (await stack.stub.Generate(request, timeout=30)).text
    assert text
    used = await settled_usage(stack, "acme", limit, reservation(request))
    # Not free, nor the prompt left out: the prompt as reserved and the text's tokens.
    assert reservation(request, 1) <= used <= reservation(request)


@pytest.mark.parametrize("streamed", [False, True])
async def test_running_out_of_time_on_the_cloud_is_deadline_exceeded_not_a_degraded_answer(
    stack, streamed
):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    slow_cloud = CountingBackend(cloud_backend(), delay_s=3.0)  # nothing before 3 s
    cloud_server = await stack.node("cloud", slow_cloud, estimator=None)
    await stack.router(
        [edge_server.address],
        [cloud_server.address],
        policy={"on_cloud_unavailable": "degraded"},  # the tier is not down: no degraded answer
    )
    request = ask(min_confidence=1.0)  # escalates
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if streamed:
            await collect(stack.stub.GenerateStream(request, timeout=1.0))
        else:
            await stack.stub.Generate(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
