"""The router's API served by the edge agent, for applications on the device.

Applications call the edge process exactly as they would call a router
(``tidegate.v1.Router``: Generate, GenerateStream, Status). While the router
is reachable every request is forwarded to it, metadata (API key) and
deadline included, and its answer, provenance and errors come back unchanged:
the router decides (cache, edge, escalation, budgets). When the router cannot
be reached, the local model answers instead of failing: tier ``edge``, the
local confidence and estimator, the request's own threshold, and the flag
``offline``. Offline answers are not judged or escalated (there is nowhere to
escalate to) and never leave the device.

"Cannot be reached" means: the agent has lost the router (its last
register/heartbeat failed), no connection within ``register.connect_timeout_s``,
or a forwarded call failed with UNAVAILABLE while the connection was down. An
UNAVAILABLE the router itself sends (e.g. its cloud is down and its policy says
error) passes through: that is the router's decision, not an outage. A stream
the router cut after sending events ends with UNAVAILABLE, never with local
text appended.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from tidegate.backend import ConfidenceEstimator, Generation, ModelBackend
from tidegate.chat import GenerationRequest
from tidegate.errors import stream_errors, unary_errors
from tidegate.node_servicer import NodeLimits
from tidegate.node_servicer import request_from_pb as node_request_from_pb
from tidegate.server import Service
from tidegate.v1 import common_pb2, model_node_pb2, router_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from edge_node.agent import RegistrationAgent

OFFLINE = "offline"  # flag on answers the local model gave because the router was away
OFFLINE_POLICY = "edge-offline"  # policy_version of offline answers: no router policy applied
# Call metadata that belongs to this hop, not to the application's request.
HOP_METADATA = {"user-agent", "content-type", "te", "host"}


def forwarded_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """The application's metadata (e.g. ``authorization``) for the router."""
    return tuple(
        (m.key, m.value)
        for m in context.invocation_metadata() or ()
        if not m.key.startswith((":", "grpc-")) and m.key not in HOP_METADATA
    )


def local_request(request: router_pb2.GenerateRequest, limits: NodeLimits) -> GenerationRequest:
    """Validated like the edge node's own requests (INVALID_ARGUMENT otherwise)."""
    node_pb = model_node_pb2.NodeGenerateRequest(
        messages=request.messages,
        sampling=request.sampling,
        request_id=request.request_id or uuid.uuid4().hex,
    )
    return node_request_from_pb(node_pb, limits)


def offline_response(
    request: router_pb2.GenerateRequest,
    local: GenerationRequest,
    generation: Generation,
    confidence: float | None,
    estimator: str,
    started: float,
    edge_ms: float,
) -> router_pb2.GenerateResponse:
    total_ms = (time.perf_counter() - started) * 1000.0
    return router_pb2.GenerateResponse(
        text=generation.text,
        tier=router_pb2.TIER_EDGE,
        confidence=0.0 if confidence is None else confidence,
        estimator=estimator,
        threshold=request.min_confidence if request.HasField("min_confidence") else 0.0,
        escalation_code=router_pb2.ESCALATION_CODE_NONE,
        usage=common_pb2.Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
        ),
        timings=router_pb2.Timings(
            total_ms=total_ms, edge_ms=edge_ms, router_overhead_ms=max(0.0, total_ms - edge_ms)
        ),
        finish_reason=generation.finish_reason.value,
        model=generation.model,
        request_id=local.request_id,
        policy_version=OFFLINE_POLICY,
        flags=[OFFLINE],
    )


