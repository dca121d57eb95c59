"""The router's list of edges: the ones in the config file, then registered ones.

``EdgeDirectory.nodes`` is *the* list the pipeline asks (``Pipeline.edges``):
config edges first, in config order, then every edge with a live lease in the
registry (``router.registry``). The directory keeps it in step with the
registry: ``refresh`` (after every Register/Deregister here, and every
``registry.refresh_interval_s`` for leases written by other replicas or
expired) adds a client for a new edge, updates the load an edge reported, and
removes edges whose lease is gone. It mutates the list in place, on the event
loop, so code holding the list sees registered edges without knowing about the
registry.

A removed edge's client is closed once the calls already sent to it finish
(or after its timeout), never under a running request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from router.nodes import NodeClient
from router.registry import EdgeRecord, RegistryStore

log = logging.getLogger(__name__)

RETIRE_POLL_S = 0.05


def least_loaded(nodes: list[NodeClient]) -> list[NodeClient]:
    """Healthy first, then by load ((reported + own in-flight) / capacity).

    The sort is stable, so equal loads keep config order (config edges before
    registered ones): a single idle edge is always asked first.
    """
    return sorted(nodes, key=lambda n: (not n.health.healthy, n.load()))


class EdgeDirectory:
    def __init__(
        self,
        nodes: list[NodeClient],
        store: RegistryStore | None,
        make_client: Callable[[EdgeRecord], NodeClient],
        refresh_interval_s: float = 1.0,
    ) -> None:
        self.nodes = nodes  # shared with the pipeline; mutated in place
        self.store = store
        self._make_client = make_client
        self._refresh_interval_s = refresh_interval_s
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], NodeClient] = {}

    def start(self) -> None:
        """Begin re-reading the registry in the background (needs a running loop)."""
        if self.store is not None and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._refresh_loop(), name="edge-directory")

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last known edges and retry
                log.warning("edge registry unreadable, keeping the last known edges: %s", exc)
            await asyncio.sleep(self._refresh_interval_s)

    async def refresh(self) -> None:
        """Bring ``nodes`` in step with the registry's live leases."""
        if self.store is None:
            return
        # Read and apply under one lock: two refreshes (the background loop's, a
        # Register's) must not apply an older snapshot after a newer one, which would
        # drop an edge that just registered until the next refresh.
        async with self._lock:
            records = {r.name: r for r in await self.store.live()}
            for node in [n for n in self.nodes if n.registered]:
                record = records.get(node.name)
                if record is None or record.address != node.address:
                    self.nodes.remove(node)
                    self._retire(node)
                    log.info(
                        "edge %s at %s %s",
                        node.name,
                        node.address,
                        "moved" if record is not None else "left (deregistered or silent)",
                    )
            present = {n.name: n for n in self.nodes if n.registered}
            for record in records.values():
                current = present.get(record.name) or self._add(record)
                if current is not None:
                    self._apply(current, record)

    def _add(self, record: EdgeRecord) -> NodeClient | None:
        if any(n.name == record.name for n in self.nodes):
            return None  # a config node's name: the servicer refuses these
        node = self._make_client(record)
        self.nodes.append(node)
        log.info(
            "edge %s registered at %s (%s, capacity %d)",
            record.name,
            record.address,
            record.model or "model unknown",
            record.capacity,
        )
        return node

    def _apply(self, node: NodeClient, record: EdgeRecord) -> None:
        node.capacity = max(1, record.capacity)
        node.reported_load = record.in_flight + record.queued
        node.heartbeat_at = record.heartbeat_at
        if record.model and not node.health.model:
            node.health.model = record.model

    def heard_from(self, name: str, in_flight: int, queued: int, at: float) -> None:
        """A heartbeat reached this replica: use its load now, not at the next refresh."""
        for node in self.nodes:
            if node.registered and node.name == name:
                node.reported_load = in_flight + queued
                node.heartbeat_at = at

    def _retire(self, node: NodeClient) -> None:
        async def close_when_idle() -> None:
            waited = 0.0
            while node.in_flight > 0 and waited < node.timeout_s:
                await asyncio.sleep(RETIRE_POLL_S)
                waited += RETIRE_POLL_S
            await node.close()

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._retiring[task] = node
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def close(self) -> None:
        """Stop refreshing and close the registered edges' clients (config
        edges belong to the pipeline) and the store."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for task, retired in list(self._retiring.items()):
            task.cancel()
            await retired.close()
        for node in [n for n in self.nodes if n.registered]:
            self.nodes.remove(node)
            await node.close()
        if self.store is not None:
            await self.store.close()
