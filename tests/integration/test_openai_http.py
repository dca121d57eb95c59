"""The router's OpenAI-compatible HTTP endpoint, end to end.

A real uvicorn server on 127.0.0.1 port 0 in the test's event loop, started by
``serve_router`` beside gRPC, over the real pipeline and real ModelNode servers
running tiny random transformers models (``tests.support.stack``). It is
called with the official ``openai`` client and with plain HTTP (httpx).

As in test_router_e2e, a tiny model's confidence means nothing, so the tier is
chosen with ``min_confidence`` (the ``tidegate`` extension object): 0 keeps the
edge answer, 1 escalates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import uuid
from typing import Any

import httpx
import openai
import pytest

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.certs import TestCA
from tests.support.cli import spawn_tidegate
from tests.support.stack import (
    QUESTION,
    CountingBackend,
    busy_port,
    closed_port_address,
    cloud_backend,
)
from tests.support.tiny_models import tiny_backend

KEEP_EDGE = {"tidegate": {"min_confidence": 0.0}}
ESCALATE = {"tidegate": {"min_confidence": 1.0}}


def ask(**extra: Any) -> dict[str, Any]:
    return {"model": "tidegate", "messages": [{"role": "user", "content": QUESTION}], **extra}


def client(base: str) -> openai.AsyncOpenAI:
    # No retries: a test must see the first answer, not the third.
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def sse_events(text: str) -> list[str]:
    """The data of each server-sent event, in order."""
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


@pytest.fixture
async def duo(stack):
    """A counted edge and a counted cloud; returns (http base URL, edge, cloud)."""
    edge, cloud = await stack.counted_pair()
    assert stack.server.http_url.startswith("http://127.0.0.1:")
    assert not stack.server.http_url.endswith(":8080")  # port 0: a free port
    return stack.server.http_url, edge, cloud


async def post(base: str, body: Any, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        if isinstance(body, bytes):
            return await http.post("/v1/chat/completions", content=body, **kwargs)
        return await http.post("/v1/chat/completions", json=body, **kwargs)


# -- the official client -------------------------------------------------------


async def test_openai_client_gets_an_edge_answer_with_provenance(duo):
    base, edge, cloud = duo
    raw = await client(base).chat.completions.with_raw_response.create(
        model="tidegate",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=KEEP_EDGE,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "tidegate"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    extra = completion.model_extra["tidegate"]
    assert extra["tier"] == "edge" and extra["escalation_code"] == "none"
    assert extra["estimator"] == "seq_prob" and extra["model"] == "tiny-llama-s0@tiny/none"
    assert extra["threshold"] == 0.0 and extra["policy_version"] == "test-7"
    assert completion.id == f"chatcmpl-{extra['request_id']}"
    headers = raw.headers
    assert headers["x-tidegate-tier"] == "edge"
    assert headers["x-tidegate-estimator"] == "seq_prob"
    assert float(headers["x-tidegate-confidence"]) == pytest.approx(extra["confidence"], abs=1e-6)
    assert headers["x-tidegate-escalation-reason"] == ""
    assert float(headers["x-tidegate-router-overhead-ms"]) >= 0.0
    assert headers["x-tidegate-request-id"] == extra["request_id"]
    assert (edge.calls, cloud.calls) == (1, 0)


async def test_escalation_then_cache_hit_through_the_openai_client(duo):
    base, edge, cloud = duo
    api = client(base)
    messages = [{"role": "user", "content": QUESTION}]
    own = {"tidegate": {"min_confidence": 1.0, "tenant": uuid.uuid4().hex}}
    first = await api.chat.completions.with_raw_response.create(
        model="tidegate", messages=messages, extra_body=own
    )
    assert first.headers["x-tidegate-tier"] == "cloud"
    assert first.headers["x-tidegate-escalation-reason"].startswith("edge confidence ")
    assert first.parse().model_extra["tidegate"]["escalation_code"] == "low_confidence"
    second = await api.chat.completions.with_raw_response.create(
        model="tidegate", messages=messages, extra_body=own
    )
    assert second.headers["x-tidegate-tier"] == "cache"
    assert second.headers["x-tidegate-source-tier"] == "cloud"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert (edge.calls, cloud.calls) == (1, 1)


async def test_openai_client_streams_with_usage_and_provenance_in_the_final_chunk(duo):
    base, edge, cloud = duo
    api = client(base)
    messages = [{"role": "user", "content": QUESTION}]
    own = {"tidegate": {"min_confidence": 1.0, "tenant": uuid.uuid4().hex}}
    unary = await api.chat.completions.create(model="tidegate", messages=messages, extra_body=own)
    # Greedy decoding ignores the seed, but the cache key does not: the cloud streams again.
    stream = await api.chat.completions.create(
        model="tidegate",
        messages=messages,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=own,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 4  # role, several deltas, final, usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].delta.content is None
    provenance = final[0].model_extra["tidegate"]
    assert provenance["tier"] == "cloud" and provenance["escalation_code"] == "low_confidence"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {f"chatcmpl-{provenance['request_id']}"}
    assert (edge.calls, cloud.calls) == (2, 2)


async def test_models_and_health(duo):
    base, _, _ = duo
    api = client(base)
    models = await api.models.list()
    assert [m.id for m in models.data] == ["tidegate", "tidegate-edge", "tidegate-cloud"]
    assert all(m.owned_by == "tidegate" for m in models.data)
    assert (await api.models.retrieve("tidegate-edge")).id == "tidegate-edge"
    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("gpt-4o")
    async with httpx.AsyncClient(base_url=base) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        missing = await http.get("/v2/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        wrong_method = await http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        assert wrong_method.headers["allow"] == "POST"


async def test_unknown_model_is_404_model_not_found(duo):
    base, edge, cloud = duo
    response = await post(base, ask(model="gpt-4o"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.json()["error"]["param"] == "model"
    assert "tidegate-edge" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as info:
        await client(base).chat.completions.create(model="gpt-4o", messages=ask()["messages"])
    assert info.value.code == "model_not_found"
    assert (edge.calls, cloud.calls) == (0, 0)


# -- plain HTTP: bad requests --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        pytest.param(b"{not json", None, "not valid JSON", id="invalid-json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply", id="deep-json"),
        pytest.param(
            b'{"model": "tidegate", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            None,
            "lone surrogate",
            id="lone-surrogate",
        ),
        pytest.param([1, 2], None, "JSON object", id="not-an-object"),
        pytest.param({"model": "tidegate"}, "messages", "messages", id="no-messages"),
        pytest.param(ask(messages=[]), None, "conversation is empty", id="empty-conversation"),
        pytest.param(
            ask(messages=[{"role": "user", "content": "  "}]), None, "question is empty", id="blank"
        ),
        pytest.param(ask(n=2), "n", "only n = 1", id="n"),
        pytest.param(ask(n=0), "n", "only n = 1", id="n=0"),
        pytest.param(
            ask(tools=[{"type": "function", "function": {"name": "f"}}]),
            "tools",
            "tool calling",
            id="tools",
        ),
        pytest.param(ask(temperature=5), None, "temperature must be in [0, 2]", id="temperature"),
        pytest.param(ask(max_tokens=0), "max_tokens", "greater than or equal to 1", id="max-0"),
        pytest.param(ask(max_tokens=100_000), None, "over this server's limit", id="max-over"),
        pytest.param(ask(stop=[""]), None, "stop", id="empty-stop"),
        pytest.param(ask(seed=-1), "seed", "greater than or equal to 0", id="negative-seed"),
        pytest.param(
            ask(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages.0.content",
            "only text",
            id="image",
        ),
        pytest.param(
            ask(messages=[{"role": "tool", "content": "42"}]), None, "unknown role", id="tool-role"
        ),
        pytest.param(
            ask(tidegate={"min_confidnce": 0.5}), "tidegate.min_confidnce", "Extra", id="typo-ext"
        ),
        pytest.param(
            ask(max_tokens=5, max_completion_tokens=6),
            "max_completion_tokens",
            "disagree",
            id="max-disagree",
        ),
    ],
)
async def test_bad_requests_are_400_with_an_openai_error_body(duo, body, param, words):
    base, edge, cloud = duo
    response = await post(base, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert error["param"] == param
    assert (edge.calls, cloud.calls) == (0, 0)
    # ...and the router keeps serving.
    ok = await post(base, ask(**KEEP_EDGE))
    assert ok.status_code == 200 and ok.headers["x-tidegate-tier"] == "edge"


async def test_harmless_openai_fields_are_accepted(duo):
    base, _, _ = duo
    body = ask(
        n=1,
        stream=None,  # the spec's boolean-or-null: not streamed
        tools=[],
        logprobs=False,
        presence_penalty=0,
        response_format={"type": "text"},
        user="someone",
        metadata={"a": "b"},
        a_field_from_the_future=True,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        max_completion_tokens=4,
        stop="\n",
        seed=3,
        top_p=0.9,
        temperature=0.0,
        **KEEP_EDGE,
    )
    response = await post(base, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4


async def test_client_request_id_is_kept(duo):
    base, _, _ = duo
    response = await post(base, ask(**KEEP_EDGE), headers={"x-request-id": "abc-123"})
    assert response.headers["x-tidegate-request-id"] == "abc-123"
    assert response.json()["id"] == "chatcmpl-abc-123"


# -- plain HTTP: failures ------------------------------------------------------


async def test_cloud_down_is_503_unary_and_streaming(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    down = closed_port_address()
    await stack.router([edge_server.address], [down])
    base = stack.server.http_url
    response = await post(base, ask(**ESCALATE))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"
    assert f"cloud node cloud0 at {down} is unavailable" in error["message"]
    # A stream that fails before its first token still gets the HTTP status.
    streamed = await post(base, ask(stream=True, **ESCALATE))
    assert streamed.status_code == 503
    assert streamed.json()["error"]["code"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError) as info:
        await client(base).chat.completions.create(
            model="tidegate", messages=ask()["messages"], extra_body=ESCALATE
        )
    assert info.value.status_code == 503


async def test_deadline_is_504(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    slow_cloud = CountingBackend(cloud_backend(), delay_s=3.0)
    cloud_server = await stack.node("cloud", slow_cloud, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    response = await post(
        stack.server.http_url, ask(**ESCALATE), headers={"x-tidegate-timeout": "0.5"}
    )
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert not error["message"].endswith("last error: ")  # a TimeoutError says nothing itself
    bad = await post(stack.server.http_url, ask(**ESCALATE), headers={"x-tidegate-timeout": "soon"})
    assert bad.status_code == 400 and "x-tidegate-timeout" in bad.json()["error"]["message"]
    # A request refused for itself is refused so however short its deadline: not a 504.
    hot = await post(
        stack.server.http_url, ask(temperature=5), headers={"x-tidegate-timeout": "0.001"}
    )
    assert hot.status_code == 400, hot.text
    assert "temperature" in hot.json()["error"]["message"]


async def test_a_stream_cut_after_its_first_token_ends_with_an_error_event(stack):
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cut = CountingBackend(cloud_backend(), cut_stream=True)
    cloud_server = await stack.node("cloud", cut, estimator=None)
    await stack.router([edge_server.address], [cloud_server.address])
    response = await post(stack.server.http_url, ask(stream=True, **ESCALATE))
    assert response.status_code == 200  # the headers had gone when the cloud failed
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and "cut the stream" in error["message"]
    assert not any('finish_reason": "stop' in e for e in events)
    stream = await client(stack.server.http_url).chat.completions.create(
        model="tidegate", messages=ask()["messages"], stream=True, extra_body=ESCALATE
    )
    with pytest.raises(openai.APIError, match="cut the stream"):
        async for _ in stream:
            pass


# -- tidegate extensions ---------------------------------------------------------


async def test_cache_control_extension(duo):
    base, edge, cloud = duo
    tenant = uuid.uuid4().hex

    async def tier(cache_control: str) -> str:
        extension = {"min_confidence": 1.0, "tenant": tenant, "cache_control": cache_control}
        response = await post(base, ask(tidegate=extension))
        assert response.status_code == 200, response.text
        return response.headers["x-tidegate-tier"]

    assert [await tier("bypass"), await tier("default")] == ["cloud", "cloud"]  # nothing stored
    assert await tier("refresh") == "cloud"  # not read, but stored
    assert await tier("default") == "cache"
    assert cloud.calls == 3
    bad = await post(base, ask(tidegate={"cache_control": "never"}))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tidegate.cache_control"


async def test_early_edge_tokens_are_withdrawn_by_a_restart_chunk(stack):
    edge, _ = await stack.counted_pair(stream={"early_edge_tokens": True})
    response = await post(stack.server.http_url, ask(stream=True, **ESCALATE))
    assert response.status_code == 200
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    restarts = [i for i, c in enumerate(chunks) if "restart" in c.get("tidegate", {})]
    assert len(restarts) == 1
    (at,) = restarts
    restart = chunks[at]["tidegate"]["restart"]
    assert restart["escalation_code"] == "low_confidence" and restart["reason"]
    assert chunks[at]["choices"][0]["delta"] == {}

    def text(part: list[dict[str, Any]]) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in part)

    assert text(chunks[1:at])  # the edge's tokens went out early...
    final = chunks[-1]
    assert final["tidegate"]["tier"] == "cloud" and "restarted" in final["tidegate"]["flags"]
    unary = await post(stack.server.http_url, ask(**ESCALATE))
    assert (
        text(chunks[at + 1 :]) == unary.json()["choices"][0]["message"]["content"]
    )  # ...then replaced


# -- the process -----------------------------------------------------------------


async def test_router_serve_prints_the_openai_url_and_serves_it(tmp_path, stack):
    cloud_server = await stack.node("cloud", CountingBackend(cloud_backend()), estimator=None)
    config = tmp_path / "router.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "listen": "127.0.0.1:0",
                "http": {"listen": "127.0.0.1:0"},
                "metrics": {"enabled": False},
                "registry": {"enabled": False},
                "edge": [],
                "cloud": [{"name": "cloud", "address": cloud_server.address}],
                "policy": {"default_max_new_tokens": 16},
            }
        ),
        encoding="utf-8",
    )
    proc = await spawn_tidegate("router", "serve", "--config", str(config))
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
            assert line, (await proc.stderr.read()).decode()
            if line.startswith("OpenAI-compatible API on "):
                url = line.split(" on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        answer = await api.chat.completions.create(model="tidegate", messages=ask()["messages"])
        assert answer.model_extra["tidegate"]["tier"] == "cloud"
        assert answer.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
    assert code == 0


# -- routing profiles --------------------------------------------------------------


async def test_tidegate_cloud_skips_the_edge(duo):
    base, edge, cloud = duo
    response = await post(base, ask(model="tidegate-cloud", **KEEP_EDGE))
    assert response.status_code == 200, response.text
    assert response.headers["x-tidegate-tier"] == "cloud"
    provenance = response.json()["tidegate"]
    assert provenance["escalation_code"] == "rule"
    assert "the requested route 'cloud'" in provenance["escalation_reason"]
    assert response.json()["model"] == "tidegate-cloud"
    assert (edge.calls, cloud.calls) == (0, 1)


async def test_tidegate_edge_never_escalates(duo):
    base, edge, cloud = duo
    for stream in (False, True):
        response = await post(base, ask(model="tidegate-edge", stream=stream, **ESCALATE))
        assert response.status_code == 200, response.text
        if stream:
            final = json.loads(sse_events(response.text)[-2])["tidegate"]
        else:
            final = response.json()["tidegate"]
            assert response.headers["x-tidegate-tier"] == "edge"
        assert final["tier"] == "edge" and final["escalation_code"] == "none"
        assert "kept by the requested route 'edge'" in final["escalation_reason"]
    assert (edge.calls, cloud.calls) == (2, 0)


async def test_tidegate_edge_with_the_edge_down_is_503(stack):
    cloud = CountingBackend(cloud_backend())
    cloud_server = await stack.node("cloud", cloud, estimator=None)
    await stack.router([closed_port_address()], [cloud_server.address])
    response = await post(stack.server.http_url, ask(model="tidegate-edge"))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "service_unavailable"
    assert "the requested route 'edge' keeps the request on the edge" in error["message"]
    assert cloud.calls == 0
    routed = await post(stack.server.http_url, ask())  # the routed profile falls back
    assert routed.status_code == 200 and routed.headers["x-tidegate-tier"] == "cloud"


async def test_a_privacy_pin_outranks_tidegate_cloud(stack):
    edge, cloud = await stack.counted_pair(
        rules=[{"name": "private", "tags": ["private"], "route": "edge_only"}]
    )
    pinned = {"tidegate": {"tags": ["private"]}}
    response = await post(stack.server.http_url, ask(model="tidegate-cloud", **pinned))
    assert response.status_code == 200, response.text
    assert response.headers["x-tidegate-tier"] == "edge"
    assert "pinned" in response.json()["tidegate"]["flags"]
    assert (edge.calls, cloud.calls) == (1, 0)


# -- API keys and budgets (router.auth, router.budgets: the same as gRPC) ----------------

ACME_KEY, GLOBEX_KEY = "tg_acme-" + uuid.uuid4().hex, "tg_globex-" + uuid.uuid4().hex
INITECH_KEY = "tg_initech-" + uuid.uuid4().hex


@pytest.fixture
async def guarded(stack):
    """Tenants with keys: acme may spend 10 cloud tokens a minute (less than one
    escalation), initech 10 a day, globex 1 request a second.
    Returns (base URL, edge, cloud)."""
    from router.auth import hash_key

    edge, cloud = await stack.counted_pair(
        tenants=[
            {"name": "acme", "api_key_hashes": [hash_key(ACME_KEY)]},
            {"name": "globex", "api_key_hashes": [hash_key(GLOBEX_KEY)]},
            {"name": "initech", "api_key_hashes": [hash_key(INITECH_KEY)]},
        ],
        budgets={
            "tenants": [
                {"tenant": "acme", "cloud_tokens_per_minute": 10},
                {"tenant": "globex", "requests_per_second": 1},
                {"tenant": "initech", "cloud_tokens_per_day": 10},
            ]
        },
    )
    return stack.server.http_url, edge, cloud


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_missing_or_wrong_key_is_401(guarded):
    base, edge, cloud = guarded
    for headers in ({}, bearer("tg_wrong"), {"authorization": "Basic abc"}):
        response = await post(base, ask(**KEEP_EDGE), headers=headers)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    # A bad key is refused before the body is even read.
    assert (await post(base, b"{not json", headers=bearer("tg_wrong"))).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        await client(base).chat.completions.create(model="tidegate", messages=ask()["messages"])
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers=bearer(ACME_KEY))).status_code == 200
        assert (await http.get("/health")).status_code == 200  # load balancers carry no key
    ok = await post(base, ask(**KEEP_EDGE), headers=bearer(ACME_KEY))
    assert ok.status_code == 200 and ok.headers["x-tidegate-tier"] == "edge"
    assert (edge.calls, cloud.calls) == (1, 0)


async def test_the_key_decides_the_tenant(guarded):
    base, _, _ = guarded
    api = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=ACME_KEY, max_retries=0)
    own = await api.chat.completions.with_raw_response.create(
        model="tidegate",
        messages=ask()["messages"],
        extra_body={"tidegate": {"min_confidence": 0.0, "tenant": "acme"}},
    )
    assert own.headers["x-tidegate-tier"] == "edge"
    with pytest.raises(openai.PermissionDeniedError, match="belongs to tenant 'acme'"):
        await api.chat.completions.create(
            model="tidegate",
            messages=ask()["messages"],
            extra_body={"tidegate": {"tenant": "globex"}},
        )


async def test_over_the_token_budget_is_429(guarded):
    base, edge, cloud = guarded
    for stream in (False, True):
        response = await post(base, ask(stream=stream, **ESCALATE), headers=bearer(ACME_KEY))
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
        assert "tenant 'acme' is over its cloud_tokens_per_minute budget" in error["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
        # One escalation costs more than acme's whole minute: waiting cannot help.
        assert response.headers["x-should-retry"] == "false"
    daily = await post(base, ask(**ESCALATE), headers=bearer(INITECH_KEY))
    assert daily.status_code == 429 and daily.headers["x-should-retry"] == "false"
    assert "cloud_tokens_per_day" in daily.json()["error"]["message"]
    assert cloud.calls == 0  # refused before the cloud was asked
    api = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=ACME_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await api.chat.completions.create(
            model="tidegate-cloud", messages=ask()["messages"], extra_body=ESCALATE
        )
    kept = await post(base, ask(**KEEP_EDGE), headers=bearer(ACME_KEY))  # the edge costs nothing
    assert kept.status_code == 200 and kept.headers["x-tidegate-tier"] == "edge"


async def test_over_the_request_rate_is_429(guarded):
    base, _, _ = guarded
    # Three at once: whichever second(s) they land in, one second holds two.
    responses = await asyncio.gather(
        *(post(base, ask(**KEEP_EDGE), headers=bearer(GLOBEX_KEY)) for _ in range(3))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["type"] == "requests"
    assert limited.headers["retry-after"] == "1"


# -- TLS: the router's tls.server protects HTTP as it protects gRPC -----------------


async def test_https_and_mutual_tls_with_the_routers_certificate(stack, tmp_path):
    ca = TestCA(tmp_path)
    server, client_cert = ca.issue("server", server=True), ca.issue("client", server=False)
    edge_server = await stack.node("edge", tiny_backend(seed=0))
    cloud_server = await stack.node("cloud", cloud_backend(), estimator=None)
    tls = {"cert_file": server.cert, "key_file": server.key, "client_ca_file": ca.ca_file}
    router = await serve_router(
        RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "http": {"listen": "127.0.0.1:0"},
                "metrics": {"enabled": False},
                "edge": [{"name": "edge", "address": edge_server.address}],
                "cloud": [{"name": "cloud", "address": cloud_server.address}],
                "policy": {"default_max_new_tokens": 16},
                "tls": {"server": tls},
            }
        )
    )
    stack.exits.push_async_callback(router.stop, 0)
    assert router.http_url.startswith("https://127.0.0.1:")

    mutual = ssl.create_default_context(cafile=ca.ca_file)
    mutual.load_cert_chain(client_cert.cert, client_cert.key)
    async with httpx.AsyncClient(base_url=router.http_url, verify=mutual) as http:
        response = await http.post("/v1/chat/completions", json=ask(**KEEP_EDGE))
    assert response.status_code == 200 and response.headers["x-tidegate-tier"] == "edge"
    api = openai.AsyncOpenAI(
        base_url=f"{router.http_url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(verify=mutual),
    )
    assert (await api.models.list()).data[0].id == "tidegate"

    no_client_cert = ssl.create_default_context(cafile=ca.ca_file)
    for verify in (no_client_cert, True):  # no certificate; the system roots do not know our CA
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            async with httpx.AsyncClient(base_url=router.http_url, verify=verify) as http:
                await http.get("/health")
    plain = router.http_url.replace("https://", "http://")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
        async with httpx.AsyncClient(base_url=plain) as http:
            await http.get("/health")


# -- the server itself -----------------------------------------------------------------


async def test_connections_have_nagle_off(duo, stack):
    """A response goes out as headers then body: with Nagle's algorithm on, the
    body waits for the client's delayed ACK (~40 ms a request, measured by
    bench/openai_http.py before this was fixed)."""
    import socket

    base, _, _ = duo
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/health")).status_code == 200
        connections = stack.server.http.server.server_state.connections
        assert connections
        for connection in connections:
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_a_busy_http_port_fails_startup_naming_the_field(stack):
    from tidegate.errors import ConfigError

    with busy_port() as port:
        settings = RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "http": {"listen": f"127.0.0.1:{port}"},
                "metrics": {"enabled": False},
                "registry": {"enabled": False},
                "edge": [],
                "cloud": [{"address": closed_port_address()}],
            }
        )
        with pytest.raises(ConfigError, match=rf"http.listen 127.0.0.1:{port}: cannot listen"):
            await serve_router(settings)


def test_an_unexpected_error_is_500_without_its_internals(caplog):
    from router.openai_http import OpenAIHttp

    with caplog.at_level(logging.ERROR, logger="router.openai_http"):
        error = OpenAIHttp._http_error(RuntimeError("cannot open /srv/secret/keys.db"))
    assert error.status == 500 and error.body["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(error.body)  # the client gets no paths or hosts
    assert "x-tidegate-request-id" in error.body["error"]["message"]
    assert "cannot open /srv/secret/keys.db" in caplog.text  # the operator does
