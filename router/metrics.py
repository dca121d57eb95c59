"""Prometheus metrics for the router, served over HTTP at ``GET /metrics``.

Names are prefixed ``tidegate_``. Two kinds:

* **Per request** (``RouterMetrics.finished`` / ``failed``, called by the
  pipeline when a request ends, unary or streamed):
  ``tidegate_requests_total{rpc,tier,tenant}``,
  ``tidegate_request_errors_total{rpc,code,tenant}``,
  ``tidegate_escalations_total{reason}``,
  ``tidegate_cloud_tokens_total{tenant,kind}`` (tokens the cloud spent; cache
  hits and coalesced answers spent none),
  ``tidegate_answer_flags_total{flag}`` (degraded, coalesced, semantic, restarted…),
  ``tidegate_request_duration_seconds{rpc,tier}`` and
  ``tidegate_router_overhead_seconds{rpc,tier}`` (total minus time waiting on nodes).
* **Read at scrape time** from the router's own state (``RouterCollector``):
  cache hits/misses/entries, node health, breaker cooldowns and failures,
  load, budgets remaining, requests in flight.

Each router has its own ``CollectorRegistry`` (several routers in one process
never mix), and the tenant label is capped at ``metrics.max_tenants`` values
(then ``other``): a client must not be able to grow the metrics without bound.

The HTTP server runs on the router's event loop (``asyncio.start_server``), so
a scrape reads async state (the Redis cache size, Redis budgets) directly and
never races the pipeline from another thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from router.domain import Escalation, RouteResult, Tier
from router.settings import MetricsSettings
from router.status import budget_usage
from tidegate.errors import ConfigError, TidegateError

if TYPE_CHECKING:
    from router.pipeline import Pipeline

log = logging.getLogger(__name__)

PATH = "/metrics"
SCRAPE_STATE_TIMEOUT_S = 2.0  # a slow Redis must not hang the scrape
MAX_REQUEST_HEAD = 16 * 1024
# Router overhead is sub-millisecond on a hit; total latency spans cache hits to long cloud answers.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# The label of requests that name no tenant. Not "default": a tenant may be called
# that (budgets.tenants takes any name), and two series with one label set make
# Prometheus reject the whole scrape.
NO_TENANT = "(none)"


class TenantLabels:
    """At most ``limit`` distinct tenant label values; later ones are "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, tenant: str) -> str:
        label = tenant or NO_TENANT
        if label in self._seen:
            return label
        if len(self._seen) < self.limit:
            self._seen.add(label)
            return label
        return "other"


