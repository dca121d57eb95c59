"""Domain types for a chat request, their validation, and protobuf conversion.

Protobuf types stop at the servicers: everything past them works on these.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from tidegate.errors import InvalidArgument
from tidegate.v1 import common_pb2

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    @classmethod
    def from_pb(cls, pb: common_pb2.ChatMessage) -> ChatMessage:
        return cls(role=pb.role, content=pb.content)

    def to_pb(self) -> common_pb2.ChatMessage:
        return common_pb2.ChatMessage(role=self.role, content=self.content)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = None  # None: the serving policy's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def is_sampled(self) -> bool:
        return self.temperature > 0.0

    def with_default_max_new_tokens(self, default: int) -> SamplingParams:
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=default)

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> SamplingParams:
        return cls(
            max_new_tokens=pb.max_new_tokens if pb.HasField("max_new_tokens") else None,
            temperature=pb.temperature if pb.HasField("temperature") else 0.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=tuple(pb.stop),
        )

    def to_pb(self) -> common_pb2.SamplingParams:
        pb = common_pb2.SamplingParams(stop=list(self.stop))
        if self.max_new_tokens is not None:
            pb.max_new_tokens = self.max_new_tokens
        if self.temperature:
            pb.temperature = self.temperature
        if self.top_p != 1.0:
            pb.top_p = self.top_p
        if self.seed is not None:
            pb.seed = self.seed
        return pb

    def validate(self, hard_limit: int) -> None:
        """Raise InvalidArgument with an actionable message for unusable values."""
        if self.max_new_tokens is not None:
            if self.max_new_tokens <= 0:
                raise InvalidArgument(
                    f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"
                )
            if self.max_new_tokens > hard_limit:
                raise InvalidArgument(
                    f"max_new_tokens {self.max_new_tokens} is over this server's limit "
                    f"of {hard_limit}; ask for fewer tokens"
                )
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise InvalidArgument(f"temperature must be in [0, 2] (got {self.temperature})")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1] (got {self.top_p})")
        if len(self.stop) > 8 or any(not s for s in self.stop):
            raise InvalidArgument("stop takes at most 8 non-empty strings")


def validate_messages(messages: tuple[ChatMessage, ...]) -> None:
    """A usable conversation: known roles, something to answer, last turn from the user."""
    if not messages:
        raise InvalidArgument("the conversation is empty: send at least one user message")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(
                f"message {index} has unknown role {message.role!r}; use one of {', '.join(ROLES)}"
            )
    last = messages[-1]
    if last.role != "user":
        raise InvalidArgument(
            f"the last message must come from the user (it is {last.role!r}); "
            "append the question as a user message"
        )
    if not last.content.strip():
        raise InvalidArgument("the question is empty: the last user message has no text")


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""

    def validate(self, hard_limit: int) -> None:
        validate_messages(self.messages)
        self.sampling.validate(hard_limit)


class FinishReason(enum.Enum):
    STOP = common_pb2.FINISH_REASON_STOP  # end-of-sequence token
    LENGTH = common_pb2.FINISH_REASON_LENGTH  # truncated at max_new_tokens
    STOP_SEQUENCE = common_pb2.FINISH_REASON_STOP_SEQUENCE

    @property
    def is_complete(self) -> bool:
        return self is not FinishReason.LENGTH
