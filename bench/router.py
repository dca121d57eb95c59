"""Router overhead side by side: cache hits, a pass-through, and a bare gRPC echo.

    python bench/router.py [--requests 4000] [--memory-requests 100000]

One server process runs every target; this process is the load generator
(grpc.aio, one channel per target, N concurrent callers). Targets:

* ``bare grpc.aio echo``: a bare ``grpc.aio.server()`` answering the Router's
  Generate with the question as text — the floor for a Python gRPC service on
  this machine (same messages, no router);
* ``router, cache hit (embedded)`` and ``router, cache hit (Redis)``: the
  router answering from its in-process cache / the real Redis at
  127.0.0.1:6379 (warmed with one request);
* ``router → trivial model node``: the cache off, every request routed to a
  real ModelNode gRPC server (in the server process) whose backend echoes the
  question as a one-token answer — the router's pass-through cost, one extra
  gRPC hop included.

Routers run as configured by default except: no OpenAI HTTP endpoint, no edge
registry, metrics on (port 0), logging at WARNING (no per-request access log).
Then the memory check: RSS of the server process before and after
``--memory-requests`` requests through the embedded-cache router, with
questions and tenants cycling so the cache fills up, evicts, and the tenant
label cap is reached. Numbers drift with other work on the machine: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

# `python bench/router.py` puts bench/ first on sys.path, where this file would
# shadow the `router` package: import from the repository root instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

from tidegate.backend import BackendInfo, Generation  # noqa: E402
from tidegate.chat import FinishReason, GenerationRequest  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
CONCURRENCY = (1, 16, 64)
QUESTION = "What is the capital of France?"


# -- the server process -----------------------------------------------------------


class EchoBackend:
    """A ModelBackend that answers at once: the question back, one token."""

    info = BackendInfo(model="echo@bench", context_length=4096, quantization="none", backend="echo")

    async def generate(self, request: GenerationRequest) -> Generation:
        text = request.messages[-1].content
        return Generation(text, [1], [0.0], None, FinishReason.STOP, 1, self.info.model)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        yield await self.generate(request)

    async def close(self) -> None:
        pass


async def _serve(conn, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from router.service import serve_router
    from router.settings import RouterSettings
    from tidegate.node_servicer import ModelNodeServicer, NodeLimits
    from tidegate.server import start_server
    from tidegate.v1 import router_pb2, router_pb2_grpc

    class Echo(router_pb2_grpc.RouterServicer):
        async def Generate(self, request, context):  # type: ignore[no-untyped-def]
            return router_pb2.GenerateResponse(
                text=request.messages[-1].content, request_id=request.request_id
            )

    echo = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(Echo(), echo)
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    node = ModelNodeServicer(EchoBackend(), "cloud", None, NodeLimits(1, 16))
    node_server = await start_server([node.service()], "127.0.0.1:0")

    def router(**cache):  # type: ignore[no-untyped-def]
        return RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "edge": [],
                "cloud": [{"name": "node", "address": node_server.address}],
                "policy": {"default_max_new_tokens": 1},
                "cache": cache,
                "http": {"enabled": False},
                "registry": {"enabled": False},
                "metrics": {"port": 0},
            }
        )

    routers = {
        "embedded": await serve_router(router()),
        "redis": await serve_router(router(url=REDIS_URL, key_prefix=redis_prefix)),
        "pass": await serve_router(router(enabled=False)),
    }
    conn.send({"echo": f"127.0.0.1:{echo_port}", **{k: r.address for k, r in routers.items()}})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    for server in routers.values():
        await server.stop(0)
    await node_server.stop(0)
    await echo.stop(0)


def serve(conn, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn, redis_prefix))


# -- the load generator -----------------------------------------------------------


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    rps: float


def _request(question: str = QUESTION, tenant: str = "bench"):  # type: ignore[no-untyped-def]
    from tidegate.client import build_request

    return build_request(question, tenant=tenant)


async def _batch(stub, request, concurrency: int, total: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """``total`` calls from ``concurrency`` callers: latencies (s) and requests/s."""
    latencies: list[float] = []

    async def caller(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            await stub.Generate(request, timeout=30)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(max(1, total // concurrency)) for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started)


async def measure(
    addresses: dict[str, str], concurrency: int, total: int, rounds: int
) -> dict[str, Result]:
    """Every target at one concurrency, interleaved: ``rounds`` rounds, each
    running every target in turn (rotated), so a burst of other work on the
    machine hits all targets alike. Requests/s: the median round."""
    import grpc

    from tidegate.v1 import router_pb2_grpc

    keys = [key for _, key in TARGETS]
    request = _request()
    channels = {k: grpc.aio.insecure_channel(addresses[k]) for k in keys}
    stubs = {k: router_pb2_grpc.RouterStub(c) for k, c in channels.items()}
    latencies: dict[str, list[float]] = {k: [] for k in keys}
    rates: dict[str, list[float]] = {k: [] for k in keys}
    try:
        for key in keys:  # warm-up: connections, caches, code paths
            await _batch(stubs[key], request, concurrency, 300)
        for round_ in range(rounds):
            for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
                lat, rate = await _batch(stubs[key], request, concurrency, total // rounds)
                latencies[key] += lat
                rates[key].append(rate)
    finally:
        for channel in channels.values():
            await channel.close()
    results = {}
    for key in keys:
        lat = sorted(latencies[key])
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        results[key] = Result(
            statistics.median(lat) * 1000, p99 * 1000, statistics.median(rates[key])
        )
    return results


async def memory_run(address: str, pid: int, total: int) -> list[tuple[int, float]]:
    """RSS of the server process at checkpoints over ``total`` varied requests."""
    import grpc

    from tidegate.v1 import router_pb2_grpc

    checkpoints = [(0, _rss_mb(pid))]
    marks = {total // 5, total}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        done = 0

        async def caller(offset: int, stride: int) -> None:
            nonlocal done
            for i in range(offset, total, stride):
                # 50,000 distinct questions × 250 tenants: the cache (10,000
                # entries) fills and evicts; tenant labels reach their cap (100).
                request = _request(f"Question {i % 50_000}?", tenant=f"tenant-{i % 250}")
                await stub.Generate(request, timeout=30)
                done += 1
                if done in marks:
                    checkpoints.append((done, _rss_mb(pid)))

        await asyncio.gather(*(caller(k, 16) for k in range(16)))
    return checkpoints


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


async def _clean_redis(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


TARGETS = [  # (label, address key)
    ("bare grpc.aio echo", "echo"),
    ("router, cache hit (embedded)", "embedded"),
    ("router, cache hit (Redis)", "redis"),
    ("router → trivial model node", "pass"),
]


async def run(args: argparse.Namespace, addresses: dict[str, str], pid: int) -> None:
    results: dict[tuple[str, int], Result] = {}
    for concurrency in CONCURRENCY:
        measured = await measure(addresses, concurrency, args.requests, args.rounds)
        results.update({(key, concurrency): r for key, r in measured.items()})
    print(f"\n{'target':32} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
          f"{'p50 − echo':>11} {'req/s ÷ echo':>13}")  # fmt: skip
    for concurrency in CONCURRENCY:
        echo = results["echo", concurrency]
        for label, key in TARGETS:
            r = results[key, concurrency]
            print(
                f"{label:32} {concurrency:>4} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.rps:8.0f} "
                f"{r.p50_ms - echo.p50_ms:+10.3f}  {r.rps / echo.rps:12.2f}"
            )
    echo1, hit1, redis1 = (results[k, 1] for k in ("echo", "embedded", "redis"))
    worst = min(results["embedded", c].rps / results["echo", c].rps for c in CONCURRENCY)
    print("\ntargets:")
    print(f"  cache-hit throughput ≥ 50% of bare echo: worst {worst:.0%} "
          f"→ {'met' if worst >= 0.5 else 'NOT met'}")  # fmt: skip
    added = hit1.p50_ms - echo1.p50_ms
    print(f"  added p50 ≤ 0.5 ms (cache hit vs echo, concurrency 1): {added:.3f} ms "
          f"→ {'met' if added <= 0.5 else 'NOT met'}")  # fmt: skip
    redis_added = redis1.p50_ms - hit1.p50_ms
    print(f"  Redis hit adds ≤ 1 ms p50 over embedded (concurrency 1): {redis_added:.3f} ms "
          f"→ {'met' if redis_added <= 1.0 else 'NOT met'}")  # fmt: skip
    if args.memory_requests:
        checkpoints = await memory_run(addresses["embedded"], pid, args.memory_requests)
        print(f"\nmemory (server process RSS; {args.memory_requests:,} requests, 50,000 "
              "questions × 250 tenants through the embedded-cache router):")  # fmt: skip
        for done, rss in checkpoints:
            print(f"  after {done:>7,} requests: {rss:7.1f} MB")
        (_, after_fill), (_, end) = checkpoints[-2], checkpoints[-1]
        print(f"  growth after the cache filled ({checkpoints[-2][0]:,} → {done:,}): "
              f"{end - after_fill:+.1f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000, help="per target and concurrency")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per concurrency")
    parser.add_argument("--memory-requests", type=int, default=100_000, help="0: skip")
    args = parser.parse_args()
    prefix = f"tidegate-bench:{uuid.uuid4().hex}:"
    print(f"load average before: {_load()}  (2 cores shared; client and servers: 1 process each)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child, prefix), daemon=True)
    server.start()
    try:
        addresses = parent.recv()
        asyncio.run(run(args, addresses, server.pid))
    finally:
        parent.send("stop")
        server.join(30)
        asyncio.run(_clean_redis(prefix))
    print(f"load average after:  {_load()}")


if __name__ == "__main__":
    main()
