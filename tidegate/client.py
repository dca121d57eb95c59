"""A small async client for the router: what `tidegate ask` and the demo use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from tidegate.chat import ChatMessage, SamplingParams
from tidegate.tls import ClientTls, open_channel
from tidegate.v1 import router_pb2, router_pb2_grpc

TIER_NAMES = {
    router_pb2.TIER_UNSPECIFIED: "unspecified",
    router_pb2.TIER_EDGE: "edge",
    router_pb2.TIER_CLOUD: "cloud",
    router_pb2.TIER_CACHE: "cache",
}
ESCALATION_NAMES = {
    value: name.removeprefix("ESCALATION_CODE_").lower()
    for name, value in router_pb2.EscalationCode.items()
}
FINISH_NAMES = {0: "unspecified", 1: "stop", 2: "length", 3: "stop_sequence"}


def build_request(
    question: str,
    *,
    system: str | None = None,
    min_confidence: float | None = None,
    sampling: SamplingParams | None = None,
    tenant: str = "",
    tags: Sequence[str] = (),
    cache_control: int = router_pb2.CACHE_CONTROL_DEFAULT,
) -> router_pb2.GenerateRequest:
    messages = [ChatMessage("system", system)] if system else []
    messages.append(ChatMessage("user", question))
    request = router_pb2.GenerateRequest(
        messages=[m.to_pb() for m in messages],
        sampling=(sampling or SamplingParams()).to_pb(),
        tenant=tenant,
        tags=list(tags),
        request_id=uuid.uuid4().hex,
        cache_control=cache_control,  # type: ignore[arg-type]
    )
    if min_confidence is not None:
        request.min_confidence = min_confidence
    return request


def response_to_dict(response: router_pb2.GenerateResponse) -> dict[str, Any]:
    """The JSON shape `tidegate ask --json` prints."""
    t = response.timings
    return {
        "text": response.text,
        "tier": TIER_NAMES[response.tier],
        "source_tier": TIER_NAMES[response.source_tier] if response.source_tier else None,
        "confidence": round(response.confidence, 6),
        "estimator": response.estimator,
        "threshold": round(response.threshold, 6),
        "escalation_code": ESCALATION_NAMES.get(response.escalation_code, "unknown"),
        "escalation_reason": response.escalation_reason,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
        },
        "timings_ms": {
            "total": round(t.total_ms, 3),
            "edge": round(t.edge_ms, 3),
            "cloud": round(t.cloud_ms, 3),
            "router_overhead": round(t.router_overhead_ms, 3),
        },
        "finish_reason": FINISH_NAMES.get(response.finish_reason, "unspecified"),
        "model": response.model,
        "request_id": response.request_id,
        "policy_version": response.policy_version,
        "flags": list(response.flags),
    }


@dataclass
class RouterClient:
    """``api_key``: sent as ``authorization: Bearer <key>`` on every call (for
    routers with tenants); ``tls``: connect over TLS (mutual TLS with a client
    certificate), plaintext when None."""

    address: str
    timeout_s: float = 300.0
    api_key: str | None = None
    tls: ClientTls | None = None

    async def __aenter__(self) -> RouterClient:
        self._channel = open_channel(self.address, self.tls)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = auth_metadata(self.api_key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def generate(self, request: router_pb2.GenerateRequest) -> router_pb2.GenerateResponse:
        return await self._stub.Generate(request, timeout=self.timeout_s, metadata=self._metadata)

    async def stream(
        self, request: router_pb2.GenerateRequest
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        call = self._stub.GenerateStream(request, timeout=self.timeout_s, metadata=self._metadata)
        async for event in call:
            yield event

    async def status(self) -> router_pb2.StatusResponse:
        return await self._stub.Status(
            router_pb2.StatusRequest(), timeout=self.timeout_s, metadata=self._metadata
        )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying an API key (empty without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
