"""Model outputs cached on disk, so an evaluation can be resumed or re-run cheaply.

The key is a sha256 over the model's identity (``BackendInfo.model``, e.g.
``smollm2-135m@b179c9523d0e/int8``), the whole conversation and the sampling
parameters — so re-running with another edge variant regenerates only the edge
and reuses every cloud answer. Each model has its own append-only JSONL file
(``<cache dir>/<model slug>.jsonl``), one line per output, flushed as it is
written: a run killed half-way keeps what it finished. A torn last line (a
process killed mid-write) is skipped on load.

``CachedBackend`` wraps any ``ModelBackend`` (and, where the backend has it,
``next_token_logprobs``), so estimators that sample or verify through the
backend are cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from tidegate.backend import BackendInfo, Generation, ModelBackend
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest

log = logging.getLogger(__name__)


def model_slug(model: str) -> str:
    """A file-name-safe form of a model identity: ``smollm2-135m@b179c9523d0e-int8``."""
    return re.sub(r"[^A-Za-z0-9@._-]+", "-", model).strip("-") or "model"


def request_key(model: str, kind: str, request: GenerationRequest, extra: Any = None) -> str:
    """sha256 over everything that determines the output (never the request id)."""
    s = request.sampling
    payload = {
        "model": model,
        "kind": kind,
        "messages": [[m.role, m.content] for m in request.messages],
        "sampling": [s.max_new_tokens, s.temperature, s.top_p, s.seed, list(s.stop)],
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def generation_to_dict(g: Generation) -> dict[str, Any]:
    return {
        "text": g.text,
        "token_ids": g.token_ids,
        "logprobs": g.logprobs,
        "entropies": g.entropies,
        "finish_reason": g.finish_reason.name,
        "prompt_tokens": g.prompt_tokens,
        "model": g.model,
        "generation_ms": g.generation_ms,
        "queue_ms": g.queue_ms,
        "token_texts": g.token_texts,
        "reported_completion_tokens": g.reported_completion_tokens,
        "prompt_state": g.prompt_state,
        "answer_state": g.answer_state,
    }


def generation_from_dict(d: dict[str, Any]) -> Generation:
    return Generation(
        text=d["text"],
        token_ids=list(d["token_ids"]),
        logprobs=list(d["logprobs"]),
        entropies=None if d["entropies"] is None else list(d["entropies"]),
        finish_reason=FinishReason[d["finish_reason"]],
        prompt_tokens=d["prompt_tokens"],
        model=d["model"],
        generation_ms=d["generation_ms"],
        queue_ms=d.get("queue_ms", 0.0),
        token_texts=list(d.get("token_texts") or []),
        reported_completion_tokens=d.get("reported_completion_tokens"),
        prompt_state=d.get("prompt_state"),
        answer_state=d.get("answer_state"),
    )


class OutputCache:
    """Append-only JSONL of {key: value} for one model."""

    def __init__(self, directory: str | Path, model: str) -> None:
        self.path = Path(directory) / f"{model_slug(model)}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, Any] = {}
        self._needs_newline = False  # a torn last line: the next record starts a new line
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for number, line in enumerate(text.splitlines()):
                try:
                    record = json.loads(line)
                    self._entries[record["key"]] = record["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s:%d: skipping an unreadable cache line", self.path, number + 1)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = value
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        # One write call per line, in append mode: concurrent writers (a cloud run in
        # the background, an edge run in the foreground) interleave whole lines.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)


class CachedBackend:
    """A ModelBackend whose unary outputs come from / go to an ``OutputCache``."""

    def __init__(self, backend: ModelBackend, cache_dir: str | Path) -> None:
        self.inner = backend
        self.cache = OutputCache(cache_dir, backend.info.model)

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    async def generate(self, request: GenerationRequest) -> Generation:
        key = request_key(self.info.model, "generate", request)
        cached = self.cache.get(key)
        # An entry written before generations had an answer state lacks the key: answer
        # again (a remote backend's entry has it, as null), so the probe is never fitted
        # or scored on a silently missing state.
        if cached is not None and "answer_state" in cached:
            return generation_from_dict(cached)
        generation = await self.inner.generate(request)
        self.cache.put(key, generation_to_dict(generation))
        return generation

    def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        return self.inner.stream(request)  # not cached: evaluation is unary

    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], candidates: Sequence[str]
    ) -> dict[str, float]:
        request = GenerationRequest(messages=tuple(messages))
        key = request_key(self.info.model, "next_token_logprobs", request, list(candidates))
        cached = self.cache.get(key)
        if cached is not None:
            return dict(cached)
        result: dict[str, float] = await self.inner.next_token_logprobs(  # type: ignore[attr-defined]
            messages, candidates
        )
        self.cache.put(key, result)
        return result

    async def close(self) -> None:
        await self.inner.close()
