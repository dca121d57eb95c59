"""OpenAI chat-completions JSON ↔ the router's domain types.

Requests are parsed with pydantic into ``ChatCompletionRequest`` and turned
into a ``RouteRequest``; the router's own validation (``tidegate.chat``) runs
later in the pipeline, exactly as for gRPC, so both front doors accept and
refuse the same things. What this module adds is what only HTTP has: the
OpenAI field names, the features tidegate does not offer (refused with 400
naming the field rather than silently dropped), and the response and chunk
shapes. Errors: ``router.openai_errors``.

Deviations from OpenAI, on purpose: ``temperature`` defaults to 0 (greedy, so
repeated questions are cacheable) rather than 1; ``model`` names a routing
profile (``PROFILES``); tidegate's provenance rides in an extra ``tidegate``
field of the body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.domain import CacheControl, Restart, RouteRequest, RouteResult, Timings
from router.openai_errors import BadRequest
from tidegate.chat import ChatMessage, FinishReason, SamplingParams

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass(frozen=True)
class Profile:
    """A routing profile, addressed by the request's ``model``."""

    name: str
    description: str
    route: Literal["auto", "edge", "cloud"]


PROFILES = {
    p.name: p
    for p in (
        Profile("tidegate", "cache, then the edge, escalating to the cloud by policy", "auto"),
        Profile("tidegate-edge", "the edge model only; never escalates", "edge"),
        Profile("tidegate-cloud", "the cloud model only; skips the edge", "cloud"),
    )
}


# -- request -----------------------------------------------------------------


