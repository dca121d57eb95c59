"""The ModelNode gRPC servicer: one thin adapter over a ModelBackend.

Edge and cloud nodes both serve it; an edge node also has a confidence
estimator, whose score travels with every answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from tidegate.backend import ConfidenceEstimator, Generation, ModelBackend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.errors import stream_errors, unary_errors
from tidegate.server import Service
from tidegate.v1 import common_pb2, model_node_pb2, model_node_pb2_grpc


@dataclass(frozen=True)
class NodeLimits:
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096


def request_from_pb(
    pb: model_node_pb2.NodeGenerateRequest, limits: NodeLimits
) -> GenerationRequest:
    request = GenerationRequest(
        messages=tuple(ChatMessage.from_pb(m) for m in pb.messages),
        sampling=SamplingParams.from_pb(pb.sampling),
        request_id=pb.request_id,
    )
    request.validate(limits.max_new_tokens_limit)
    sampling = request.sampling.with_default_max_new_tokens(limits.default_max_new_tokens)
    return GenerationRequest(request.messages, sampling, request.request_id)


def response_to_pb(
    generation: Generation,
    confidence: common_pb2.Confidence | None,
    return_tokens: bool,
) -> model_node_pb2.NodeGenerateResponse:
    pb = model_node_pb2.NodeGenerateResponse(
        text=generation.text,
        finish_reason=generation.finish_reason.value,
        usage=common_pb2.Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
        ),
        model=generation.model,
        generation_ms=generation.generation_ms,
        queue_ms=generation.queue_ms,
    )
    if confidence is not None:
        pb.confidence.CopyFrom(confidence)
    if return_tokens:
        # Remote backends may know each token's text and log-prob but not its id.
        count = len(generation.logprobs)
        ids = generation.token_ids or [0] * count
        entropies = generation.entropies or [0.0] * count
        texts = generation.token_texts or [""] * count
        pb.tokens.extend(
            common_pb2.TokenInfo(id=i, text=t, logprob=lp, entropy=h)
            for i, t, lp, h in zip(ids, texts, generation.logprobs, entropies, strict=True)
        )
    return pb


class ModelNodeServicer(model_node_pb2_grpc.ModelNodeServicer):
    def __init__(
        self,
        backend: ModelBackend,
        role: str,
        estimator: ConfidenceEstimator | None = None,
        limits: NodeLimits | None = None,
    ) -> None:
        self.backend = backend
        self.role = role
        self.estimator = estimator
        self.limits = limits or NodeLimits()

    async def _confidence(
        self, request: GenerationRequest, generation: Generation
    ) -> common_pb2.Confidence | None:
        if self.estimator is None:
            return None
        score = await self.estimator.score(request, generation)
        name = self.estimator.name
        return common_pb2.Confidence(score=score, estimator=name, scores={name: score})

    @unary_errors
    async def Generate(
        self, request: model_node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> model_node_pb2.NodeGenerateResponse:
        domain = request_from_pb(request, self.limits)
        generation = await self.backend.generate(domain)
        confidence = await self._confidence(domain, generation)
        return response_to_pb(generation, confidence, request.return_tokens)

    @stream_errors
    async def GenerateStream(
        self, request: model_node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_node_pb2.NodeGenerateChunk]:
        domain = request_from_pb(request, self.limits)
        async for item in self.backend.stream(domain):
            if isinstance(item, Generation):
                confidence = await self._confidence(domain, item)
                final = response_to_pb(item, confidence, request.return_tokens)
                yield model_node_pb2.NodeGenerateChunk(response=final)
            elif item:
                yield model_node_pb2.NodeGenerateChunk(delta=item)

    @unary_errors
    async def Info(
        self, request: model_node_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> model_node_pb2.NodeInfo:
        info = self.backend.info
        return model_node_pb2.NodeInfo(
            role=self.role,
            model=info.model,
            context_length=info.context_length,
            quantization=info.quantization,
            estimator=self.estimator.name if self.estimator else "",
            backend=info.backend,
        )

    def service(self) -> Service:
        return Service(
            add_to_server=model_node_pb2_grpc.add_ModelNodeServicer_to_server,
            servicer=self,
            name=model_node_pb2.DESCRIPTOR.services_by_name["ModelNode"].full_name,
        )
