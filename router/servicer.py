"""The Router gRPC servicer: protobuf ↔ domain, nothing else.

Errors raised by the pipeline carry their gRPC status (tidegate.errors); the
``unary_errors``/``stream_errors`` decorators turn them into one, and the
server's PayloadGuard turns non-UTF-8 payloads into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from router.domain import CacheControl, Restart, RouteRequest, RouteResult
from router.pipeline import Pipeline
from router.status import RouterStatus
from tidegate.chat import ChatMessage, SamplingParams
from tidegate.errors import InvalidArgument, stream_errors, unary_errors
from tidegate.server import Service
from tidegate.v1 import common_pb2, router_pb2, router_pb2_grpc


def cache_control_from_pb(value: int) -> CacheControl:
    try:
        return CacheControl(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown cache_control {value}: use DEFAULT (0), BYPASS (1) or REFRESH (2)"
        ) from None


def request_from_pb(pb: router_pb2.GenerateRequest) -> RouteRequest:
    return RouteRequest(
        messages=tuple(ChatMessage.from_pb(m) for m in pb.messages),
        sampling=SamplingParams.from_pb(pb.sampling),
        tenant=pb.tenant,
        tags=tuple(pb.tags),
        min_confidence=pb.min_confidence if pb.HasField("min_confidence") else None,
        request_id=pb.request_id,
        cache_control=cache_control_from_pb(pb.cache_control),
    )


def result_to_pb(result: RouteResult) -> router_pb2.GenerateResponse:
    t = result.timings
    return router_pb2.GenerateResponse(
        text=result.text,
        tier=result.tier.value,
        source_tier=(
            result.source_tier.value if result.source_tier else router_pb2.TIER_UNSPECIFIED
        ),
        confidence=result.confidence,
        estimator=result.estimator,
        threshold=result.threshold,
        escalation_code=result.escalation.value,
        escalation_reason=result.escalation_reason,
        usage=common_pb2.Usage(
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
        ),
        timings=router_pb2.Timings(
            total_ms=t.total_ms,
            edge_ms=t.edge_ms,
            cloud_ms=t.cloud_ms,
            router_overhead_ms=t.router_overhead_ms,
        ),
        finish_reason=(
            result.finish_reason.value
            if result.finish_reason
            else common_pb2.FINISH_REASON_UNSPECIFIED
        ),
        model=result.model,
        request_id=result.request_id,
        policy_version=result.policy_version,
        flags=list(result.flags),
    )


def status_to_pb(status: RouterStatus) -> router_pb2.StatusResponse:
    return router_pb2.StatusResponse(
        nodes=[
            router_pb2.NodeStatus(
                name=n.name,
                address=n.address,
                tier=n.tier,
                healthy=n.healthy,
                model=n.model,
                last_error=n.last_error,
                registered=n.registered,
                capacity=n.capacity,
                load=n.load,
                heartbeat_age_s=n.heartbeat_age_s,
                consecutive_failures=n.consecutive_failures,
                cooldown_remaining_s=n.cooldown_remaining_s,
                breaker=n.breaker,
                expected_latency_ms=n.expected_latency_ms,
            )
            for n in status.nodes
        ],
        cache_entries=status.cache_entries,
        cache_hits=status.cache_hits,
        cache_misses=status.cache_misses,
        policy_version=status.policy_version,
        cache_semantic_hits=status.cache_semantic_hits,
        cache_shared=status.cache_shared,
        budgets=[
            router_pb2.BudgetStatus(
                tenant=b.tenant, window=b.window, unit=b.unit, limit=b.limit, remaining=b.remaining
            )
            for b in status.budgets
        ],
        last_reload_error=status.last_reload_error,
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the event loop's clock (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def _request(
        self, pb: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> RouteRequest:
        """The domain request, its tenant established by the API key in the
        ``authorization: Bearer`` metadata when tenants are configured
        (``router.auth``: UNAUTHENTICATED without a valid key)."""
        request = request_from_pb(pb)
        tenant = self.pipeline.auth.authenticate_metadata(
            context.invocation_metadata(), request.tenant
        )
        return replace(request, tenant=tenant.name)

    @unary_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GenerateResponse:
        result = await self.pipeline.generate(self._request(request, context), _deadline(context))
        return result_to_pb(result)

    @stream_errors
    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        route_request = self._request(request, context)
        async for item in self.pipeline.stream(route_request, _deadline(context)):
            if isinstance(item, RouteResult):
                yield router_pb2.GenerateEvent(response=result_to_pb(item))
            elif isinstance(item, Restart):
                restart = router_pb2.Restart(
                    escalation_code=item.escalation.value, reason=item.reason
                )
                yield router_pb2.GenerateEvent(restart=restart)
            elif item:
                yield router_pb2.GenerateEvent(delta=item)

    @unary_errors
    async def Status(
        self, request: router_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.StatusResponse:
        auth = self.pipeline.auth
        tenant = auth.authenticate_metadata(context.invocation_metadata()) if auth.enabled else None
        return status_to_pb(await self.pipeline.status(tenant))

    async def close(self) -> None:
        await self.pipeline.close()

    def service(self) -> Service:
        return Service(
            add_to_server=router_pb2_grpc.add_RouterServicer_to_server,
            servicer=self,
            name=router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        )
