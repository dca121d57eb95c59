"""What the router reports about itself: each node's health, load and circuit
breaker, the cache's counters, and the tenants' budget standing.

The Status RPC (``router.servicer``) and the metrics endpoint
(``router.metrics``) read these; nothing here changes the router's state
except the node probes that make Status show live health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.auth import Tenant
from router.budgets import BudgetUsage
from router.nodes import NodeClient

if TYPE_CHECKING:
    from router.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeState:
    name: str
    address: str
    tier: str  # "edge" | "cloud"
    healthy: bool
    model: str
    last_error: str
    registered: bool = False  # announced itself through the edge registry
    capacity: int = 1
    load: float = 0.0  # (reported + this router's in-flight) / capacity
    heartbeat_age_s: float = 0.0  # registered edges: since the last heartbeat
    consecutive_failures: int = 0
    cooldown_remaining_s: float = 0.0  # > 0: cooled down by its circuit breaker
    breaker: str = "closed"  # "closed" | "open" | "half_open"
    expected_latency_ms: float = 0.0  # moving average (0: nothing measured yet)


@dataclass(frozen=True)
class RouterStatus:
    nodes: tuple[NodeState, ...]
    cache_entries: int
    cache_hits: int  # requests answered from the cache
    cache_misses: int  # lookups that could not answer the request
    policy_version: str
    cache_semantic_hits: int = 0  # of cache_hits: by a semantic match
    cache_shared: bool = False  # Redis
    budgets: tuple[BudgetUsage, ...] = ()
    last_reload_error: str = ""  # the last rejected config reload, with why


async def router_status(p: Pipeline, tenant: Tenant | None = None) -> RouterStatus:
    """Probes every node (Info, 1 s) so Status shows live health. Budgets:
    every tenant's for an admin ``tenant`` (or None), else its own."""
    nodes = [*p.edges, *p.clouds]
    await asyncio.gather(*(node.probe() for node in nodes))
    gate = p.cache_gate
    entries = 0
    if gate.cache is not None:
        try:
            entries = (await gate.cache.stats()).entries
        except Exception as exc:  # noqa: BLE001 - Status must answer regardless
            log.warning("cache stats failed: %s", exc)
    return RouterStatus(
        nodes=tuple(node_state(n) for n in nodes),
        cache_entries=entries,
        cache_hits=gate.hits,
        cache_misses=gate.misses,
        policy_version=p.version,
        cache_semantic_hits=gate.semantic_hits,
        cache_shared=p.settings.cache.url is not None,
        budgets=tuple(await _status_budgets(p, tenant)),
        last_reload_error=p.last_reload_error,
    )


def node_state(n: NodeClient) -> NodeState:
    """One node as the router last saw it (no I/O)."""
    return NodeState(
        n.name,
        n.address,
        n.tier,
        n.health.healthy,
        n.health.model,
        n.health.last_error,
        registered=n.registered,
        capacity=n.capacity,
        load=n.load(),
        heartbeat_age_s=(max(0.0, time.time() - n.heartbeat_at) if n.heartbeat_at else 0.0),
        consecutive_failures=n.breaker.snapshot().consecutive_failures,
        cooldown_remaining_s=n.breaker.cooldown_remaining(),
        breaker=n.breaker.state.value,
        expected_latency_ms=(n.latency.seconds or 0.0) * 1000.0,
    )


async def _status_budgets(p: Pipeline, tenant: Tenant | None) -> list[BudgetUsage]:
    """Everyone's budgets for an admin (or with auth off), else the caller's own."""
    try:
        if tenant is None or tenant.admin or not tenant.authenticated:
            return await budget_usage(p)
        return await budget_usage(p, [tenant.name])
    except Exception as exc:  # noqa: BLE001 - Status must answer regardless
        log.warning("budget usage unavailable: %s", exc)
        return []


async def budget_usage(p: Pipeline, tenants: list[str] | None = None) -> list[BudgetUsage]:
    """Read-only: each tenant's standing per limited window (metrics read this).
    ``tenants`` None: every tenant the config names, and "" when the default
    limits apply to requests that name no tenant."""
    if tenants is None:
        named = [t.name for t in p.settings.tenants]
        named += [b.tenant for b in p.settings.budgets.tenants]
        tenants = named if p.auth.enabled else [*named, ""]
    return await p.budgets.usage(tenants)
