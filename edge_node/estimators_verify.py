"""Self-verification (AutoMix, Madaan et al. 2023): the edge model judges its own answer.

The model is shown the question and its answer and asked whether the answer is
correct; the score is P(yes) / (P(yes) + P(no)) read from its next-token
distribution (both capitalisations summed). Cost: one extra forward pass over
a prompt about twice the question's length, no decoding (``extra_cost``). The
backend must offer ``next_token_logprobs`` (``TransformersBackend`` does;
remote OpenAI-compatible backends don't).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tidegate.backend import Generation
from tidegate.chat import ChatMessage, GenerationRequest

PROMPT = (
    "Question: {question}\n"
    "Proposed answer: {answer}\n"
    "Is the proposed answer correct? Answer yes or no."
)
YES = ("Yes", "yes")
NO = ("No", "no")


@runtime_checkable
class NextTokenScorer(Protocol):
    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], candidates: Sequence[str]
    ) -> dict[str, float]: ...


def verification_messages(request: GenerationRequest, answer: str) -> tuple[ChatMessage, ...]:
    """The conversation so far, its last question and the answer, as one yes/no question."""
    *earlier, last = request.messages
    system = tuple(m for m in earlier if m.role == "system")
    text = PROMPT.format(question=last.content.strip(), answer=answer.strip())
    return (*system, ChatMessage("user", text))


class SelfVerifyEstimator:
    """P(yes) that the edge's answer is correct, by the edge model itself."""

    name = "self_verify"
    extra_cost = "1 extra forward pass (prompt only)"

    def __init__(self, backend: object) -> None:
        if not isinstance(backend, NextTokenScorer):
            raise ValueError(
                f"self_verify needs a backend with next-token log-probs; {type(backend).__name__} "
                "has none (use a local transformers model, or another estimator)"
            )
        self.backend = backend

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.text.strip():
            return 0.0
        messages = verification_messages(request, generation.text)
        logprobs = await self.backend.next_token_logprobs(messages, YES + NO)
        yes = sum(math.exp(logprobs[c]) for c in YES)
        no = sum(math.exp(logprobs[c]) for c in NO)
        return yes / (yes + no) if yes + no > 0 else 0.5
