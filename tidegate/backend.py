"""The inference interfaces shared by edge and cloud nodes.

``ModelBackend`` is what a node serves (a transformers model, an OpenAI-compatible
server); ``ConfidenceEstimator`` turns a generation into a score in [0, 1].
``Generation`` is what the estimators read: per-token log-probabilities, and
entropies where the backend has the full next-token distribution.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tidegate.chat import FinishReason, GenerationRequest


@dataclass(frozen=True)
class BackendInfo:
    model: str  # the model's identity: part of every cache key
    context_length: int  # prompt + new tokens
    quantization: str  # "none" | "int8" | "bf16" | … or "remote"
    backend: str  # "transformers" | "openai"


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) of each generated token, natural log
    entropies: list[float] | None  # nats; None when the backend has no full distribution
    finish_reason: FinishReason
    prompt_tokens: int
    model: str
    generation_ms: float = 0.0
    queue_ms: float = 0.0
    token_texts: list[str] = field(default_factory=list)
    # The serving engine's own count, for remote backends that report usage but
    # not token ids (OpenAI-compatible servers); None: count ``token_ids``.
    reported_completion_tokens: int | None = None
    # The model's final hidden state at the prompt's last position (the state the first
    # answer token is read from), for the combiner's probe; None where the backend
    # has no hidden states (remote servers).
    prompt_state: list[float] | None = None
    # The final hidden state the last generated token (eos, the end of a stop string,
    # or the token limit's) was read from: what the model makes of the answer it has
    # just given, for the combiner's second probe; None as for ``prompt_state``.
    answer_state: list[float] | None = None

    @property
    def completion_tokens(self) -> int:
        if self.reported_completion_tokens is not None:
            return self.reported_completion_tokens
        return len(self.token_ids)


@runtime_checkable
class ModelBackend(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate a whole answer. Raises tidegate.errors.* for bad input."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        """Yield text deltas as they are decoded, then the final Generation."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ConfidenceEstimator(Protocol):
    name: str
    # What the estimator costs on top of one generation, for operators:
    # "none" for single-pass estimators that read the generation's own signals.
    extra_cost: str

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        """P(the answer is good enough to keep), in [0, 1]."""
        ...
