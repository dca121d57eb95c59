from tidegate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeGenerateRequest(_message.Message):
    __slots__ = ("messages", "sampling", "request_id", "return_tokens")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    request_id: str
    return_tokens: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class NodeGenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "confidence", "model", "tokens", "generation_ms", "queue_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    confidence: _common_pb2.Confidence
    model: str
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenInfo]
    generation_ms: float
    queue_ms: float
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., confidence: _Optional[_Union[_common_pb2.Confidence, _Mapping]] = ..., model: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.TokenInfo, _Mapping]]] = ..., generation_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class NodeGenerateChunk(_message.Message):
    __slots__ = ("delta", "response")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    delta: str
    response: NodeGenerateResponse
    def __init__(self, delta: _Optional[str] = ..., response: _Optional[_Union[NodeGenerateResponse, _Mapping]] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("role", "model", "context_length", "quantization", "estimator", "backend")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: str
    context_length: int
    quantization: str
    estimator: str
    backend: str
    def __init__(self, role: _Optional[str] = ..., model: _Optional[str] = ..., context_length: _Optional[int] = ..., quantization: _Optional[str] = ..., estimator: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...
