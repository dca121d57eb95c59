"""OpenAIBackend's protocol handling with scripted HTTP answers (httpx.MockTransport).

The real-server behaviour is in tests/integration/test_cloud_openai.py; here are
the dialects and malformed answers a real server rarely produces on demand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from cloud_node.openai_backend import (
    OpenAIBackend,
    error_for_status,
    finish_reason,
    request_body,
    server_message,
)
from cloud_node.settings import OpenAISettings
from tidegate.backend import Generation, ModelBackend
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

URL = "http://cloud.test/v1"
REQUEST = GenerationRequest(
    (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?")),
    SamplingParams(max_new_tokens=5),
)


def backend(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAIBackend:
    return OpenAIBackend(
        OpenAISettings(base_url=URL + "/", model="m"), transport=httpx.MockTransport(handler)
    )


def sse(*events: Any) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}


async def collect(model: ModelBackend) -> tuple[list[str], Generation]:
    items = [item async for item in model.stream(REQUEST)]
    final = items[-1]
    assert isinstance(final, Generation)
    assert all(isinstance(i, str) for i in items[:-1])
    return items[:-1], final  # type: ignore[return-value]


def test_is_a_model_backend() -> None:
    assert isinstance(backend(lambda r: httpx.Response(200)), ModelBackend)


def test_info_names_model_and_server() -> None:
    info = backend(lambda r: httpx.Response(200)).info
    assert info.model == f"openai:m@{URL}"  # trailing slash of base_url dropped
    assert (info.backend, info.quantization, info.context_length) == ("openai", "remote", 8192)


def test_request_body_sends_only_what_is_set() -> None:
    body = request_body(REQUEST, "m", stream=False, logprobs=True)
    assert body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
        ],
        "temperature": 0.0,
        "top_p": 1.0,
        "stream": False,
        "max_tokens": 5,
        "logprobs": True,
    }
    streamed = request_body(REQUEST, "m", stream=True, logprobs=False)
    assert streamed["stream_options"] == {"include_usage": True}
    assert "logprobs" not in streamed


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "too long", "type": "invalid_request_error"}}', "too long"),
        (b'{"error": "TGI says no"}', "TGI says no"),
        (b'{"detail": [{"loc": ["body"], "msg": "bad"}]}', '[{"loc": ["body"], "msg": "bad"}]'),
        (b'{"message": "llama.cpp says no"}', "llama.cpp says no"),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b"", "(empty body)"),
    ],
)
def test_server_message_reads_every_dialect(body: bytes, message: str) -> None:
    assert server_message(body) == message


def test_server_message_is_bounded() -> None:
    assert len(server_message(b"x" * 10_000)) == 500


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidArgument),
        (413, InvalidArgument),
        (422, InvalidArgument),
        (401, Unavailable),
        (403, Unavailable),
        (404, Unavailable),
        (408, DeadlineExceeded),
        (429, ResourceExhausted),
        (500, Unavailable),
        (502, Unavailable),
        (418, Unavailable),
    ],
)
def test_error_for_status(status: int, error: type) -> None:
    assert type(error_for_status(status, b'{"error": {"message": "m"}}', URL)) is error


@pytest.mark.parametrize(
    ("reason", "stop_reason", "stop", "expected"),
    [
        ("stop", None, (), FinishReason.STOP),
        ("stop", None, ("END",), FinishReason.STOP),  # EOS before any stop string
        ("stop", "END", ("END",), FinishReason.STOP_SEQUENCE),  # vLLM names the match
        ("stop", 151645, ("END",), FinishReason.STOP),  # a stop token id, not a string
        ("length", None, (), FinishReason.LENGTH),
        ("content_filter", None, (), FinishReason.LENGTH),  # cut short: never cached
        (None, None, (), FinishReason.STOP),
    ],
)
def test_finish_reason(reason: Any, stop_reason: Any, stop: tuple[str, ...], expected: Any) -> None:
    assert finish_reason(reason, stop_reason, stop) is expected


async def test_unary_without_usage_counts_logprob_entries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == f"{URL}/chat/completions"
        content = [{"token": "Hel", "logprob": -0.5}, {"token": "lo", "logprob": -0.25}]
        choice = {"message": {"content": "Hello"}, "finish_reason": "length"}
        choice["logprobs"] = {"content": content}
        return httpx.Response(200, json={"choices": [choice]})

    generation = await backend(handler).generate(REQUEST)
    assert generation.text == "Hello"
    assert generation.logprobs == [-0.5, -0.25]
    assert generation.token_texts == ["Hel", "lo"]
    assert generation.completion_tokens == 2
    assert generation.prompt_tokens == 0
    assert generation.finish_reason is FinishReason.LENGTH


async def test_unary_null_content_is_empty_text() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        choice = {"message": {"content": None}, "finish_reason": "stop", "logprobs": None}
        usage = {"prompt_tokens": 3, "completion_tokens": 1}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})

    generation = await backend(handler).generate(REQUEST)
    assert (generation.text, generation.completion_tokens, generation.prompt_tokens) == ("", 1, 3)


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"choices": []}', b'{"choices": [{"logprobs": {"content": [{}]}}]}'],
    ids=["not-json", "no-choices", "logprob-without-value"],
)
async def test_malformed_unary_answers_are_unavailable(content: bytes) -> None:
    model = backend(lambda r: httpx.Response(200, content=content))
    with pytest.raises(Unavailable, match=f"{URL} sent a malformed answer"):
        await model.generate(REQUEST)


async def test_stream_tolerates_comments_blank_lines_and_usage_chunks() -> None:
    body = (
        b": keep-alive comment\n\n"
        + b"event: message\n"
        + sse(
            chunk(""),
            chunk("Hel", logprobs={"content": [{"token": "Hel", "logprob": -1.0}]}),
            chunk("lo", logprobs={"content": [{"token": "lo", "logprob": -2.0}]}),
            chunk(None, "stop", stop_reason=None),
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
            "[DONE]",
        )
    )
    model = backend(lambda r: httpx.Response(200, content=body))
    deltas, final = await collect(model)
    assert deltas == ["Hel", "lo"]
    assert (final.text, final.logprobs, final.token_texts) == ("Hello", [-1.0, -2.0], ["Hel", "lo"])
    assert (final.prompt_tokens, final.completion_tokens) == (7, 2)
    assert final.finish_reason is FinishReason.STOP


async def test_stream_with_a_finish_but_no_done_marker_is_accepted() -> None:
    body = sse(chunk("Hi"), chunk(None, "length"))
    deltas, final = await collect(backend(lambda r: httpx.Response(200, content=body)))
    assert deltas == ["Hi"]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == 0  # no usage, no logprobs: nothing to count


async def test_stream_that_ends_without_finishing_is_unavailable() -> None:
    model = backend(lambda r: httpx.Response(200, content=sse(chunk("Hel"))))
    with pytest.raises(Unavailable, match="ended the stream before the answer was complete"):
        await collect(model)


async def test_stream_error_event_is_unavailable() -> None:
    body = sse(chunk("Hel"), {"error": {"message": "CUDA out of memory", "code": 500}})
    with pytest.raises(Unavailable, match="CUDA out of memory"):
        await collect(backend(lambda r: httpx.Response(200, content=body)))


async def test_stream_malformed_event_is_unavailable() -> None:
    body = sse(chunk("Hel"), "{not json")
    with pytest.raises(Unavailable, match="malformed stream event"):
        await collect(backend(lambda r: httpx.Response(200, content=body)))


@pytest.mark.parametrize(
    ("exc", "error", "phrase"),
    [
        (httpx.ConnectError("refused"), Unavailable, "could not be reached"),
        (httpx.ConnectTimeout("slow"), Unavailable, "could not be reached"),
        (httpx.ReadTimeout("slow"), DeadlineExceeded, "timed out"),
        (httpx.RemoteProtocolError("cut"), Unavailable, "failed mid-answer"),
    ],
)
async def test_transport_failures(exc: Exception, error: type, phrase: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(error, match=phrase):
        await backend(handler).generate(REQUEST)
    with pytest.raises(error, match=phrase):
        await collect(backend(handler))


def garbled_gzip(request: httpx.Request) -> httpx.Response:
    # A body that is not the gzip its header claims: httpx raises DecodingError on reading it.
    return httpx.Response(
        200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip at all")
    )


def redirect_loop(request: httpx.Request) -> httpx.Response:
    raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.", request=request)


@pytest.mark.parametrize(
    ("handler", "name"),
    [(garbled_gzip, "DecodingError"), (redirect_loop, "TooManyRedirects")],
    ids=["undecodable-body", "too-many-redirects"],
)
async def test_request_errors_beyond_transport_are_unavailable(
    handler: Callable[[httpx.Request], httpx.Response], name: str
) -> None:
    # Not TransportErrors, but httpx.RequestErrors all the same: the server's fault, so
    # UNAVAILABLE (the router may fall back), never an unexpected INTERNAL.
    phrase = f"{URL} sent a response we could not read: {name}"
    with pytest.raises(Unavailable, match=phrase):
        await backend(handler).generate(REQUEST)
    with pytest.raises(Unavailable, match=phrase):
        await collect(backend(handler))


@pytest.mark.parametrize(
    "content",
    [
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": -1}}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"completion_tokens": 8589934592}}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1e999}}',
        b"[" * 100_000 + b"]" * 100_000,  # nested past Python's recursion limit
    ],
    ids=["negative-count", "count-past-int32", "infinite-count", "deeply-nested"],
)
async def test_answers_a_reply_could_not_carry_are_unavailable_not_internal(content: bytes) -> None:
    model = backend(lambda r: httpx.Response(200, content=content))
    with pytest.raises(Unavailable, match="malformed answer"):
        await model.generate(REQUEST)
    deep = b"data: " + b"[" * 100_000 + b"\n\n"
    with pytest.raises(Unavailable, match="malformed stream event"):
        await collect(backend(lambda r: httpx.Response(200, content=deep)))


async def test_credentials_and_the_api_key_are_never_shown() -> None:
    key = "sk-SECRET-1234567890"

    def quotes_the_key(request: httpx.Request) -> httpx.Response:
        assert "authorization" in request.headers  # the credentials are still sent
        return httpx.Response(401, json={"error": {"message": f"Invalid API key: {key}"}})

    settings = OpenAISettings(
        base_url="https://user:hunter2@cloud.test/v1?token=abc", model="m", api_key_env="KEY"
    )
    model = OpenAIBackend(
        settings, environ={"KEY": key}, transport=httpx.MockTransport(quotes_the_key)
    )
    assert model.info.model == "openai:m@https://cloud.test/v1"
    with pytest.raises(Unavailable) as info:
        await model.generate(REQUEST)
    assert key not in str(info.value) and "hunter2" not in str(info.value)
    assert "Invalid API key: ***" in str(info.value)


async def test_a_stream_of_keep_alives_alone_ends_at_the_timeout() -> None:
    import asyncio

    async def pings() -> Any:
        for _ in range(200):  # 10 s of keep-alives, and never an answer
            yield b": ping\n\n"
            await asyncio.sleep(0.05)

    model = OpenAIBackend(
        OpenAISettings(base_url=URL, model="m", timeout_s=0.3),
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=pings())),
    )
    with pytest.raises(DeadlineExceeded, match="nothing but keep-alives for 0.3s"):
        await collect(model)
