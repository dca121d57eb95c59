"""Wiring an edge node: model backend + estimator + limits → a running ModelNode server."""

from __future__ import annotations

import asyncio
import logging

from edge_node.estimators_registry import edge_estimator
from edge_node.settings import EdgeSettings
from tidegate.backend import ModelBackend
from tidegate.node_servicer import ModelNodeServicer, NodeLimits
from tidegate.server import RunningServer, start_server

log = logging.getLogger(__name__)


def build_edge_servicer(
    settings: EdgeSettings, backend: ModelBackend | None = None
) -> ModelNodeServicer:
    """The edge ModelNodeServicer; loads the model from ``settings.model`` unless given one.

    Loading is synchronous (seconds); inside an event loop prefer ``serve_edge``.
    """
    if backend is None:
        from tidegate.inference import load_backend

        backend = load_backend(settings.model)
    return ModelNodeServicer(
        backend,
        role="edge",
        estimator=edge_estimator(settings.estimator, backend, settings.estimator_options),
        limits=NodeLimits(
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
        ),
    )


async def serve_edge(settings: EdgeSettings, backend: ModelBackend | None = None) -> RunningServer:
    """Load the model (off the loop), start the edge node on ``settings.listen``.

    A model loaded here is closed again when the node cannot start (an unusable
    estimator, a port it cannot bind): its workers and any background compile of
    its decode step would otherwise outlive the failure. A given ``backend`` stays
    the caller's."""
    loaded = backend is None
    if backend is None:
        from tidegate.inference import load_backend

        backend = await asyncio.to_thread(load_backend, settings.model)
    try:
        if settings.registration is not None:  # the edge agent: register + Router API on device
            from edge_node.agent import serve_edge_agent

            return await serve_edge_agent(settings, backend)
        servicer = build_edge_servicer(settings, backend)
        running = await start_server([servicer.service()], settings.listen, settings.tls)
    except BaseException:
        if loaded:
            await backend.close()
        raise
    info = backend.info
    log.info(
        "edge node %s (%s, estimator %s) on %s",
        info.model,
        info.quantization,
        _describe(servicer.estimator),
        running.address,
    )
    return running


def _describe(estimator: object) -> str:
    """The estimator actually served (after any fallback); for gain, the cloud model its
    cloud head was fitted for: the head means nothing for another cloud."""
    if estimator is None:
        return "none"
    name = str(getattr(estimator, "name", estimator))
    cloud = getattr(estimator, "cloud", None)
    return f"{name}, cloud head fitted for {cloud.predicts}" if cloud is not None else name
