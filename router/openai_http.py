"""The OpenAI-compatible HTTP front door of the router (Starlette on uvicorn).

    POST /v1/chat/completions   unary, or server-sent events with ``stream: true``
    GET  /v1/models             the routing profiles (router.openai_schema.PROFILES)
    GET  /v1/models/{model}
    GET  /health                200 while the router serves, 503 once it is stopping

Every request goes through the same ``Pipeline`` as the gRPC service (cache,
edge, estimator, escalation and whatever else the pipeline enforces); this
module only translates. The API key arrives as ``Authorization: Bearer KEY``
and is turned into a tenant by the same authenticator the gRPC side uses
(``pipeline.auth``).

The server runs on the router's event loop beside grpc.aio: ``serve_http``
binds the socket itself (so port 0 works and a busy port is a ConfigError
naming ``http.listen``, not uvicorn's ``sys.exit``) and leaves signal handling
to the process that owns the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router import openai_errors as errors
from router import openai_schema as schema
from router.auth import PermissionDenied
from router.domain import Restart, RouteRequest, RouteResult
from router.pipeline import Pipeline
from router.settings import HttpSettings
from tidegate.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TidegateError,
    Unauthenticated,
)
from tidegate.logs import bind_request_id
from tidegate.server import split_address
from tidegate.tls import ServerTls

log = logging.getLogger(__name__)

# A client-chosen request id (X-Request-Id) is kept when it is this tame.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff in a JSON string
TIMEOUT_HEADER = "x-tidegate-timeout"  # seconds; shortens http.request_timeout_s
# Refusals of the request itself, which no deadline explains (see _past_deadline).
_THE_REQUESTS_FAULT = (
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
    NotFound,
)


def _json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


async def _close(events: AsyncIterator[Any]) -> None:
    """Close the pipeline's stream now, so its node calls stop with the client."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def _frame(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class OpenAIHttp:
    """The ASGI app's handlers, bound to one pipeline."""

    def __init__(self, pipeline: Pipeline, settings: HttpSettings) -> None:
        self.pipeline = pipeline
        self.request_timeout_s = settings.request_timeout_s
        self.max_body_bytes = settings.max_body_bytes
        self.created = int(time.time())
        self.stopping = False

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -- endpoints -----------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.stopping:
            return _json_response({"status": "stopping"}, 503)
        return _json_response({"status": "ok", "policy_version": self.pipeline.version})

    async def list_models(self, request: Request) -> Response:
        try:
            self._tenant(request)
        except TidegateError as exc:
            return self._error(exc)
        return _json_response(
            {"object": "list", "data": [self._model(p) for p in schema.PROFILES.values()]}
        )

    async def get_model(self, request: Request) -> Response:
        try:
            self._tenant(request)
        except TidegateError as exc:
            return self._error(exc)
        profile = schema.PROFILES.get(request.path_params["model"])
        if profile is None:
            return self._send(errors.model_not_found(request.path_params["model"], schema.PROFILES))
        return _json_response(self._model(profile))

    async def chat_completions(self, request: Request) -> Response:
        request_id = self._request_id(request)
        bind_request_id(request_id)  # on every log line of this request (tidegate.logs)
        ids = {"x-request-id": request_id, "x-tidegate-request-id": request_id}
        deadline: float | None = None
        try:
            tenant = self._tenant(request)  # a bad key is 401 whatever the body
            parsed = schema.parse_request(await self._body(request))
            if parsed.tidegate.tenant:
                tenant = self._tenant(request, parsed.tidegate.tenant)
            if parsed.model not in schema.PROFILES:
                return self._send(errors.model_not_found(parsed.model, schema.PROFILES), ids)
            route = schema.to_route_request(parsed, tenant, request_id)
            deadline = self._deadline(request)
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                return await self._stream(route, parsed.model, include_usage, deadline, ids)
            async with asyncio.timeout_at(deadline):
                result = await self.pipeline.generate(route, deadline)
            body = schema.completion(result, parsed.model, int(time.time()))
            return _json_response(body, headers={**ids, **schema.provenance_headers(result)})
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._error(self._past_deadline(exc, deadline), ids)

    # -- streaming -----------------------------------------------------------

    async def _stream(
        self,
        route: RouteRequest,
        model: str,
        include_usage: bool,
        deadline: float,
        headers: dict[str, str],
    ) -> Response:
        """Wait for the first event before answering, so a request that fails
        before any text (bad input, over budget, cloud down) gets its HTTP
        status; later failures can only be an SSE error event."""
        events = self.pipeline.stream(route, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                first = await anext(events)
        except BaseException:
            await _close(events)
            raise
        sse = self._sse(first, events, route.request_id, model, include_usage, deadline)
        return StreamingResponse(
            sse,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _sse(
        self,
        item: str | Restart | RouteResult,
        events: AsyncIterator[str | Restart | RouteResult],
        request_id: str,
        model: str,
        include_usage: bool,
        deadline: float,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **more: Any) -> str:
            return _frame(schema.chunk(request_id, model, created, delta, finish, **more))

        yield chunk({"role": "assistant", "content": ""}, **extra)
        try:
            while not isinstance(item, RouteResult):
                if isinstance(item, Restart):  # only with stream.early_edge_tokens
                    yield chunk({}, **extra, tidegate=schema.restart(item))
                elif item:
                    yield chunk({"content": item}, **extra)
                async with asyncio.timeout_at(deadline):
                    item = await anext(events)
            final = schema.provenance(item)
            yield chunk({}, schema.finish_reason(item), **extra, tidegate=final)
            if include_usage:
                yield chunk(None, usage=schema.usage(item))
        except Exception as exc:  # noqa: BLE001 - headers are gone: an error event it is
            error = self._http_error(self._past_deadline(exc, deadline))
            log.warning("stream %s failed after it started: %s", request_id, error.body)
            yield _frame(error.body)
        finally:
            await _close(events)
        yield _frame("[DONE]")

    # -- helpers -------------------------------------------------------------

    def _tenant(self, request: Request, requested: str = "") -> str:
        """The caller's tenant, by the same authenticator as gRPC (``router.auth``,
        read per request: a config reload replaces it): from the API key in
        ``Authorization: Bearer KEY`` when tenants are configured, else the
        tenant the body names. Raises Unauthenticated or PermissionDenied."""
        header = request.headers.get("authorization")
        metadata = [("authorization", header)] if header is not None else []
        return self.pipeline.auth.authenticate_metadata(metadata, requested).name

    def _model(self, profile: schema.Profile) -> dict[str, Any]:
        return {
            "id": profile.name,
            "object": "model",
            "created": self.created,
            "owned_by": "tidegate",
            "tidegate": {"route": profile.route, "description": profile.description},
        }

    @staticmethod
    def _request_id(request: Request) -> str:
        given = request.headers.get("x-request-id", "")
        return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    def _deadline(self, request: Request) -> float:
        timeout = self.request_timeout_s
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = -1.0
            if not 0.0 < asked < float("inf"):
                raise errors.BadRequest(
                    f"{TIMEOUT_HEADER} must be a positive number of seconds (got {raw!r})"
                )
            timeout = min(timeout, asked)
        return asyncio.get_running_loop().time() + timeout

    async def _body(self, request: Request) -> Any:
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body_bytes:
                raise errors.BadRequest(
                    f"the request body is over {self.max_body_bytes} bytes (http.max_body_bytes)"
                )
        try:
            body = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise errors.BadRequest(f"the request body is not valid JSON: {reason}") from exc
        try:
            # JSON may spell a lone UTF-16 surrogate ("\ud800"), which is no text at
            # all: it would fail later, wherever the text is encoded (a 500). Checked
            # only when the raw body escapes one (a pair is fine), not on every request.
            if _SURROGATE_ESCAPE.search(data):
                json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise errors.BadRequest(
                "the request body's text is not valid Unicode (a lone surrogate escape such "
                f"as \\ud800 at character {exc.start} of a string)"
            ) from exc
        return body

    def _past_deadline(self, exc: BaseException, deadline: float | None) -> BaseException:
        """Whatever failed once the deadline has passed failed because of it
        (a node cut off by its timeout reports UNAVAILABLE): 504, as gRPC would.
        The pipeline's node calls end ``policy.deadline_margin_s`` early. A refusal
        of the request itself (bad input, auth, budget, unknown model) stays what
        it is, however close the deadline: a retry with more time would fail too."""
        if deadline is None or isinstance(exc, _THE_REQUESTS_FAULT):
            return exc
        margin = self.pipeline.policy.deadline_margin_s
        if asyncio.get_running_loop().time() >= deadline - margin:
            if not isinstance(exc, DeadlineExceeded):
                return DeadlineExceeded(
                    "the request's deadline passed before an answer was ready "
                    f"(http.request_timeout_s or {TIMEOUT_HEADER}); last error: "
                    f"{str(exc) or type(exc).__name__}"
                )
        return exc

    @staticmethod
    def _http_error(exc: BaseException) -> errors.HttpError:
        if isinstance(exc, TidegateError):
            return errors.http_error(exc)
        log.exception("unexpected error while serving an HTTP request", exc_info=exc)
        # What went wrong inside stays in the log (paths, hosts, internals), which the
        # request id (x-tidegate-request-id) finds; the client learns it was not its fault.
        return errors.HttpError(
            500,
            errors.error_body(
                "internal error in the router: its log has the details under this "
                "request's x-tidegate-request-id",
                "server_error",
            ),
        )

    def _error(self, exc: BaseException, headers: dict[str, str] | None = None) -> Response:
        return self._send(self._http_error(exc), headers)

    @staticmethod
    def _send(error: errors.HttpError, headers: dict[str, str] | None = None) -> Response:
        return _json_response(error.body, error.status, {**(headers or {}), **error.headers})

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {
            404: f"no route {request.url.path}: see /v1/chat/completions, /v1/models, /health",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return self._send(
            errors.HttpError(exc.status_code, errors.error_body(message, "invalid_request_error")),
            dict(exc.headers or {}),  # a 405 names the methods that are allowed (Allow)
        )


# -- the server --------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the router process owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class HttpServer:
    """A running HTTP server; ``url`` is where clients point ``base_url`` (+ /v1)."""

    handlers: OpenAIHttp
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int
    scheme: str = "http"  # "https" with the router's tls.server

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` seconds."""
        self.handlers.stopping = True
        # uvicorn takes whole seconds, and logs an error for a zero timeout even
        # with nothing in flight: 0 means "do not wait" (force_exit) instead.
        self.server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self.server.force_exit = grace <= 0
        self.server.should_exit = True
        await self.task


def _bind(listen: str) -> socket.socket:
    host, port = split_address(listen)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # proto must say TCP: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets that do, and with Nagle on, a response written as headers
        # then body waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise ConfigError(
            f"http.listen {listen}: cannot listen there ({exc}); choose another port "
            "(0 picks a free one) or set http.enabled: false"
        ) from exc


async def serve_http(
    pipeline: Pipeline, settings: HttpSettings, tls: ServerTls | None = None
) -> HttpServer:
    """Serve the endpoint on ``settings.listen`` (port 0: any free port) on this loop.

    ``tls``: the router's ``tls.server``, so HTTP is as protected as gRPC:
    HTTPS with the same certificate, and with ``client_ca_file`` mutual TLS.
    """
    listen = settings.listen
    handlers = OpenAIHttp(pipeline, settings)
    sock = _bind(listen)
    config = uvicorn.Config(
        handlers.app(),
        lifespan="off",  # the router's own start/stop is the lifespan
        log_config=None,  # keep the process's logging as configured
        access_log=False,
        server_header=False,
        ssl_certfile=tls.cert_file if tls else None,
        ssl_keyfile=tls.key_file if tls else None,
        ssl_ca_certs=tls.client_ca_file if tls else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():  # failed during startup: surface its error
            sock.close()
            task.result()
            raise RuntimeError(f"the HTTP server on {listen} stopped during startup")
        await asyncio.sleep(0.005)
    host, port = sock.getsockname()[:2]
    running = HttpServer(handlers, server, task, host, port, "https" if tls else "http")
    log.info("OpenAI-compatible API on %s/v1", running.url)
    return running
