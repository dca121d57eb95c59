"""OpenAIBackend against a real OpenAI-compatible HTTP server backed by a tiny real model.

The server (tests/support/openai_server.py) answers from a TransformersBackend
over a random tiny Llama, so every remote answer can be compared with the
model's own greedy answer, token log-probabilities included.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from cloud_node.openai_backend import OpenAIBackend
from cloud_node.settings import OpenAISettings
from tests.support.openai_server import Failure, OpenAIServer
from tests.support.tiny_models import tiny_backend
from tidegate.backend import Generation, ModelBackend
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TidegateError,
    Unavailable,
)


def ask(question: str = "What is the capital of France?", **sampling: object) -> GenerationRequest:
    params = SamplingParams(**{"max_new_tokens": 16, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(messages=(ChatMessage("user", question),), sampling=params)


async def collect(
    backend: ModelBackend, request: GenerationRequest
) -> tuple[list[str], Generation]:
    deltas: list[str] = []
    final: Generation | None = None
    async for item in backend.stream(request):
        if isinstance(item, Generation):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ModelBackend]:
    backend = tiny_backend()
    yield backend
    await backend.close()


@pytest.fixture(scope="module")
async def server(model: ModelBackend) -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(model) as running:
        yield running


@pytest.fixture
async def client(server: OpenAIServer) -> AsyncIterator[OpenAIBackend]:
    server.received.clear()
    backend = OpenAIBackend(OpenAISettings(base_url=server.base_url, model=server.model))
    yield backend
    await backend.close()
    server._failures.clear()


def assert_same_answer(remote: Generation, direct: Generation) -> None:
    assert remote.text == direct.text
    assert remote.finish_reason is direct.finish_reason
    assert remote.logprobs == pytest.approx(direct.logprobs)
    assert remote.token_texts == direct.token_texts
    assert remote.entropies is None  # OpenAI servers send no full distribution
    assert remote.token_ids == []
    assert remote.prompt_tokens == direct.prompt_tokens
    assert remote.completion_tokens == direct.completion_tokens > 0


async def test_unary_answer_is_the_models_greedy_answer(
    client: OpenAIBackend, model: ModelBackend, server: OpenAIServer
) -> None:
    request = ask()
    remote = await client.generate(request)
    assert_same_answer(remote, await model.generate(request))
    assert remote.model == f"openai:{server.model}@{server.base_url}"
    assert remote.generation_ms > 0
    (sent,) = server.received
    assert sent.path == "/v1/chat/completions" and sent.method == "POST"
    assert sent.body == {
        "model": server.model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0.0,
        "top_p": 1.0,
        "stream": False,
        "max_tokens": 16,
        "logprobs": True,
    }
    assert "authorization" not in sent.headers


async def test_stream_yields_deltas_then_the_whole_answer(
    client: OpenAIBackend, model: ModelBackend, server: OpenAIServer
) -> None:
    request = ask("Hello, world!", max_new_tokens=24)
    deltas, final = await collect(client, request)
    direct = await model.generate(request)
    assert_same_answer(final, direct)
    assert "".join(deltas) == direct.text
    assert len(deltas) >= 1
    (sent,) = server.received
    assert sent.body is not None
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_finish_reasons_carry_over(
    client: OpenAIBackend, model: ModelBackend, streaming: bool
) -> None:
    long_answer = await model.generate(ask(max_new_tokens=64))
    assert len(long_answer.text) >= 4, "the tiny model's answer is too short for this test"
    stop = long_answer.text[2:4]
    cases = [
        (ask(max_new_tokens=2), FinishReason.LENGTH),
        (ask(max_new_tokens=64, stop=(stop,)), FinishReason.STOP_SEQUENCE),
    ]
    for request, expected in cases:
        direct = await model.generate(request)
        assert direct.finish_reason is expected
        remote = (
            (await collect(client, request))[1] if streaming else await client.generate(request)
        )
        assert_same_answer(remote, direct)


async def test_sampling_parameters_are_sent(client: OpenAIBackend, server: OpenAIServer) -> None:
    await client.generate(ask(temperature=0.7, top_p=0.9, seed=7, stop=("\n", "END")))
    body = server.received[-1].body
    assert body is not None
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (
        pytest.approx(0.7),
        pytest.approx(0.9),
        7,
        ["\n", "END"],
    )


async def test_without_logprobs_usage_still_counts_tokens(
    server: OpenAIServer, model: ModelBackend
) -> None:
    settings = OpenAISettings(base_url=server.base_url, model=server.model, logprobs=False)
    backend = OpenAIBackend(settings)
    try:
        remote = await backend.generate(ask())
    finally:
        await backend.close()
    direct = await model.generate(ask())
    assert server.received[-1].body is not None
    assert "logprobs" not in server.received[-1].body
    assert remote.text == direct.text
    assert remote.logprobs == []
    assert remote.completion_tokens == direct.completion_tokens


FAILURES = [
    pytest.param(500, Unavailable, "answered 500", id="500"),
    pytest.param(503, Unavailable, "answered 503", id="503"),
    pytest.param(429, ResourceExhausted, "rate limit", id="429"),
    pytest.param(400, InvalidArgument, "the server says no", id="400"),
    pytest.param(422, InvalidArgument, "the server says no", id="422"),
    pytest.param(401, Unavailable, "cloud rejected our API key", id="401"),
    pytest.param(403, Unavailable, "cloud rejected our API key", id="403"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("status", "error", "phrase"), FAILURES)
async def test_http_errors_map_to_tidegate_errors(
    client: OpenAIBackend,
    server: OpenAIServer,
    status: int,
    error: type[TidegateError],
    phrase: str,
    streaming: bool,
) -> None:
    server.fail_next(Failure(status=status, message="the server says no"))
    with pytest.raises(error, match=phrase) as caught:
        if streaming:
            await collect(client, ask())
        else:
            await client.generate(ask())
    assert type(caught.value) is error
    assert "the server says no" in str(caught.value)
    if error is not InvalidArgument:  # an operator problem: say which server
        assert server.base_url in str(caught.value)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_slow_server_is_a_deadline(server: OpenAIServer, streaming: bool) -> None:
    backend = OpenAIBackend(
        OpenAISettings(base_url=server.base_url, model=server.model, timeout_s=0.3)
    )
    server.fail_next(Failure(delay_s=1.5))
    try:
        with pytest.raises(DeadlineExceeded, match="timed out|did not answer"):
            if streaming:
                await collect(backend, ask())
            else:
                await backend.generate(ask())
    finally:
        await backend.close()


async def test_a_stream_cut_mid_answer_is_unavailable(
    client: OpenAIBackend, server: OpenAIServer
) -> None:
    server.fail_next(Failure(drop_after_events=2))  # role chunk + one delta, then the cut
    deltas: list[str] = []
    with pytest.raises(Unavailable, match=server.base_url):
        async for item in client.stream(ask(max_new_tokens=24)):
            assert not isinstance(item, Generation), "a cut stream must not end with an answer"
            deltas.append(item)
    assert len(deltas) == 1


async def test_an_error_event_mid_stream_is_unavailable(
    client: OpenAIBackend, server: OpenAIServer
) -> None:
    server.fail_next(Failure(error_event_after=2, message="engine crashed"))
    with pytest.raises(Unavailable, match="engine crashed"):
        await collect(client, ask(max_new_tokens=24))


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_refused_port_is_unavailable_naming_the_url(streaming: bool) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAIBackend(OpenAISettings(base_url=url, model="m"))
    try:
        with pytest.raises(Unavailable, match=f"{url} could not be reached"):
            if streaming:
                await collect(backend, ask())
            else:
                await backend.generate(ask())
    finally:
        await backend.close()


async def test_api_key_comes_from_the_named_environment_variable(server: OpenAIServer) -> None:
    settings = OpenAISettings(base_url=server.base_url, model=server.model, api_key_env="TG_KEY")
    backend = OpenAIBackend(settings, environ={"TG_KEY": "sk-test-123"})
    try:
        await backend.generate(ask(max_new_tokens=2))
    finally:
        await backend.close()
    assert server.received[-1].headers["authorization"] == "Bearer sk-test-123"


def test_a_missing_api_key_variable_fails_at_startup_naming_it() -> None:
    settings = OpenAISettings(base_url="http://127.0.0.1:1/v1", api_key_env="TG_MISSING_KEY")
    with pytest.raises(ConfigError, match="openai.api_key_env.*TG_MISSING_KEY"):
        OpenAIBackend(settings, environ={})
