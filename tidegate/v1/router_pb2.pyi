from tidegate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheControl(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_CONTROL_DEFAULT: _ClassVar[CacheControl]
    CACHE_CONTROL_BYPASS: _ClassVar[CacheControl]
    CACHE_CONTROL_REFRESH: _ClassVar[CacheControl]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_EDGE: _ClassVar[Tier]
    TIER_CLOUD: _ClassVar[Tier]
    TIER_CACHE: _ClassVar[Tier]

class EscalationCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESCALATION_CODE_NONE: _ClassVar[EscalationCode]
    ESCALATION_CODE_LOW_CONFIDENCE: _ClassVar[EscalationCode]
    ESCALATION_CODE_OVER_EDGE_BUDGET: _ClassVar[EscalationCode]
    ESCALATION_CODE_EDGE_UNAVAILABLE: _ClassVar[EscalationCode]
    ESCALATION_CODE_EDGE_TRUNCATED: _ClassVar[EscalationCode]
    ESCALATION_CODE_DEADLINE: _ClassVar[EscalationCode]
    ESCALATION_CODE_RULE: _ClassVar[EscalationCode]
CACHE_CONTROL_DEFAULT: CacheControl
CACHE_CONTROL_BYPASS: CacheControl
CACHE_CONTROL_REFRESH: CacheControl
TIER_UNSPECIFIED: Tier
TIER_EDGE: Tier
TIER_CLOUD: Tier
TIER_CACHE: Tier
ESCALATION_CODE_NONE: EscalationCode
ESCALATION_CODE_LOW_CONFIDENCE: EscalationCode
ESCALATION_CODE_OVER_EDGE_BUDGET: EscalationCode
ESCALATION_CODE_EDGE_UNAVAILABLE: EscalationCode
ESCALATION_CODE_EDGE_TRUNCATED: EscalationCode
ESCALATION_CODE_DEADLINE: EscalationCode
ESCALATION_CODE_RULE: EscalationCode

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "sampling", "tenant", "tags", "min_confidence", "request_id", "cache_control")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTROL_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    min_confidence: float
    request_id: str
    cache_control: CacheControl
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., min_confidence: _Optional[float] = ..., request_id: _Optional[str] = ..., cache_control: _Optional[_Union[CacheControl, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("total_ms", "edge_ms", "cloud_ms", "router_overhead_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    edge_ms: float
    cloud_ms: float
    router_overhead_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., edge_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., router_overhead_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tier", "source_tier", "confidence", "estimator", "threshold", "escalation_code", "escalation_reason", "usage", "timings", "finish_reason", "model", "request_id", "policy_version", "flags")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_CODE_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    text: str
    tier: Tier
    source_tier: Tier
    confidence: float
    estimator: str
    threshold: float
    escalation_code: EscalationCode
    escalation_reason: str
    usage: _common_pb2.Usage
    timings: Timings
    finish_reason: _common_pb2.FinishReason
    model: str
    request_id: str
    policy_version: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., source_tier: _Optional[_Union[Tier, str]] = ..., confidence: _Optional[float] = ..., estimator: _Optional[str] = ..., threshold: _Optional[float] = ..., escalation_code: _Optional[_Union[EscalationCode, str]] = ..., escalation_reason: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("delta", "response", "restart")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    delta: str
    response: GenerateResponse
    restart: Restart
    def __init__(self, delta: _Optional[str] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., restart: _Optional[_Union[Restart, _Mapping]] = ...) -> None: ...

class Restart(_message.Message):
    __slots__ = ("escalation_code", "reason")
    ESCALATION_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    escalation_code: EscalationCode
    reason: str
    def __init__(self, escalation_code: _Optional[_Union[EscalationCode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "address", "tier", "healthy", "model", "last_error", "consecutive_failures", "cooldown_remaining_s", "registered", "capacity", "load", "heartbeat_age_s", "breaker", "expected_latency_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    tier: str
    healthy: bool
    model: str
    last_error: str
    consecutive_failures: int
    cooldown_remaining_s: float
    registered: bool
    capacity: int
    load: float
    heartbeat_age_s: float
    breaker: str
    expected_latency_ms: float
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., tier: _Optional[str] = ..., healthy: _Optional[bool] = ..., model: _Optional[str] = ..., last_error: _Optional[str] = ..., consecutive_failures: _Optional[int] = ..., cooldown_remaining_s: _Optional[float] = ..., registered: _Optional[bool] = ..., capacity: _Optional[int] = ..., load: _Optional[float] = ..., heartbeat_age_s: _Optional[float] = ..., breaker: _Optional[str] = ..., expected_latency_ms: _Optional[float] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("tenant", "window", "unit", "limit", "remaining")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    window: str
    unit: str
    limit: float
    remaining: float
    def __init__(self, tenant: _Optional[str] = ..., window: _Optional[str] = ..., unit: _Optional[str] = ..., limit: _Optional[float] = ..., remaining: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "cache_entries", "cache_hits", "cache_misses", "policy_version", "cache_semantic_hits", "cache_shared", "budgets", "last_reload_error")
    NODES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SHARED_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    cache_entries: int
    cache_hits: int
    cache_misses: int
    policy_version: str
    cache_semantic_hits: int
    cache_shared: bool
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    last_reload_error: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., cache_entries: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., policy_version: _Optional[str] = ..., cache_semantic_hits: _Optional[int] = ..., cache_shared: _Optional[bool] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., last_reload_error: _Optional[str] = ...) -> None: ...
