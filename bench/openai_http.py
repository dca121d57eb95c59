"""The OpenAI-compatible HTTP endpoint beside gRPC: what the HTTP front door costs.

    python bench/openai_http.py [--requests 2000]

One server process runs two routers on one trivial model node (the echo
backend of bench/router.py: the question back as a one-token answer); this
process is the load generator. Both routers serve gRPC and HTTP on the same
pipeline, so each row pair differs only in the front door:

* ``cache hit``: the router with its in-process cache, warmed by one request;
* ``→ trivial model node``: the cache off, every request routed to the node
  (one extra gRPC hop);

each asked over gRPC (grpc.aio, one channel) and over HTTP (a minimal
keep-alive HTTP/1.1 client, one connection per caller, unary
``POST /v1/chat/completions``), with N concurrent callers. Numbers drift
with other work on the machine: the load average is printed before and
after; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

# `python bench/openai_http.py` puts bench/ first on sys.path, where bench/router.py
# would shadow the `router` package: import from the repository root instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

from bench.router import QUESTION, EchoBackend, _load  # noqa: E402

CONCURRENCY = (1, 16)


# -- the server process -----------------------------------------------------------


async def _serve(conn) -> None:  # type: ignore[no-untyped-def]
    from router.service import serve_router
    from router.settings import RouterSettings
    from tidegate.node_servicer import ModelNodeServicer, NodeLimits
    from tidegate.server import start_server

    node = ModelNodeServicer(EchoBackend(), "cloud", None, NodeLimits(1, 16))
    node_server = await start_server([node.service()], "127.0.0.1:0")

    def settings(cache: bool) -> RouterSettings:
        return RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "http": {"listen": "127.0.0.1:0"},
                "edge": [],
                "cloud": [{"name": "node", "address": node_server.address}],
                "policy": {"default_max_new_tokens": 1},
                "cache": {"enabled": cache},
                "registry": {"enabled": False},
                "metrics": {"enabled": False},
            }
        )

    routers = {
        "hit": await serve_router(settings(True)),
        "pass": await serve_router(settings(False)),
    }
    conn.send({k: (r.address, r.http_url) for k, r in routers.items()})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    for server in routers.values():
        await server.stop(0)
    await node_server.stop(0)


def serve(conn) -> None:  # type: ignore[no-untyped-def]
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn))


# -- the load generator -----------------------------------------------------------


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    rps: float


async def timed(
    connect: Callable[[], Awaitable[Callable[[], Awaitable[None]]]], concurrency: int, total: int
) -> Result:
    """``connect()`` opens one caller's connection and returns its request function."""
    latencies: list[float] = []

    async def caller(n: int) -> None:
        call = await connect()
        for _ in range(100):  # warm up: connections, caches, code paths
            await call()
        for _ in range(n):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(max(1, total // concurrency)) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return Result(statistics.median(latencies) * 1000, p99 * 1000, len(latencies) / wall)


async def over_grpc(address: str, concurrency: int, total: int) -> Result:
    import grpc

    from tidegate.client import build_request
    from tidegate.v1 import router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = build_request(QUESTION, tenant="bench")

        async def call() -> None:
            await stub.Generate(request, timeout=30)

        async def connect() -> Callable[[], Awaitable[None]]:
            return call  # one HTTP/2 channel multiplexes every caller

        return await timed(connect, concurrency, total)


async def over_http(url: str, concurrency: int, total: int) -> Result:
    """A minimal HTTP/1.1 keep-alive client per caller (asyncio streams): httpx
    itself tops out near 300 requests/s on this machine, below the server."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(
        {
            "model": "tidegate",
            "messages": [{"role": "user", "content": QUESTION}],
            "tidegate": {"tenant": "bench"},
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    ) + body
    writers = []

    async def connect() -> Callable[[], Awaitable[None]]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)

        async def call() -> None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)

        return call

    try:
        return await timed(connect, concurrency, total)
    finally:
        for writer in writers:
            writer.close()


async def run(args: argparse.Namespace, routers: dict[str, tuple[str, str]]) -> None:
    rows = []
    for key, label in (("hit", "cache hit"), ("pass", "→ trivial model node")):
        grpc_address, http_url = routers[key]
        for concurrency in CONCURRENCY:
            grpc_result = await over_grpc(grpc_address, concurrency, args.requests)
            http_result = await over_http(http_url, concurrency, args.requests)
            rows.append((label, concurrency, grpc_result, http_result))
    print(f"\n{'router':22} {'conc':>4} {'front':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}"
          f" {'p50 HTTP−gRPC':>14} {'req/s HTTP÷gRPC':>16}")  # fmt: skip
    for label, concurrency, g, h in rows:
        print(
            f"{label:22} {concurrency:>4} {'gRPC':>5} {g.p50_ms:8.3f} {g.p99_ms:8.3f} {g.rps:8.0f}"
        )
        print(
            f"{'':22} {'':>4} {'HTTP':>5} {h.p50_ms:8.3f} {h.p99_ms:8.3f} {h.rps:8.0f}"
            f" {h.p50_ms - g.p50_ms:+13.3f}  {h.rps / g.rps:15.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per target and concurrency")
    args = parser.parse_args()
    print(f"load average before: {_load()}  (2 cores shared; client and servers: 1 process each)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child,), daemon=True)
    server.start()
    try:
        asyncio.run(run(args, parent.recv()))
    finally:
        parent.send("stop")
        server.join(30)
    print(f"load average after:  {_load()}")


if __name__ == "__main__":
    main()
