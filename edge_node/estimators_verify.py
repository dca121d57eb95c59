"""Self-verification (AutoMix, Madaan et al. 2023): the edge model judges its own answer.

The model is shown the question and its answer and asked whether the answer is
correct; the score is P(yes) / (P(yes) + P(no)) read from its next-token
distribution (both capitalisations summed). Cost: one extra forward pass over
a prompt about twice the question's length, no decoding (``extra_cost``). The
backend must offer ``next_token_logprobs`` (``TransformersBackend`` does;
remote OpenAI-compatible backends don't).

The verification prompt holds the question and the whole answer, so it can be
longer than the model's context even when the request itself fitted: the
answer is then cut to fit, and when not even its start fits, the answer scores
a neutral 0.5 rather than failing a valid request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from tidegate.backend import BackendInfo, Generation
from tidegate.chat import ChatMessage, GenerationRequest
from tidegate.errors import InvalidArgument

log = logging.getLogger(__name__)

PROMPT = (
    "Question: {question}\n"
    "Proposed answer: {answer}\n"
    "Is the proposed answer correct? Answer yes or no."
)
YES = ("Yes", "yes")
NO = ("No", "no")
NEUTRAL = 0.5  # no evidence either way: the answer could not be judged
CUT = " ..."  # ends an answer cut to fit, so the model does not judge it complete


@runtime_checkable
class NextTokenScorer(Protocol):
    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], candidates: Sequence[str]
    ) -> dict[str, float]: ...


@runtime_checkable
class PromptCounter(Protocol):
    """A backend that can say how many tokens a prompt takes (TransformersBackend)."""

    tokenizer: Any

    @property
    def info(self) -> BackendInfo: ...

    def encode_prompt(self, request: GenerationRequest) -> list[int]: ...


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
        # Where the backend can count tokens, answers are cut to fit its context.
        self.counter = backend if isinstance(backend, PromptCounter) else None

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.text.strip():
            return 0.0
        messages = self.fitted_messages(request, generation.text)
        if messages is None:
            log.warning(
                "self_verify: the question alone fills the model's context; "
                "answer scored a neutral %.1f",
                NEUTRAL,
            )
            return NEUTRAL
        try:
            logprobs = await self.backend.next_token_logprobs(messages, YES + NO)
        except InvalidArgument as exc:
            # The prompt is ours, not the client's: whatever the model cannot take
            # (too long, where the backend cannot count tokens) must not fail the request.
            log.warning("self_verify: cannot judge the answer (%s); scored %.1f", exc, NEUTRAL)
            return NEUTRAL
        yes = sum(math.exp(logprobs[c]) for c in YES)
        no = sum(math.exp(logprobs[c]) for c in NO)
        return yes / (yes + no) if yes + no > 0 else NEUTRAL

    def fitted_messages(
        self, request: GenerationRequest, answer: str
    ) -> tuple[ChatMessage, ...] | None:
        """The verification prompt, its answer cut until the prompt and the one
        token read fit the context; None when not even the answer's start fits.

        The start is kept: it states the claim, the end mostly elaborates. Where
        the backend cannot count tokens the prompt goes as is. The counting runs
        on the event loop: one tokenization of a prompt (more only when it is cut).
        """
        messages = verification_messages(request, answer)
        backend = self.counter
        if backend is None:
            return messages
        room = backend.info.context_length - 1  # the prompt, then the one token read
        used = len(backend.encode_prompt(GenerationRequest(messages)))
        if used <= room:
            return messages
        ids = backend.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        keep = len(ids)
        while used > room:
            keep -= used - room  # every token over the context comes out of the answer
            if keep <= 0:
                return None
            cut = backend.tokenizer.decode(ids[:keep]) + CUT
            messages = verification_messages(request, cut)
            used = len(backend.encode_prompt(GenerationRequest(messages)))
        log.debug("self_verify: answer cut to its first %d tokens to fit the context", keep)
        return messages
