"""Shared fixtures. Real gRPC ModelNode servers over tiny random models (port 0).

- ``tiny_edge_node``: role "edge", estimator seq_prob, default 16 new tokens.
- ``tiny_cloud_node``: role "cloud", no estimator, seed 1 (answers differ from the edge).
Both yield a ``tidegate.server.RunningServer``; connect to ``server.address``.
"""

from __future__ import annotations

import pytest

from tests.support.tiny_models import start_tiny_node


@pytest.fixture
async def tiny_edge_node():
    server, backend = await start_tiny_node("edge", seed=0, estimator="seq_prob")
    yield server
    await server.stop(0)
    await backend.close()


@pytest.fixture
async def tiny_cloud_node():
    server, backend = await start_tiny_node("cloud", seed=1, estimator=None)
    yield server
    await server.stop(0)
    await backend.close()


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: these errors must come before any model loads."""
    from tidegate.evaluation import runner

    def refuse(*_args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "_load_edge", refuse)
    monkeypatch.setattr(runner, "_load_cloud", refuse)
