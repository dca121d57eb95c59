"""Build and serve the router: what `tidegate up` / `tidegate router` call.

settings = load_router_settings("router.yaml")
server = await serve_router(settings)      # RouterServer (a RunningServer)
...
await server.stop()                        # stops gRPC, closes channels and Redis
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from router.budgets import RedisBudgetStore
from router.cache import RedisCache, open_cache
from router.metrics import MetricsServer, RouterMetrics, serve_metrics
from router.nodes import NodeClient
from router.pipeline import Pipeline
from router.registry import EdgeRecord
from router.registry_servicer import RegistryServicer, build_registry
from router.reload import Reloader
from router.servicer import RouterServicer
from router.settings import RouterSettings
from tidegate.errors import ConfigError
from tidegate.server import GRACE_SECONDS, RunningServer, start_server
from tidegate.tls import channel_credentials

if TYPE_CHECKING:
    from router.openai_http import HttpServer

log = logging.getLogger(__name__)


def build_router(settings: RouterSettings) -> RouterServicer:
    """A RouterServicer wired to the configured nodes and cache.

    Connects nothing yet (channels and Redis open on first use), so it may be
    called outside an event loop. Close it with ``await servicer.close()``.
    """
    tls = settings.tls.nodes
    edges = [
        NodeClient(t.name, t.address, "edge", t.timeout_s, tls, t.expected_latency_s)
        for t in settings.edge
    ]
    clouds = [
        NodeClient(t.name, t.address, "cloud", t.timeout_s, tls, t.expected_latency_s)
        for t in settings.cloud
    ]
    pipeline = Pipeline(settings, edges, clouds, open_cache(settings.cache))
    if settings.metrics.enabled:
        pipeline.metrics = RouterMetrics(settings.metrics)
        pipeline.metrics.watch(pipeline)
    return RouterServicer(pipeline)


async def _load_semantic(settings: RouterSettings, pipeline: Pipeline) -> None:
    """Load the embedding model (seconds, off the event loop) when semantic
    matching is on; a missing package or model fails the startup."""
    semantic = settings.cache.semantic
    if settings.cache.enabled and semantic.enabled:
        from router.semantic_cache import SemanticIndex

        pipeline.cache_gate.semantic = await SemanticIndex.load(semantic, settings.cache.ttl_s)


async def _serve_metrics(
    settings: RouterSettings, servicer: RouterServicer
) -> MetricsServer | None:
    metrics = servicer.pipeline.metrics
    if metrics is None:
        return None
    return await serve_metrics(metrics, settings.metrics)


def _registry(settings: RouterSettings, pipeline: Pipeline) -> RegistryServicer | None:
    """The edge registry (when enabled): registered edges join ``pipeline.edges``."""
    if not settings.registry.enabled:
        return None

    def registered_edge(record: EdgeRecord) -> NodeClient:
        # Dialled like the config edges; its timeout comes from the registry settings.
        timeout = settings.registry.edge_timeout_s
        client = NodeClient(record.name, record.address, "edge", timeout, settings.tls.nodes)
        client.breaker.settings = pipeline.settings.breaker
        return client

    store, url = settings.registry_store
    reserved = {t.name for t in settings.edge} | {t.name for t in settings.cloud}
    return build_registry(settings.registry, store, url, pipeline.edges, reserved, registered_edge)


@dataclass
class RouterServer(RunningServer):
    """A running router; ``stop`` also stops the HTTP endpoint and closes node
    channels and the cache."""

    servicer: RouterServicer | None = None
    registry: RegistryServicer | None = None  # the edge registry, when enabled
    http: HttpServer | None = None  # the OpenAI-compatible endpoint, when enabled
    metrics: MetricsServer | None = None  # the Prometheus endpoint, when enabled
    reloader: Reloader | None = None  # hot reload of the config file, when it has one

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` (None: metrics disabled)."""
        return self.metrics.url if self.metrics is not None else None

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of the OpenAI-compatible endpoint (None: disabled)."""
        return self.http.url if self.http is not None else None

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        try:
            stops = [super().stop(grace)]
            if self.http is not None:
                stops.append(self.http.stop(grace))
            await asyncio.gather(*stops)
        finally:
            if self.reloader is not None:
                await self.reloader.stop()
            if self.metrics is not None:
                await self.metrics.stop()
            if self.registry is not None:
                await self.registry.close()
            if self.servicer is not None:
                await self.servicer.close()


async def _serve_http(settings: RouterSettings, servicer: RouterServicer) -> HttpServer | None:
    """The OpenAI-compatible endpoint over the servicer's pipeline, when enabled."""
    if not settings.http.enabled:
        return None
    try:  # the `router` extra; a router without it can still serve gRPC
        from router.openai_http import serve_http
    except ImportError as exc:
        raise ConfigError(
            f"http.enabled: the OpenAI-compatible endpoint needs {exc.name}: "
            "pip install 'tidegate[router]', or set http.enabled: false"
        ) from exc
    return await serve_http(servicer.pipeline, settings.http, settings.tls.server)


