"""OpenAI-style errors: a gRPC status (tidegate.errors) → an HTTP status and a
body ``{"error": {"message", "type", "param", "code"}}``, the shape OpenAI's
clients parse into their exception classes (BadRequestError, RateLimitError…).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from router.budgets import BudgetExceeded
from tidegate.errors import InvalidArgument, TidegateError


class BadRequest(InvalidArgument):
    """An INVALID_ARGUMENT that knows which request field it is about."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# gRPC status → (HTTP status, OpenAI error type, OpenAI error code)
HTTP_FOR_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "requests", "resource_exhausted"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(exc: TidegateError) -> HttpError:
    status, type_, code = HTTP_FOR_STATUS.get(exc.code, (500, "server_error", None))
    headers: dict[str, str] = {}
    if isinstance(exc, BudgetExceeded):
        # OpenAI's rate-limit shape: clients back off by Retry-After; a window
        # longer than a minute (the daily budget) is not worth retrying.
        window = exc.window
        type_, code = ("requests" if window.unit == "requests" else "tokens"), "rate_limit_exceeded"
        # Windows are calendar-aligned on the router's clock (router.budgets).
        headers["retry-after"] = str(
            max(1, math.ceil(window.seconds - time.time() % window.seconds))
        )
        if window.seconds > 60 or exc.needed > exc.limit:
            # Nor is a request that costs more than the whole window allows.
            headers["x-should-retry"] = "false"
    param = exc.param if isinstance(exc, BadRequest) else None
    return HttpError(status, error_body(str(exc), type_, code, param), headers)


def model_not_found(model: str, profiles: Iterable[str]) -> HttpError:
    names = ", ".join(profiles)
    return HttpError(
        404,
        error_body(
            f"The model `{model}` does not exist: tidegate serves the routing profiles {names}",
            "invalid_request_error",
            "model_not_found",
            "model",
        ),
    )
