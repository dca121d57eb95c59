"""``OpenAIBackend``: a ModelBackend over any OpenAI-compatible chat completions server.

vLLM, TGI, llama.cpp server and hosted APIs all speak ``POST /chat/completions``.
We ask for per-token log-probabilities (``logprobs: true``) so that estimators
can read the cloud answer too; entropies need the full distribution, which these
servers do not send, so they stay None. Token ids are not part of the API:
``token_ids`` stays empty and the completion count comes from ``usage``.

Failures map to tidegate errors (and so to gRPC status codes) by whose fault
they are: a server that is down, overloaded with 5xx, or that rejects our API
key is UNAVAILABLE (the router can fall back); a request the server calls
invalid is INVALID_ARGUMENT; a rate limit is RESOURCE_EXHAUSTED; a timeout is
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from cloud_node.settings import OpenAISettings
from tidegate.backend import BackendInfo, Generation
from tidegate.chat import FinishReason, GenerationRequest
from tidegate.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TidegateError,
    Unavailable,
)

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
MAX_COUNT = 2**31 - 1  # token counts travel as int32 and uint32
# What reading a server's JSON can raise on a malformed (or hostile) answer: the
# server's fault, so UNAVAILABLE (the router falls back), never INTERNAL.
_MALFORMED = (
    ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, RecursionError
)  # fmt: skip


def _count(value: Any) -> int:
    """A token count from a server: ValueError unless a whole number in [0, MAX_COUNT]."""
    count = int(value)
    if (isinstance(value, float) and count != value) or not 0 <= count <= MAX_COUNT:
        raise ValueError(f"token count {value!r} is not a count")
    return count


def request_body(
    request: GenerationRequest, model: str, *, stream: bool, logprobs: bool
) -> dict[str, Any]:
    """The JSON body of one chat completions request."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stream": stream,
    }
    if sampling.max_new_tokens is not None:
        body["max_tokens"] = sampling.max_new_tokens
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if logprobs:
        body["logprobs"] = True
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def public_url(url: str) -> str:
    """``url`` without credentials (``user:pass@``), query or fragment: what may be
    shown in errors, logs and the node's model identity."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` (our API key, which a server may quote back) masked."""
    return text.replace(secret, "***") if secret else text


def server_message(body: bytes, secret: str | None = None) -> str:
    """The human-readable error in an error response, whatever the server's dialect
    (``secret``, the API key, masked wherever it is quoted)."""
    return redact(_server_message(body), secret)


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text[:MAX_ERROR_CHARS] or "(empty body)"
    message: Any = data
    if isinstance(data, dict):
        # OpenAI/vLLM: {"error": {"message": …}}; TGI: {"error": "…"};
        # FastAPI: {"detail": …}; some: {"message": …}
        message = data.get("error", data.get("detail", data.get("message", data)))
        if isinstance(message, dict):
            message = message.get("message", message)
    if not isinstance(message, str):
        message = json.dumps(message)
    return message[:MAX_ERROR_CHARS]


def error_for_status(
    status: int, body: bytes, url: str, secret: str | None = None
) -> TidegateError:
    """The tidegate error for an HTTP error status from the server at ``url``
    (``secret``: our API key, masked if the server quotes it)."""
    message = server_message(body, secret)
    if status in (400, 413, 422):
        return InvalidArgument(f"the cloud model rejected the request: {message}")
    if status in (401, 403):
        return Unavailable(
            f"cloud rejected our API key ({url} answered {status}: {message}); "
            "check openai.api_key_env in the cloud node's configuration"
        )
    if status == 429:
        return ResourceExhausted(f"cloud rate limit reached ({url}): {message}")
    if status == 404:
        return Unavailable(
            f"{url} answered 404 ({message}); check openai.base_url and openai.model"
        )
    if status == 408:
        return DeadlineExceeded(f"{url} timed out the request: {message}")
    return Unavailable(f"cloud server {url} answered {status}: {message}")


def error_for_transport(exc: httpx.TransportError, url: str) -> TidegateError:
    """The tidegate error for a failure below HTTP: connecting, reading, timing out."""
    if isinstance(exc, httpx.ConnectTimeout):
        return Unavailable(f"cloud server {url} could not be reached: connect timed out")
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"cloud server {url} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return Unavailable(f"cloud server {url} could not be reached: {exc or 'connect failed'}")
    return Unavailable(f"cloud server {url} failed mid-answer: {type(exc).__name__}: {exc}")


def error_for_request(exc: httpx.RequestError, url: str) -> TidegateError:
    """The tidegate error for any failure httpx raises while sending or reading.

    Besides transport failures, httpx raises ``DecodingError`` (a body that does
    not decode as its Content-Encoding says) and ``TooManyRedirects``: the
    server's fault, not ours, so the router may fall back (UNAVAILABLE), not INTERNAL.
    """
    if isinstance(exc, httpx.TransportError):
        return error_for_transport(exc, url)
    return Unavailable(
        f"cloud server {url} sent a response we could not read: {type(exc).__name__}: {exc}; "
        "check openai.base_url points at an OpenAI-compatible API"
    )


def finish_reason(reason: Any, stop_reason: Any, stop: tuple[str, ...]) -> FinishReason:
    """OpenAI's finish_reason → ours. vLLM also says which stop string matched."""
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "content_filter":
        return FinishReason.LENGTH  # cut short: never complete, never cached
    if isinstance(stop_reason, str) and stop_reason in stop:
        return FinishReason.STOP_SEQUENCE
    return FinishReason.STOP