async def serve_router(
    settings: RouterSettings, config_path: str | Path | None = None
) -> RouterServer:
    """Serve the Router service on ``settings.listen`` (health + reflection).

    A configured Redis must answer a PING first: a wrong cache.url fails at
    startup, not as a silent miss on every request. Raises ConfigError then.
    ``config_path``: the file ``settings`` came from; the returned server's
    ``reloader`` reloads it (the CLI wires SIGHUP to it; ``reload.watch_file``
    also watches it).
    """
    servicer = build_router(settings)
    registry: RegistryServicer | None = None
    try:
        registry = _registry(settings, servicer.pipeline)
        if registry is not None:
            await registry.ping()
        cache = servicer.pipeline.cache_gate.cache
        if isinstance(cache, RedisCache):
            try:
                await cache.ping()
            except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
                raise ConfigError(
                    f"cache.url {settings.cache.url}: Redis did not answer ({exc})"
                ) from exc
        await _check_guards(settings, servicer.pipeline)
        await _load_semantic(settings, servicer.pipeline)
        services = [servicer.service()] + ([registry.service()] if registry else [])
        running = await start_server(services, settings.listen, settings.tls.server, "tls.server")
        if registry is not None:
            registry.directory.start()
        http: HttpServer | None = None
        try:
            http = await _serve_http(settings, servicer)
            metrics = await _serve_metrics(settings, servicer)
        except BaseException:
            if http is not None:
                await http.stop(0)
            await running.stop(0)
            raise
    except BaseException:
        if registry is not None:
            await registry.close()
        await servicer.close()
        raise
    log.info(
        "router serving on %s (policy %s; %d edge, %d cloud nodes; cache %s)",
        running.address,
        settings.policy.version,
        len(settings.edge),
        len(settings.cloud),
        "off" if not settings.cache.enabled else (settings.cache.url or "in-process"),
    )
    return RouterServer(
        server=running.server,
        port=running.port,
        host=running.host,
        health=running.health,
        servicer=servicer,
        http=http,
        registry=registry,
        metrics=metrics,
        reloader=_reloader(settings, servicer.pipeline, config_path),
    )


async def _check_guards(settings: RouterSettings, pipeline: Pipeline) -> None:
    """Fail at startup, naming the field: unreadable node TLS files, or a budget
    Redis that does not answer (when budgets are in use or it is named)."""
    if settings.tls.nodes is not None:
        channel_credentials(settings.tls.nodes, "tls.nodes")
    store = pipeline.budgets.store
    budgets = settings.budgets
    limited = budgets.tenants or any(v is not None for v in budgets.default.model_dump().values())
    if isinstance(store, RedisBudgetStore) and (limited or budgets.url):
        try:
            await store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            raise ConfigError(
                f"budgets: the budget store Redis ({budgets.url or settings.cache.url}, "
                f"from {'budgets.url' if budgets.url else 'cache.url'}) did not answer ({exc})"
            ) from exc


def _reloader(
    settings: RouterSettings, pipeline: Pipeline, config_path: str | Path | None
) -> Reloader | None:
    if config_path is None:
        return None
    reloader = Reloader(config_path, pipeline)
    if settings.reload.watch_file:
        reloader.start_watch(settings.reload.poll_s)
    return reloader
