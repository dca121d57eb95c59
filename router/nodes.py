"""Async gRPC clients for the model nodes (edge and cloud) the router calls.

One grpc.aio channel per target, opened on first use (so a client can be built
outside an event loop). Every call gets timeout = min(target timeout, what is
left of the client's deadline). gRPC errors become two domain errors the
pipeline acts on:

* ``NodeRejected``: the node answered INVALID_ARGUMENT (the request does not
  fit this node, e.g. a prompt over its context);
* ``NodeUnavailable``: anything else (unreachable, timed out, crashed, cut
  stream) — the node could not answer.

Each client keeps a small health record for the Status RPC, a circuit breaker
(``router.breaker``: while it is open, calls fail at once with
``NodeCoolingDown`` and the node is not contacted) and a moving average of its
latency (``router.latency``). Channels use TLS when the router's
``tls.nodes`` is set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from router.breaker import CircuitBreaker
from router.domain import NodeAnswer
from router.latency import LatencyEstimate
from tidegate.chat import ChatMessage, FinishReason, SamplingParams
from tidegate.errors import DeadlineExceeded
from tidegate.server import MAX_MESSAGE_BYTES
from tidegate.tls import ClientTls, open_channel
from tidegate.v1 import model_node_pb2, model_node_pb2_grpc

PROBE_TIMEOUT_S = 3.0  # Status probes run in parallel: Status waits at most this long


class NodeError(Exception):
    def __init__(self, node: NodeClient, detail: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{node.tier} node {node.name} at {node.address}: {detail}")
        self.node = node
        self.detail = detail
        self.code = code  # the gRPC status the node answered, when it answered one

    @property
    def timed_out(self) -> bool:
        return self.code is grpc.StatusCode.DEADLINE_EXCEEDED


class NodeUnavailable(NodeError):
    """The node could not answer: unreachable, too slow, failed, or cut a stream."""


class NodeRejected(NodeError):
    """The node refused the request as invalid (INVALID_ARGUMENT)."""


class NodeCoolingDown(NodeUnavailable):
    """Not asked: the node's circuit breaker is open (it kept failing)."""


@dataclass
class NodeHealth:
    """What Status reports about a node: the outcome of the last call or probe."""

    healthy: bool = True  # optimistic until a call fails: nothing is known yet
    model: str = ""
    last_error: str = ""
    last_ok: float | None = None  # wall-clock time of the last success
    consecutive_failures: int = 0

    def ok(self) -> None:
        self.healthy = True
        self.last_ok = time.time()
        self.consecutive_failures = 0

    def failed(self, detail: str) -> None:
        self.healthy = False
        self.last_error = detail
        self.consecutive_failures += 1


def _finish_reason(value: int) -> FinishReason | None:
    try:
        return FinishReason(value)
    except ValueError:  # FINISH_REASON_UNSPECIFIED or a newer value
        return None


def _score(value: float) -> float | None:
    """A node's confidence, if it is one: NaN or a number outside [0, 1] (a faulty
    or foreign node) counts as no score, which the policy escalates."""
    return value if 0.0 <= value <= 1.0 else None


def _answer_from_pb(pb: model_node_pb2.NodeGenerateResponse, node: str) -> NodeAnswer:
    has_confidence = pb.HasField("confidence")
    return NodeAnswer(
        text=pb.text,
        finish_reason=_finish_reason(pb.finish_reason),
        prompt_tokens=pb.usage.prompt_tokens,
        completion_tokens=pb.usage.completion_tokens,
        model=pb.model,
        node=node,
        confidence=_score(pb.confidence.score) if has_confidence else None,
        estimator=pb.confidence.estimator if has_confidence else "",
    )


def node_request(
    messages: tuple[ChatMessage, ...], sampling: SamplingParams, request_id: str
) -> model_node_pb2.NodeGenerateRequest:
    return model_node_pb2.NodeGenerateRequest(
        messages=[m.to_pb() for m in messages],
        sampling=sampling.to_pb(),
        request_id=request_id,
    )