class EdgeFacade(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        backend: ModelBackend,
        estimator: ConfidenceEstimator | None,
        limits: NodeLimits,
        channel: grpc.aio.Channel,
        agent: RegistrationAgent,
    ) -> None:
        self.backend = backend
        self.estimator = estimator
        self.limits = limits
        self.channel = channel
        self.agent = agent
        self.router = router_pb2_grpc.RouterStub(channel)

    # -- is the router there? ---------------------------------------------------

    async def _router_ready(self) -> bool:
        if not self.agent.state.reachable:
            return False
        if self.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(
                self.channel.channel_ready(), self.agent.settings.connect_timeout_s
            )
        except TimeoutError:
            self.agent.lost(
                f"no connection within register.connect_timeout_s "
                f"({self.agent.settings.connect_timeout_s}s)"
            )
            return False
        return True

    def _router_went_away(self, exc: grpc.aio.AioRpcError) -> bool:
        """True when the call failed because the router is unreachable (answer
        offline); False when the router itself answered with an error."""
        if exc.code() is not grpc.StatusCode.UNAVAILABLE:
            return False
        if self.channel.get_state() is grpc.ChannelConnectivity.READY:
            return False
        self.agent.lost(f"{exc.code().name}: {exc.details()}")
        return True

    # -- the local model ----------------------------------------------------------

    async def _score(self, local: GenerationRequest, generation: Generation) -> float | None:
        if self.estimator is None:
            return None
        return await self.estimator.score(local, generation)

    async def _answer_offline(
        self, request: router_pb2.GenerateRequest
    ) -> router_pb2.GenerateResponse:
        started = time.perf_counter()
        local = local_request(request, self.limits)
        generation = await self.backend.generate(local)
        edge_ms = (time.perf_counter() - started) * 1000.0
        confidence = await self._score(local, generation)
        name = self.estimator.name if self.estimator else ""
        return offline_response(request, local, generation, confidence, name, started, edge_ms)

    async def _stream_offline(
        self, request: router_pb2.GenerateRequest
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        # No escalation is possible offline, so the local text is final: stream it live.
        started = time.perf_counter()
        local = local_request(request, self.limits)
        async for item in self.backend.stream(local):
            if isinstance(item, Generation):
                edge_ms = (time.perf_counter() - started) * 1000.0
                confidence = await self._score(local, item)
                name = self.estimator.name if self.estimator else ""
                response = offline_response(
                    request, local, item, confidence, name, started, edge_ms
                )
                yield router_pb2.GenerateEvent(response=response)
            elif item:
                yield router_pb2.GenerateEvent(delta=item)

    # -- the Router API -------------------------------------------------------------

    @unary_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GenerateResponse:
        if await self._router_ready():
            try:
                return await self.router.Generate(
                    request,
                    timeout=context.time_remaining(),
                    metadata=forwarded_metadata(context),
                )
            except grpc.aio.AioRpcError as exc:
                if not self._router_went_away(exc):
                    await context.abort(exc.code(), exc.details() or "")
        return await self._answer_offline(request)

    @stream_errors
    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateEvent]:
        if await self._router_ready():
            sent = False
            call = self.router.GenerateStream(
                request, timeout=context.time_remaining(), metadata=forwarded_metadata(context)
            )
            try:
                async for event in call:
                    sent = True
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                if sent or not self._router_went_away(exc):
                    await context.abort(exc.code(), exc.details() or "")
            finally:
                call.cancel()  # no-op when finished; stops the router when the app left
        async for event in self._stream_offline(request):
            yield event

    @unary_errors
    async def Status(
        self, request: router_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.StatusResponse:
        """This agent's view: its own edge and the router it talks to."""
        state, meter = self.agent.state, self.agent
        capacity = meter.settings.capacity
        in_flight = getattr(self.backend, "in_flight", 0)
        return router_pb2.StatusResponse(
            nodes=[
                router_pb2.NodeStatus(
                    name=meter.name,
                    address=meter.advertise,
                    tier="edge",
                    healthy=True,
                    model=self.backend.info.model,
                    registered=state.registered,
                    capacity=capacity,
                    load=in_flight / capacity,
                ),
                router_pb2.NodeStatus(
                    name="router",
                    address=meter.settings.router,
                    tier="router",
                    healthy=state.reachable,
                    last_error=state.last_error,
                ),
            ],
            policy_version=OFFLINE_POLICY if not state.reachable else "",
        )

    def service(self) -> Service:
        return Service(
            add_to_server=router_pb2_grpc.add_RouterServicer_to_server,
            servicer=self,
            name=router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        )