class _Lenient(BaseModel):
    # OpenAI's own objects grow fields; unknown ones are ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class TidegateOptions(BaseModel):
    """The ``tidegate`` extension object of a request (``extra_body`` in the
    openai client). Strict: a typo here is tidegate's own field, so it fails."""

    model_config = ConfigDict(extra="forbid")

    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    tags: list[str] = Field(default_factory=list, max_length=32)
    tenant: str = Field(default="", max_length=128)  # with API keys: empty, or the key's own
    cache_control: Literal["default", "bypass", "refresh"] = "default"


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message]
    stream: bool | None = False  # null: not streamed, as the OpenAI spec allows
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, max_length=256)
    tidegate: TidegateOptions = Field(default_factory=TidegateOptions)


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# Features tidegate's models do not offer: (is this value harmless?, why not).
# Refused only when they would change the answer: `n: 1`, `tools: []` and
# `logprobs: false` pass, as clients often send them by default.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "only n = 1 is supported: ask once per completion"),
    "frequency_penalty": (lambda v: v in (None, 0), "frequency_penalty is not supported: use 0"),
    "presence_penalty": (lambda v: v in (None, 0), "presence_penalty is not supported: use 0"),
    "tools": (_unset, "tools (tool calling) is not supported by tidegate's models"),
    "functions": (_unset, "functions (tool calling) is not supported by tidegate's models"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool_choice needs tools: unsupported"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function_call is not supported"),
    "response_format": (
        lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "response_format other than text (JSON mode, schemas) is not supported",
    ),
    "logprobs": (_unset, "logprobs are not returned by the router"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs are not returned by the router"),
    "logit_bias": (_unset, "logit_bias is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "audio": (_unset, "audio is not supported"),
    "prediction": (_unset, "prediction is not supported"),
    "web_search_options": (_unset, "web_search_options is not supported"),
}


def parse_request(body: Any) -> ChatCompletionRequest:
    """The parsed body; BadRequest naming the field when it is unusable."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, (harmless, why) in UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise BadRequest(why, name)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"invalid request: {details}", param) from exc


def _text(message: Message, index: int) -> str:
    if message.tool_calls:
        raise BadRequest(
            f"message {index} carries tool_calls: tool calling is not supported",
            f"messages.{index}.tool_calls",
        )
    content = message.content
    if content is None:
        raise BadRequest(f"message {index} has no content", f"messages.{index}.content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise BadRequest(
                f"message {index} has a {part.type!r} content part: only text is supported",
                f"messages.{index}.content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def to_route_request(parsed: ChatCompletionRequest, tenant: str, request_id: str) -> RouteRequest:
    """The RouteRequest the pipeline validates and routes, as gRPC would send it;
    ``parsed.model`` must be one of PROFILES (its route forces a tier)."""
    messages = tuple(
        ChatMessage(ROLE_ALIASES.get(m.role, m.role), _text(m, i))
        for i, m in enumerate(parsed.messages)
    )
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        if parsed.max_tokens != parsed.max_completion_tokens:
            raise BadRequest(
                "max_tokens and max_completion_tokens disagree: send only one",
                "max_completion_tokens",
            )
    stop = parsed.stop if parsed.stop is not None else ()
    sampling = SamplingParams(
        max_new_tokens=parsed.max_completion_tokens or parsed.max_tokens,
        temperature=0.0 if parsed.temperature is None else parsed.temperature,
        top_p=1.0 if parsed.top_p is None else parsed.top_p,
        seed=parsed.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )
    return RouteRequest(
        messages=messages,
        sampling=sampling,
        tenant=tenant,
        tags=tuple(parsed.tidegate.tags),
        min_confidence=parsed.tidegate.min_confidence,
        request_id=request_id,
        cache_control=CacheControl[parsed.tidegate.cache_control.upper()],
        route=PROFILES[parsed.model].route,
    )


# -- response ----------------------------------------------------------------


def finish_reason(result: RouteResult) -> str:
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def usage(result: RouteResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _ms(timings: Timings) -> dict[str, float]:
    return {
        "total": round(timings.total_ms, 3),
        "edge": round(timings.edge_ms, 3),
        "cloud": round(timings.cloud_ms, 3),
        "router_overhead": round(timings.router_overhead_ms, 3),
    }


def provenance(result: RouteResult) -> dict[str, Any]:
    """The extra ``tidegate`` field: the same facts as the gRPC response."""
    return {
        "tier": result.tier.label,
        "source_tier": result.source_tier.label if result.source_tier else None,
        "confidence": round(result.confidence, 6),
        "estimator": result.estimator,
        "threshold": round(result.threshold, 6),
        "escalation_code": result.escalation.name.lower(),
        "escalation_reason": result.escalation_reason,
        "model": result.model,
        "request_id": result.request_id,
        "policy_version": result.policy_version,
        "flags": list(result.flags),
        "timings_ms": _ms(result.timings),
    }


def _header_safe(value: str, limit: int = 512) -> str:
    """Printable ASCII as is, anything else percent-encoded (UTF-8), cut at ``limit``.

    HTTP header values are latin-1 at best and must not hold line breaks; the
    body's ``tidegate`` field carries the exact text.
    """
    out = []
    for char in value[:limit]:
        if " " <= char <= "~" and char != "%":
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8"))
    return "".join(out)


def provenance_headers(result: RouteResult) -> dict[str, str]:
    headers = {
        "x-tidegate-tier": result.tier.label,
        "x-tidegate-confidence": f"{result.confidence:.6f}",
        "x-tidegate-estimator": _header_safe(result.estimator),
        "x-tidegate-escalation-code": result.escalation.name.lower(),
        "x-tidegate-escalation-reason": _header_safe(result.escalation_reason),
        "x-tidegate-router-overhead-ms": f"{result.timings.router_overhead_ms:.3f}",
        "x-tidegate-model": _header_safe(result.model),
        "x-tidegate-policy-version": _header_safe(result.policy_version),
    }
    if result.source_tier is not None:
        headers["x-tidegate-source-tier"] = result.source_tier.label
    if result.flags:
        headers["x-tidegate-flags"] = _header_safe(",".join(result.flags))
    return headers


def restart(event: Restart) -> dict[str, Any]:
    """The ``tidegate`` field of the chunk that tells a client to discard the
    text streamed so far (early edge tokens, ``stream.early_edge_tokens``)."""
    return {"restart": {"escalation_code": event.escalation.name.lower(), "reason": event.reason}}


def completion(result: RouteResult, model: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": result.policy_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
        "tidegate": provenance(result),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk
    (empty ``choices``) that ``stream_options.include_usage`` asks for."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