class NodeClient:
    """A client for one configured ModelNode target."""

    def __init__(
        self,
        name: str,
        address: str,
        tier: str,
        timeout_s: float,
        tls: ClientTls | None = None,
        expected_latency_s: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.tier = tier  # "edge" | "cloud"
        self.timeout_s = timeout_s
        self.tls = tls
        self.health = NodeHealth()
        self.breaker = breaker or CircuitBreaker()
        self.latency = LatencyEstimate(expected_latency_s)
        # Least-loaded edge selection (router.directory): this router's calls in
        # flight, and for registered edges what their last heartbeat reported.
        self.in_flight = 0
        self.capacity = 1  # concurrent requests it serves well; config nodes: 1
        self.reported_load = 0  # in-flight + queued at the node, last heartbeat
        self.heartbeat_at: float | None = None  # wall clock; None: from the config file
        self._channel: grpc.aio.Channel | None = None
        self._stub: model_node_pb2_grpc.ModelNodeStub | None = None

    @property
    def registered(self) -> bool:
        """Announced itself through the edge registry (not listed in the config)."""
        return self.heartbeat_at is not None

    def load(self) -> float:
        """(reported + own in-flight) / capacity: lower is asked first."""
        return (self.reported_load + self.in_flight) / self.capacity

    def _get_stub(self) -> model_node_pb2_grpc.ModelNodeStub:
        if self._stub is None:
            self._channel = open_channel(
                self.address,
                self.tls,
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ],
                field="tls.nodes",
            )
            self._stub = model_node_pb2_grpc.ModelNodeStub(self._channel)
        return self._stub

    def _timeout(self, deadline: float | None) -> float:
        """min(target timeout, time left before ``deadline`` on the loop clock)."""
        if deadline is None:
            return self.timeout_s
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise DeadlineExceeded(
                f"the client's deadline passed before the {self.tier} node {self.name} "
                "could be asked"
            )
        return min(self.timeout_s, left)

    def _check_breaker(self) -> None:
        if not self.breaker.allow():
            snap = self.breaker.snapshot()
            raise NodeCoolingDown(
                self,
                f"cooling down after {snap.consecutive_failures} consecutive failures "
                f"(last: {snap.last_error}); next try in {snap.cooldown_remaining_s:.1f} s",
            )

    def _error(self, exc: grpc.aio.AioRpcError, timeout: float | None = None) -> NodeError:
        detail = f"{exc.code().name}: {exc.details()}"
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
            # The node is up and answering; it just won't take this request.
            self.health.ok()
            self.breaker.record_success()
            return NodeRejected(self, exc.details() or "invalid argument", exc.code())
        self.health.failed(detail)
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            self.latency.observe_at_least(timeout)
            if timeout < self.timeout_s:
                # Cut short by the client's deadline, not by the node's own limit:
                # no evidence that the node is failing.
                return NodeUnavailable(self, detail, exc.code())
        self.breaker.record_failure(detail)
        return NodeUnavailable(self, detail, exc.code())

    async def generate(
        self, request: model_node_pb2.NodeGenerateRequest, deadline: float | None
    ) -> NodeAnswer:
        timeout = self._timeout(deadline)
        self._check_breaker()
        self.in_flight += 1
        started = time.perf_counter()
        try:
            response = await self._get_stub().Generate(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from exc
        finally:
            self.in_flight -= 1
        self.latency.observe(time.perf_counter() - started)
        self.breaker.record_success()
        self.health.ok()
        self.health.model = response.model or self.health.model
        return _answer_from_pb(response, self.name)

    async def stream(
        self, request: model_node_pb2.NodeGenerateRequest, deadline: float | None
    ) -> AsyncIterator[str | NodeAnswer]:
        """Text deltas, then the final NodeAnswer. A stream that ends without
        its final chunk raises NodeUnavailable (it was cut)."""
        timeout = self._timeout(deadline)
        self._check_breaker()
        call = self._get_stub().GenerateStream(request, timeout=timeout)
        self.in_flight += 1
        try:
            async for chunk in call:
                if chunk.HasField("response"):
                    self.breaker.record_success()
                    self.health.ok()
                    self.health.model = chunk.response.model or self.health.model
                    yield _answer_from_pb(chunk.response, self.name)
                    return
                if chunk.delta:
                    yield chunk.delta
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from exc
        finally:
            self.in_flight -= 1
            call.cancel()  # no-op when finished; stops the node when we stop early
        detail = "the stream ended without its final response"
        self.health.failed(detail)
        self.breaker.record_failure(detail)
        raise NodeUnavailable(self, detail)

    async def probe(self) -> NodeHealth:
        """Refresh the health record with a quick Info call (for Status)."""
        try:
            info = await self._get_stub().Info(
                model_node_pb2.NodeInfoRequest(), timeout=min(PROBE_TIMEOUT_S, self.timeout_s)
            )
        except grpc.aio.AioRpcError as exc:
            self.health.failed(f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError in a call whose channel was closed under it:
            # the edge directory retires a node that left, maybe mid-probe. Only a
            # cancellation of this task itself is ours to pass on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self.health.failed("CANCELLED: the channel closed during the probe (the node left)")
        else:
            self.health.ok()
            self.health.model = info.model
        return self.health

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
