"""Errors that carry a gRPC status code, and the glue that turns them into one.

Domain code raises these; servicers never build status codes by hand.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class TidegateError(Exception):
    """Base error: ``code`` is what the client sees, ``str(self)`` the message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(TidegateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(TidegateError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TidegateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(TidegateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(TidegateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(TidegateError):
    code = grpc.StatusCode.NOT_FOUND


class ConfigError(Exception):
    """A configuration file or value is invalid; the message names the field."""


class InvalidPayload:
    """Stands in for a request whose bytes could not be parsed (e.g. non-UTF-8 text).

    gRPC would answer such a request with INTERNAL; ``PayloadGuard`` substitutes
    this object so the servicer can answer INVALID_ARGUMENT instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TidegateError):
        return exc.code, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory while serving the request"
    log.exception("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _check_payload(request: Any) -> None:
    if isinstance(request, InvalidPayload):
        raise InvalidArgument(
            f"the request could not be parsed ({request.reason}); "
            "all text fields must be valid UTF-8"
        )


S = TypeVar("S")
R = TypeVar("R")


def unary_errors(
    method: Callable[[S, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[S, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Map exceptions raised by a unary servicer method to a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            _check_payload(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = _status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


def stream_errors(
    method: Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[R]],
) -> Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[R]]:
    """Map exceptions raised by a server-streaming servicer method to a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[R]:
        try:
            _check_payload(request)
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = _status_for(exc)
            await context.abort(code, message)

    return wrapper


class PayloadGuard(grpc.aio.ServerInterceptor):
    """Lets servicers answer unparsable requests with INVALID_ARGUMENT, not INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        deserialize = getattr(handler, "request_deserializer", None)
        if deserialize is None:
            return handler

        def tolerant(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
                return InvalidPayload(str(exc) or type(exc).__name__)

        return handler._replace(request_deserializer=tolerant)  # type: ignore[attr-defined]
