"""A small, real OpenAI-compatible HTTP server for tests, backed by any ModelBackend.

It speaks just enough HTTP/1.1 (stdlib ``asyncio.start_server``, one request
per connection, chunked transfer for streams) to serve
``POST /v1/chat/completions`` — unary and SSE streaming, with per-token
log-probabilities and usage, in the shape vLLM returns — and ``GET /v1/models``.

Tests can queue failures: an HTTP error status with an OpenAI-style error body,
a delay (for timeouts), a connection dropped after some stream events, or an
error event in the middle of a stream::

    async with OpenAIServer(backend) as server:
        server.fail_next(Failure(status=429, message="slow down"))
        OpenAIBackend(OpenAISettings(base_url=server.base_url, model=server.model))
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tidegate.backend import Generation, ModelBackend
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.errors import TidegateError

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Failure:
    """One simulated failure, consumed by the next chat completions request."""

    status: int | None = None  # answer with this HTTP status and an error body
    message: str = "simulated failure"
    delay_s: float = 0.0  # wait this long before doing anything else
    drop_after_events: int | None = None  # streaming: cut the connection after N events
    error_event_after: int | None = None  # streaming: send an SSE error event after N events


@dataclass(frozen=True)
class Received:
    """A request as the server saw it, for assertions."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any] | None


def request_from_body(body: dict[str, Any]) -> GenerationRequest:
    stop = body.get("stop") or ()
    return GenerationRequest(
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in body["messages"]),
        sampling=SamplingParams(
            max_new_tokens=body.get("max_tokens"),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ),
    )


def finish_fields(generation: Generation, stop: tuple[str, ...]) -> dict[str, Any]:
    """``finish_reason`` and vLLM's ``stop_reason`` (the stop string that matched)."""
    if generation.finish_reason is FinishReason.LENGTH:
        return {"finish_reason": "length", "stop_reason": None}
    if generation.finish_reason is FinishReason.STOP_SEQUENCE and stop:
        decoded_tail = "".join(generation.token_texts)[len(generation.text) :]
        matched = next((s for s in stop if s in decoded_tail), stop[0])
        return {"finish_reason": "stop", "stop_reason": matched}
    return {"finish_reason": "stop", "stop_reason": None}


def logprobs_field(generation: Generation) -> dict[str, Any]:
    texts = generation.token_texts or [""] * len(generation.logprobs)
    return {
        "content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(texts, generation.logprobs, strict=True)
        ]
    }


def usage_field(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


class _Cut(Exception):
    """Raised to abort the connection without finishing the response."""


@dataclass
class OpenAIServer:
    backend: ModelBackend
    model: str = "tiny-test-model"
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)
    _failures: deque[Failure] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def fail_next(self, failure: Failure, times: int = 1) -> None:
        self._failures.extend([failure] * times)

    async def start(self) -> OpenAIServer:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> OpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- HTTP ---------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, headers, body = await self._read_request(reader)
            await self._route(method, path, headers, body, writer)
            await writer.drain()
        except _Cut:
            writer.transport.abort()
            return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        with contextlib.suppress(ConnectionError):
            writer.close()
            await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        method, path, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = min(int(headers.get("content-length", "0")), MAX_BODY_BYTES)
        body = await reader.readexactly(length) if length else b""
        return method, path, headers, body

    async def _route(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        body: dict[str, Any] | None = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                self._send_json(writer, 400, _error_body("the body is not valid JSON", 400))
                return
        self.received.append(Received(method, path, headers, body))
        if path == "/v1/models" and method == "GET":
            self._send_json(writer, 200, {"object": "list", "data": [{"id": self.model}]})
        elif path == "/v1/chat/completions" and method == "POST" and body is not None:
            await self._chat(body, writer)
        elif path == "/v1/chat/completions":
            self._send_json(writer, 405, _error_body("POST a JSON body", 405))
        else:
            self._send_json(writer, 404, _error_body(f"no route {path}", 404))

    def _send_json(self, writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )

    # --- chat completions ---------------------------------------------------

    async def _chat(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        failure = self._failures.popleft() if self._failures else Failure()
        if failure.delay_s:
            await asyncio.sleep(failure.delay_s)
        if failure.status is not None:
            self._send_json(writer, failure.status, _error_body(failure.message, failure.status))
            return
        try:
            request = request_from_body(body)
            request.validate(hard_limit=1_000_000)
        except (KeyError, TypeError, ValueError, TidegateError) as exc:
            self._send_json(writer, 400, _error_body(f"invalid request: {exc}", 400))
            return
        completion_id = f"chatcmpl-{next(self._ids)}"
        if body.get("stream"):
            await self._chat_stream(request, body, completion_id, failure, writer)
            return
        try:
            generation = await self.backend.generate(request)
        except TidegateError as exc:
            self._send_json(writer, 400, _error_body(str(exc), 400))
            return
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": generation.text},
            "logprobs": logprobs_field(generation) if body.get("logprobs") else None,
            **finish_fields(generation, request.sampling.stop),
        }
        self._send_json(
            writer,
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [choice],
                "usage": usage_field(generation),
            },
        )

    async def _chat_stream(
        self,
        request: GenerationRequest,
        body: dict[str, Any],
        completion_id: str,
        failure: Failure,
        writer: asyncio.StreamWriter,
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        sent = 0

        async def event(payload: Any) -> None:
            nonlocal sent
            if failure.drop_after_events is not None and sent >= failure.drop_after_events:
                await writer.drain()
                raise _Cut
            if failure.error_event_after is not None and sent == failure.error_event_after:
                payload = _error_body(failure.message, 500)
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
            encoded = data.encode()
            writer.write(f"{len(encoded):x}\r\n".encode() + encoded + b"\r\n")
            await writer.drain()
            sent += 1

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": usage,
            }

        await event(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]))
        async for item in self.backend.stream(request):
            if isinstance(item, Generation):
                final = {
                    "index": 0,
                    "delta": {},
                    "logprobs": logprobs_field(item) if body.get("logprobs") else None,
                    **finish_fields(item, request.sampling.stop),
                }
                await event(chunk([final]))
                if (body.get("stream_options") or {}).get("include_usage"):
                    await event(chunk([], usage_field(item)))
            elif item:
                await event(chunk([{"index": 0, "delta": {"content": item}}]))
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}
