"""The exact-match cache key: what makes two requests "the same question".

sha256 over a canonical JSON of the tenant, the WHOLE conversation (every
message's role and content, the system prompt included: caches keyed on the
last message alone serve answers to a different conversation) and the sampling
parameters after defaults. Canonical = sorted keys, no whitespace, lists kept
in order, so equal requests always hash equally.

The answering model is deliberately NOT in the key: which model answers is the
router's decision, made after the lookup. The entry records the tier and model
that produced it instead; it answers only while a node of that tier still
serves that model (``CacheGate._entry_is_current``: after an upgrade the old
model's entries are misses, and fresh answers overwrite them), and the serving
rule (``router.policy``) decides whether it meets the request's threshold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from tidegate.chat import ChatMessage, SamplingParams

KEY_VERSION = 1  # bump when the canonical form changes: old entries stop matching


def canonical_request(
    tenant: str, messages: Sequence[ChatMessage], sampling: SamplingParams
) -> str:
    """The canonical JSON the key hashes; ``sampling`` must have defaults applied."""
    if sampling.max_new_tokens is None:
        raise ValueError("apply the default max_new_tokens before computing a cache key")
    document = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "messages": [[m.role, m.content] for m in messages],
        "sampling": {
            "max_new_tokens": sampling.max_new_tokens,
            # repr-stable floats: 0.7 and 0.70 are the same float, so the same JSON
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "seed": sampling.seed,
            "stop": list(sampling.stop),
        },
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(tenant: str, messages: Sequence[ChatMessage], sampling: SamplingParams) -> str:
    """Hex sha256 of ``canonical_request``: 64 characters, safe in any store."""
    canonical = canonical_request(tenant, messages, sampling)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
