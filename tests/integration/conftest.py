"""Fixtures for the integration tests.

- ``stack``: a ``tests.support.stack.Stack`` for the test; the nodes and routers
  it started stop when the test ends.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from tests.support.stack import Stack


@pytest.fixture
async def stack():
    async with AsyncExitStack() as exits:
        yield Stack(exits)