@dataclass
class _Answer:
    """What accumulates while reading one answer, unary or streamed."""

    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    finish: Any = None
    stop_reason: Any = None
    prompt_tokens: int = 0
    completion_tokens: int | None = None

    def add_choice(self, choice: Mapping[str, Any], content: Any) -> None:
        if isinstance(content, str):
            self.text.append(content)
        entries = (choice.get("logprobs") or {}).get("content") or []
        for entry in entries:
            self.logprobs.append(float(entry["logprob"]))
            self.token_texts.append(str(entry.get("token", "")))
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")

    def add_usage(self, usage: Any) -> None:
        if isinstance(usage, Mapping):
            self.prompt_tokens = _count(usage.get("prompt_tokens") or 0)
            if usage.get("completion_tokens") is not None:
                self.completion_tokens = _count(usage["completion_tokens"])

    def generation(self, request: GenerationRequest, model: str, started: float) -> Generation:
        completion = self.completion_tokens
        if completion is None:
            completion = len(self.logprobs)
        return Generation(
            text="".join(self.text),
            token_ids=[],
            logprobs=self.logprobs,
            entropies=None,
            finish_reason=finish_reason(self.finish, self.stop_reason, request.sampling.stop),
            prompt_tokens=self.prompt_tokens,
            model=model,
            generation_ms=(time.perf_counter() - started) * 1000.0,
            token_texts=self.token_texts,
            reported_completion_tokens=completion,
        )


class OpenAIBackend:
    """A ModelBackend that forwards each request to an OpenAI-compatible server."""

    def __init__(
        self,
        settings: OpenAISettings,
        *,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        origin = settings.base_url.rstrip("/")
        self.url = f"{origin}/chat/completions"  # credentials in it, if any, are sent…
        self.base_url = public_url(origin)  # …but never shown
        headers = {"Accept": "application/json"}
        key = _api_key(settings, os.environ if environ is None else environ)
        self._key = key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_connections),
            transport=transport,
        )
        self._info = BackendInfo(
            model=f"openai:{settings.model}@{self.base_url}",
            context_length=settings.context_length,
            quantization="remote",
            backend="openai",
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        return request_body(
            request, self.settings.model, stream=stream, logprobs=self.settings.logprobs
        )

    async def generate(self, request: GenerationRequest) -> Generation:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                response = await self._client.post(self.url, json=self._body(request, stream=False))
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"cloud server {self.base_url} did not answer within {self.settings.timeout_s}s"
            ) from exc
        except httpx.RequestError as exc:
            raise error_for_request(exc, self.base_url) from exc
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, self.base_url, self._key)
        try:
            data = response.json()
            choice = data["choices"][0]
            answer = _Answer()
            answer.add_choice(choice, (choice.get("message") or {}).get("content"))
            answer.add_usage(data.get("usage"))
        except _MALFORMED as exc:
            raise Unavailable(
                f"cloud server {self.base_url} sent a malformed answer: {type(exc).__name__}: "
                f"{redact(str(exc), self._key)[:MAX_ERROR_CHARS]}"
            ) from exc
        return answer.generation(request, self._info.model, started)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        started = time.perf_counter()
        answer = _Answer()
        done = False
        try:
            async with self._client.stream(
                "POST", self.url, json=self._body(request, stream=True)
            ) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    raise error_for_status(response.status_code, body, self.base_url, self._key)
                # httpx's read timeout restarts with every line, keep-alive comments
                # too: a server that sends only those would hold the stream forever.
                quiet_since = time.monotonic()
                async for line in response.aiter_lines():
                    payload = _sse_data(line)
                    if payload is None:
                        if time.monotonic() - quiet_since > self.settings.timeout_s:
                            raise DeadlineExceeded(
                                f"cloud server {self.base_url} sent nothing but keep-alives "
                                f"for {self.settings.timeout_s}s"
                            )
                        continue
                    quiet_since = time.monotonic()
                    if payload == "[DONE]":
                        done = True
                        break
                    delta = self._read_chunk(payload, answer)
                    if delta:
                        yield delta
        except httpx.RequestError as exc:
            raise error_for_request(exc, self.base_url) from exc
        if not done and answer.finish is None:
            raise Unavailable(
                f"cloud server {self.base_url} ended the stream before the answer was complete"
            )
        yield answer.generation(request, self._info.model, started)

    def _read_chunk(self, payload: str, answer: _Answer) -> str:
        """Fold one SSE event into ``answer``; return its text delta."""
        try:
            chunk = json.loads(payload)
            if "error" in chunk:
                raise Unavailable(
                    f"cloud server {self.base_url} failed mid-stream: "
                    f"{server_message(payload.encode(), self._key)}"
                )
            answer.add_usage(chunk.get("usage"))
            choices = chunk.get("choices") or []
            if not choices:
                return ""
            content = (choices[0].get("delta") or {}).get("content")
            answer.add_choice(choices[0], content)
        except _MALFORMED as exc:
            raise Unavailable(
                f"cloud server {self.base_url} sent a malformed stream event: "
                f"{type(exc).__name__}: {redact(str(exc), self._key)[:MAX_ERROR_CHARS]}"
            ) from exc
        return content if isinstance(content, str) else ""

    async def close(self) -> None:
        await self._client.aclose()


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, blank and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


def _api_key(settings: OpenAISettings, environ: Mapping[str, str]) -> str | None:
    if settings.api_key_env is None:
        return None
    key = environ.get(settings.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"openai.api_key_env: the environment variable {settings.api_key_env} "
            "is not set (or empty); export the API key there"
        )
    return key
