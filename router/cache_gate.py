"""The response cache as the pipeline sees it: may this request read or write
the cache, does an entry still answer it, and is an answer worth storing.

    lookup: exact key → (opt-in) guarded semantic match → threshold met? →
            model still serving its tier? → a cache result (hit), else a miss
    admit:  admission rules (``router.policy``) → put → index for semantic matches

Reads and writes follow the request's ``cache_control`` (bypass, refresh). A
cached entry answers only while the model that produced it is still the one
serving its tier (``CacheGate._entry_is_current``): after an upgrade the old
model's answers stop being served. The cache is an optimisation, so its
failures are logged and the request goes on without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from router import provenance
from router.cache import CacheEntry, EmbeddedCache, ResponseCache
from router.domain import RouteResult, Tier
from router.nodes import NodeClient
from router.plan import Plan
from router.policy import admission_refusal, may_serve_cached
from router.provenance import Stopwatch
from router.semantic_cache import SemanticIndex
from router.settings import RouterSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _best_effort(work: Awaitable[T], failed: str) -> T | None:
    """``work``'s result, or None when it fails (logged as ``failed``): the caches
    are an optimisation, so their failures are misses, never the request's error."""
    try:
        return await work
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: %s", failed, exc)
        return None


# How often the router may re-ask a tier's nodes for their model (Info) while it
# knows none of them: a lookup must not probe dead nodes on every request.
MODEL_PROBE_INTERVAL_S = 5.0


class CacheGate:
    """Guards the pipeline's cache reads and writes, and counts what they found.

    ``edges`` and ``clouds`` are the pipeline's own lists (registered edges join
    them in place): an entry is current only while a node in them serves its model.
    """

    def __init__(
        self, cache: ResponseCache | None, edges: list[NodeClient], clouds: list[NodeClient]
    ) -> None:
        self.cache = cache
        self.semantic: SemanticIndex | None = None  # set by router.service when enabled
        self.edges = edges
        self.clouds = clouds
        self.hits = 0  # requests answered from the cache
        self.misses = 0  # lookups that could not answer the request
        self.semantic_hits = 0  # of hits: by a semantic match
        self._model_probed_at: dict[Tier, float] = {}
        self._probes: set[asyncio.Future[Any]] = set()  # model probes still running

    async def lookup(
        self, plan: Plan, watch: Stopwatch, version: str, deadline: float | None = None
    ) -> RouteResult | None:
        """A cached answer for the plan: the exact key first, then (opt-in) a
        guarded semantic match. None when nothing may answer it. ``deadline``
        (event-loop time) bounds the wait for nodes' models (``_entry_is_current``)."""
        if (
            self.cache is None
            or not plan.cacheable
            or not plan.reads_cache
            or not self._may_share(plan)
        ):
            return None
        entry = await self._get(plan.key)
        semantic = False
        if entry is None and self.semantic is not None:
            key = await _best_effort(
                self.semantic.find(plan), "semantic cache lookup failed, answering without it"
            )
            entry = await self._get(key) if key is not None else None
            semantic = entry is not None
        if (
            entry is None
            or not may_serve_cached(
                entry.source_tier, entry.confidence, entry.estimator, plan.facts
            )
            or not await self._entry_is_current(entry, deadline)
        ):
            self.misses += 1
            return None
        self.hits += 1
        result = provenance.cache_result(plan, entry, watch, version)
        if semantic:
            self.semantic_hits += 1
            result = replace(result, flags=(*result.flags, provenance.SEMANTIC))
        return result

    async def admit(self, plan: Plan, result: RouteResult, settings: RouterSettings) -> None:
        """Store the answer when the admission rules allow it (router.policy)."""
        if (
            self.cache is None
            or not plan.writes_cache
            or not self._may_share(plan)
            or provenance.OVER_BUDGET in result.flags
            or result.tier is Tier.CACHE
            or provenance.DEGRADED in result.flags
        ):
            return
        source = result.tier
        confidence = result.confidence if source is Tier.EDGE else 1.0
        refusal = admission_refusal(
            source,
            confidence,
            result.estimator,
            result.finish_reason,
            plan.sampling.is_sampled,
            plan.facts.threshold,
            settings.policy,
            settings.cache.cache_sampled,
        )
        if refusal is not None or result.finish_reason is None:
            log.debug("not caching %s: %s", plan.request_id, refusal)
            return
        entry = CacheEntry(
            text=result.text,
            source_tier=source,
            model=result.model,
            confidence=confidence,
            estimator=result.estimator if source is Tier.EDGE else "",
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        try:
            await self.cache.put(plan.key, entry, settings.cache.ttl_s)
        except Exception as exc:  # noqa: BLE001 - the answer is good; only caching failed
            log.warning("cache store failed: %s", exc)
            return
        if self.semantic is not None:
            await _best_effort(self.semantic.add(plan), "semantic cache indexing failed")

    async def close(self) -> None:
        for probe in list(self._probes):
            probe.cancel()
        if self.semantic is not None:
            await self.semantic.close()
        if self.cache is not None:
            await self.cache.close()

    def _may_share(self, plan: Plan) -> bool:
        """A forced tier skips the cache; a privacy-pinned request uses only an
        in-process cache, never a shared one (an unknown kind counts as shared)."""
        if plan.rule.forced:
            return False
        return not plan.rule.pinned or isinstance(self.cache, EmbeddedCache)

    async def _get(self, key: str) -> CacheEntry | None:
        assert self.cache is not None
        return await _best_effort(self.cache.get(key), "cache lookup failed, answering without it")

    async def _entry_is_current(self, entry: CacheEntry, deadline: float | None = None) -> bool:
        """Whether the model that produced ``entry`` still serves its tier.

        The router learns each node's model from its answers and its Info
        (probed here when a tier's models are not known yet, at most every
        MODEL_PROBE_INTERVAL_S). An entry whose model no node of its tier
        serves any more is a miss, and the fresh answer replaces it. The probes
        run side by side, and the first that names the entry's model settles it:
        a node that never answers must not hold up a cache hit, nor outlast the
        request's ``deadline`` (past it, the entry counts as not current).
        """
        nodes = self.edges if entry.source_tier is Tier.EDGE else self.clouds

        def current() -> bool:
            return entry.model in {n.health.model for n in nodes if n.health.model}

        now = time.monotonic()
        probed = self._model_probed_at.get(entry.source_tier)
        known = any(n.health.model for n in nodes)
        if known or not nodes or (probed is not None and now - probed < MODEL_PROBE_INTERVAL_S):
            return current()
        self._model_probed_at[entry.source_tier] = now
        probes = [asyncio.ensure_future(n.probe()) for n in nodes]
        for task in probes:  # the rest finish in the background, updating node health
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            for probe in asyncio.as_completed(probes, timeout=left):
                await probe
                if current():
                    return True
        except TimeoutError:
            log.info("no node's model known by the request's deadline: the cache entry waits")
        return current()