class RouterMetrics:
    """The router's metrics registry and the per-request instruments."""

    def __init__(self, settings: MetricsSettings) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant = TenantLabels(settings.max_tenants)
        r = self.registry
        self.requests = Counter(
            "tidegate_requests", "Requests answered, by answering tier.",
            ["rpc", "tier", "tenant"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "tidegate_request_errors", "Requests that ended with an error status.",
            ["rpc", "code", "tenant"], registry=r,
        )  # fmt: skip
        self.escalations = Counter(
            "tidegate_escalations", "Answers the cloud gave instead of the edge, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cloud_tokens = Counter(
            "tidegate_cloud_tokens", "Tokens spent on cloud calls (prompt and completion).",
            ["tenant", "kind"], registry=r,
        )  # fmt: skip
        self.flags = Counter(
            "tidegate_answer_flags", "Answers carrying a flag (degraded, coalesced, semantic…).",
            ["flag"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "tidegate_request_duration_seconds", "Total time to answer a request.",
            ["rpc", "tier"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "tidegate_router_overhead_seconds",
            "The router's own time per request: total minus time waiting on nodes.",
            ["rpc", "tier"], buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.collector: RouterCollector | None = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def watch(self, pipeline: Pipeline) -> None:
        """Also report the pipeline's state (cache, nodes, budgets) at scrape time."""
        self.collector = RouterCollector(pipeline)
        self.registry.register(self.collector)

    # -- the pipeline calls these ------------------------------------------------

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: label values are bounded (the
        tenant cap), and ``labels()`` validates and locks on every call."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def finished(self, rpc: str, tenant: str, result: RouteResult) -> None:
        tenant_label = self.tenant(tenant)
        tier = result.tier.label
        self._child(self.requests, rpc, tier, tenant_label).inc()
        if result.escalation is not Escalation.NONE and result.tier is not Tier.CACHE:
            self._child(self.escalations, result.escalation.name.lower()).inc()
        for flag in result.flags:
            self._child(self.flags, flag).inc()
        spent = result.tier is Tier.CLOUD and "coalesced" not in result.flags
        if spent:
            self._child(self.cloud_tokens, tenant_label, "prompt").inc(result.prompt_tokens)
            tokens = self._child(self.cloud_tokens, tenant_label, "completion")
            tokens.inc(result.completion_tokens)
        timings = result.timings
        self._child(self.duration, rpc, tier).observe(timings.total_ms / 1000.0)
        self._child(self.overhead, rpc, tier).observe(timings.router_overhead_ms / 1000.0)

    def failed(self, rpc: str, tenant: str, error: BaseException) -> None:
        code = error.code.name if isinstance(error, TidegateError) else "INTERNAL"
        self.errors.labels(rpc, code, self.tenant(tenant)).inc()

    # -- exposition ---------------------------------------------------------------

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (text, or OpenMetrics when asked)."""
        if self.collector is not None:
            await self.collector.refresh()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


@dataclass
class _AsyncState:
    """What a scrape reads with I/O, refreshed just before each scrape."""

    cache_entries: float | None = None
    budgets: tuple[Any, ...] = ()


class RouterCollector(Collector):
    """Reads the router's live state at scrape time."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.state = _AsyncState()

    async def refresh(self) -> None:
        p = self.pipeline
        cache = p.cache_gate.cache
        if cache is not None:
            try:
                stats = await asyncio.wait_for(cache.stats(), SCRAPE_STATE_TIMEOUT_S)
                self.state.cache_entries = stats.entries
            except Exception as exc:  # noqa: BLE001 - report the rest regardless
                log.warning("metrics: cache size unavailable: %s", exc)
                self.state.cache_entries = None
        try:
            self.state.budgets = tuple(
                await asyncio.wait_for(budget_usage(p), SCRAPE_STATE_TIMEOUT_S)
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: budgets unavailable: %s", exc)
            self.state.budgets = ()

    def collect(self) -> Iterable[Metric]:
        yield from self._cache()
        yield from self._nodes()
        yield from self._budgets()
        flights = GaugeMetricFamily(
            "tidegate_requests_in_flight", "Distinct model runs in flight (after coalescing)."
        )
        flights.add_metric([], len(self.pipeline._flights))
        yield flights

    def _cache(self) -> Iterator[Metric]:
        gate = self.pipeline.cache_gate
        hits = CounterMetricFamily(
            "tidegate_cache_hits", "Requests answered from the cache, by match.", labels=["match"]
        )
        hits.add_metric(["exact"], gate.hits - gate.semantic_hits)
        hits.add_metric(["semantic"], gate.semantic_hits)
        yield hits
        misses = CounterMetricFamily(
            "tidegate_cache_misses", "Cache lookups that could not answer the request."
        )
        misses.add_metric([], gate.misses)
        yield misses
        if self.state.cache_entries is not None:
            entries = GaugeMetricFamily("tidegate_cache_entries", "Entries in the response cache.")
            entries.add_metric([], self.state.cache_entries)
            yield entries
        semantic = gate.semantic
        if semantic is not None:
            indexed = GaugeMetricFamily(
                "tidegate_semantic_index_entries", "Questions in this router's semantic index."
            )
            indexed.add_metric([], len(semantic))
            yield indexed
            refused = CounterMetricFamily(
                "tidegate_semantic_guard_refusals",
                "Similar questions a guard refused to match, by guard.",
                labels=["guard"],
            )
            for reason, count in semantic.refused.items():
                refused.add_metric([reason], count)
            yield refused

    def _nodes(self) -> Iterator[Metric]:
        labels = ["node", "tier"]
        up = GaugeMetricFamily(
            "tidegate_node_healthy", "1: the last call or probe succeeded.", labels=labels
        )
        cooldown = GaugeMetricFamily(
            "tidegate_node_cooldown_seconds",
            "Seconds until a cooled-down node (circuit breaker open) is tried again; "
            "0: not cooled down.",
            labels=labels,
        )
        failures = GaugeMetricFamily(
            "tidegate_node_consecutive_failures", "Failed calls in a row.", labels=labels
        )
        load = GaugeMetricFamily(
            "tidegate_node_load", "(reported + this router's in-flight) / capacity.", labels=labels
        )
        for node in [*self.pipeline.edges, *self.pipeline.clouds]:
            key = [node.name, node.tier]
            up.add_metric(key, 1.0 if node.health.healthy else 0.0)
            breaker = getattr(node, "breaker", None)
            remaining = breaker.cooldown_remaining() if breaker is not None else 0.0
            cooldown.add_metric(key, remaining)
            failures.add_metric(key, node.health.consecutive_failures)
            node_load = getattr(node, "load", None)
            load.add_metric(key, node_load() if callable(node_load) else 0.0)
        yield from (up, cooldown, failures, load)

    def _budgets(self) -> Iterator[Metric]:
        if not self.state.budgets:
            return
        labels = ["tenant", "window", "unit"]
        remaining = GaugeMetricFamily(
            "tidegate_budget_remaining",
            "What a tenant may still spend in the current window.",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "tidegate_budget_limit", "A tenant's limit per window.", labels=labels
        )
        for usage in self.state.budgets:
            key = [usage.tenant or NO_TENANT, usage.window, usage.unit]
            remaining.add_metric(key, usage.remaining)
            limit.add_metric(key, usage.limit)
        yield remaining
        yield limit


class MetricsServer:
    """A minimal HTTP/1.1 server for ``GET /metrics`` on the event loop."""

    def __init__(self, metrics: RouterMetrics, server: asyncio.Server) -> None:
        self.metrics = metrics
        self._server = server
        sock = server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PATH}"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def _handle(
    metrics: RouterMetrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        if len(head) > MAX_REQUEST_HEAD:
            raise ValueError("request head too large")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        extra = ""
        if path != PATH:
            status, body, content_type = "404 Not Found", b"not found: try /metrics\n", "text/plain"
        elif method not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"GET only\n", "text/plain"
            extra = "Allow: GET, HEAD\r\n"
        else:
            body, content_type = await metrics.render(headers.get("accept", ""))
            status = "200 OK"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        if method != "HEAD":
            writer.write(body)
        await writer.drain()
    except (
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ValueError,
        ConnectionError,
    ):
        pass  # a broken or idle client: drop the connection
    finally:
        writer.close()


async def serve_metrics(metrics: RouterMetrics, settings: MetricsSettings) -> MetricsServer:
    """Serve ``metrics`` on ``settings.host:settings.port`` (ConfigError when it cannot bind)."""
    try:
        server = await asyncio.start_server(
            lambda r, w: _handle(metrics, r, w),
            settings.host,
            settings.port,
            limit=MAX_REQUEST_HEAD,
        )
    except OSError as exc:
        raise ConfigError(
            f"metrics.port {settings.port} on {settings.host}: cannot serve metrics "
            f"({exc.strerror}); choose another metrics.port (0: any free port) "
            "or set metrics.enabled: false"
        ) from exc
    running = MetricsServer(metrics, server)
    log.info("metrics on %s", running.url)
    return running
