"""Errors that carry a gRPC status code, and the glue that turns them into one.

Domain code raises these; servicers never build status codes by hand.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


OUT_OF_MEMORY_ADVICE = (
    "out of memory while serving the request; retry with a shorter conversation or "
    "fewer new tokens, or give the node more memory (or fewer concurrent requests)"
)
# What torch's allocators say when they fail: the CPU one raises a plain
# RuntimeError ("DefaultCPUAllocator: can't allocate memory: ..."), the CUDA one
# torch.OutOfMemoryError ("CUDA out of memory. Tried to allocate ..."), also a
# RuntimeError. Matched by name and text so this module needs no torch.
_TORCH_OOM_TEXT = ("can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError or torch's allocator failing (on CPU or GPU)."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or any(t in text for t in _TORCH_OOM_TEXT)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TidegateError):
        return exc.code, str(exc)
    if is_out_of_memory(exc):
        # Not a bug to report, but an operator may want to size the node: say what failed.
        log.warning("out of memory while serving a request: %s: %.300s", type(exc).__name__, exc)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, OUT_OF_MEMORY_ADVICE
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


def tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a request parser that never raises: bad bytes become InvalidPayload."""
    deserialize = getattr(handler, "request_deserializer", None)
    if deserialize is None:
        return handler

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
            return InvalidPayload(str(exc) or type(exc).__name__)

    return handler._replace(request_deserializer=tolerant)  # type: ignore[attr-defined]


class _TolerantGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        return tolerant_handler(handler) if handler is not None else None


class PayloadGuard:
    """Lets servicers answer unparsable requests with INVALID_ARGUMENT, not INTERNAL.

    Pass it to a generated ``add_*_to_server`` in place of the server: it wraps
    each method's request parser once, at registration. (A server interceptor
    did the same per call, at a measurable cost in requests/s.)
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: tolerant_handler(h) for name, h in method_handlers.items()}
        )
