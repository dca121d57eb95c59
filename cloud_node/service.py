"""Build and serve a cloud node: a ModelNodeServicer (role "cloud") over a backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cloud_node.settings import CloudSettings
from tidegate.backend import ModelBackend
from tidegate.node_servicer import ModelNodeServicer, NodeLimits
from tidegate.server import GRACE_SECONDS, RunningServer, start_server

log = logging.getLogger(__name__)


def build_backend(settings: CloudSettings) -> ModelBackend:
    """The backend ``settings`` names. The openai path imports no torch."""
    if settings.backend == "openai":
        from cloud_node.openai_backend import OpenAIBackend

        assert settings.openai is not None  # CloudSettings validates this
        return OpenAIBackend(settings.openai)
    from tidegate.inference import load_backend  # torch + transformers: only here

    return load_backend(settings.model)


def build_cloud_servicer(settings: CloudSettings) -> ModelNodeServicer:
    """A cloud ModelNodeServicer: no confidence estimator, the configured token limits."""
    return ModelNodeServicer(
        build_backend(settings),
        role="cloud",
        estimator=None,
        limits=NodeLimits(
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
        ),
    )


@dataclass
class CloudServer(RunningServer):
    """A running cloud node; ``stop`` also closes the backend (HTTP client, model)."""

    backend: ModelBackend | None = None

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        try:
            await super().stop(grace)
        finally:
            if self.backend is not None:
                await self.backend.close()


async def serve_cloud(settings: CloudSettings) -> CloudServer:
    """Load the backend and serve it on ``settings.listen`` (with health and reflection).

    The caller owns the server: ``await server.stop()`` stops it gracefully and
    closes the backend.
    """
    servicer = build_cloud_servicer(settings)
    try:
        running = await start_server([servicer.service()], settings.listen, settings.tls)
    except BaseException:
        await servicer.backend.close()
        raise
    info = servicer.backend.info
    log.info("cloud node serving %s (%s) on %s", info.model, info.backend, running.address)
    return CloudServer(
        server=running.server,
        port=running.port,
        host=running.host,
        health=running.health,
        backend=servicer.backend,
    )
