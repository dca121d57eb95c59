"""The router's domain types: a routed request, a node's answer, a routed result.

Protobuf stops at the servicer (client side) and at ``router.nodes`` (node
side); the policy, cache and pipeline work on these dataclasses. The enums
carry the wire values so conversion is a lookup, not a table to keep in sync.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from tidegate.chat import ChatMessage, FinishReason, SamplingParams
from tidegate.v1 import router_pb2


class Tier(enum.Enum):
    EDGE = router_pb2.TIER_EDGE
    CLOUD = router_pb2.TIER_CLOUD
    CACHE = router_pb2.TIER_CACHE

    @property
    def label(self) -> str:
        return _TIER_LABELS[self]  # a dict lookup: this runs per request (metrics, logs)


_TIER_LABELS = {tier: tier.name.lower() for tier in Tier}


class Escalation(enum.Enum):
    """Why the cloud (not the edge) answered; NONE when it did not."""

    NONE = router_pb2.ESCALATION_CODE_NONE
    LOW_CONFIDENCE = router_pb2.ESCALATION_CODE_LOW_CONFIDENCE
    OVER_EDGE_BUDGET = router_pb2.ESCALATION_CODE_OVER_EDGE_BUDGET
    EDGE_UNAVAILABLE = router_pb2.ESCALATION_CODE_EDGE_UNAVAILABLE
    EDGE_TRUNCATED = router_pb2.ESCALATION_CODE_EDGE_TRUNCATED
    DEADLINE = router_pb2.ESCALATION_CODE_DEADLINE  # no time for the edge, then the cloud
    RULE = router_pb2.ESCALATION_CODE_RULE  # a policy rule sent it to the cloud


class CacheControl(enum.Enum):
    """Per-request cache behaviour (GenerateRequest.cache_control)."""

    DEFAULT = router_pb2.CACHE_CONTROL_DEFAULT  # read and write
    BYPASS = router_pb2.CACHE_CONTROL_BYPASS  # neither read nor write
    REFRESH = router_pb2.CACHE_CONTROL_REFRESH  # do not read; write the fresh answer

    @property
    def reads(self) -> bool:
        return self is CacheControl.DEFAULT

    @property
    def writes(self) -> bool:
        return self is not CacheControl.BYPASS


@dataclass(frozen=True)
class RouteRequest:
    """A client's request, as received (validation happens in the pipeline)."""

    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = ""
    tags: tuple[str, ...] = ()
    min_confidence: float | None = None  # None: the policy's threshold
    request_id: str = ""  # empty: the router generates one
    cache_control: CacheControl = CacheControl.DEFAULT
    # A tier the client forces (the OpenAI endpoint's model profiles): "edge"
    # never escalates, "cloud" skips the edge, as a forcing rule would
    # (router.rules.requested_route); a privacy pin still wins.
    route: Literal["auto", "edge", "cloud"] = "auto"


@dataclass(frozen=True)
class NodeAnswer:
    """One model node's complete answer, as the router judges and caches it."""

    text: str
    finish_reason: FinishReason | None  # None: the node did not say
    prompt_tokens: int
    completion_tokens: int
    model: str
    node: str  # the target's configured name
    confidence: float | None = None  # None: the node ran no estimator (cloud nodes)
    estimator: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason is FinishReason.LENGTH


@dataclass(frozen=True)
class Timings:
    total_ms: float = 0.0
    edge_ms: float = 0.0
    cloud_ms: float = 0.0
    router_overhead_ms: float = 0.0  # total minus time spent waiting on nodes


@dataclass(frozen=True)
class Restart:
    """Stream event: discard the text streamed so far (early edge tokens); what
    follows is the whole answer."""

    escalation: Escalation
    reason: str


@dataclass(frozen=True)
class RouteResult:
    """The answer with its full provenance (GUIDE §4)."""

    text: str
    tier: Tier
    source_tier: Tier | None  # on a cache hit: the tier that produced the entry
    confidence: float  # the edge confidence (1.0 for cloud answers no edge judged)
    estimator: str
    threshold: float  # the min_confidence the answer was judged against
    escalation: Escalation
    escalation_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    finish_reason: FinishReason | None
    model: str
    request_id: str
    policy_version: str
    flags: tuple[str, ...] = ()
