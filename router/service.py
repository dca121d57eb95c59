"""Build and serve the router: what `tidegate up` / `tidegate router` call.

settings = load_router_settings("router.yaml")
server = await serve_router(settings)      # RouterServer (a RunningServer)
...
await server.stop()                        # stops gRPC, closes channels and Redis
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from router.cache import RedisCache, open_cache
from router.nodes import NodeClient
from router.pipeline import Pipeline
from router.servicer import RouterServicer
from router.settings import RouterSettings
from tidegate.errors import ConfigError
from tidegate.server import GRACE_SECONDS, RunningServer, start_server

log = logging.getLogger(__name__)


def build_router(settings: RouterSettings) -> RouterServicer:
    """A RouterServicer wired to the configured nodes and cache.

    Connects nothing yet (channels and Redis open on first use), so it may be
    called outside an event loop. Close it with ``await servicer.close()``.
    """
    edges = [NodeClient(t.name, t.address, "edge", t.timeout_s) for t in settings.edge]
    clouds = [NodeClient(t.name, t.address, "cloud", t.timeout_s) for t in settings.cloud]
    pipeline = Pipeline(settings, edges, clouds, open_cache(settings.cache))
    return RouterServicer(pipeline)


@dataclass
class RouterServer(RunningServer):
    """A running router; ``stop`` also closes node channels and the cache."""

    servicer: RouterServicer | None = None

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        try:
            await super().stop(grace)
        finally:
            if self.servicer is not None:
                await self.servicer.close()


async def serve_router(settings: RouterSettings) -> RouterServer:
    """Serve the Router service on ``settings.listen`` (health + reflection).

    A configured Redis must answer a PING first: a wrong cache.url fails at
    startup, not as a silent miss on every request. Raises ConfigError then.
    """
    servicer = build_router(settings)
    try:
        cache = servicer.pipeline.cache
        if isinstance(cache, RedisCache):
            try:
                await cache.ping()
            except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
                raise ConfigError(
                    f"cache.url {settings.cache.url}: Redis did not answer ({exc})"
                ) from exc
        running = await start_server([servicer.service()], settings.listen)
    except BaseException:
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
    )
