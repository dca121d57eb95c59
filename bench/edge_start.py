"""Warm start of a real edge node: process spawn → health SERVING → first answer.

    python bench/edge_start.py [--runs 5] [--config edge.yaml]

Starts ``tidegate edge serve`` (the default edge: SmolLM2-135M int4 with the
compiled step) as a fresh process, first makes every cache it reads
(converted model, quantized weights, compiled step) and starts it once, then times ``--runs``
warm starts: the whole process start (interpreter, imports, model from the
caches, gRPC server) until the standard health check says SERVING, and until
the first answer. Prints one row per run and the median.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_start(config: Path | None, port: int) -> tuple[float, float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tidegate.v1 import common_pb2, model_node_pb2, model_node_pb2_grpc

    folder = Path(tempfile.mkdtemp(prefix="tidegate-start-"))
    path = folder / "edge.yaml"
    text = config.read_text() if config else ""
    path.write_text(f"{text}\nlisten: 127.0.0.1:{port}\n")
    started = time.perf_counter()
    exe = Path(sys.executable).with_name("tidegate")
    process = subprocess.Popen(
        [str(exe), "edge", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # gRPC backs off ~1 s after a refused connection; poll every 20 ms instead
        fast_retry = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 20),
        ]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=fast_retry)
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the edge node exited with {process.returncode}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.02)
        serving = time.perf_counter() - started
        node = model_node_pb2_grpc.ModelNodeStub(channel)
        node.Generate(
            model_node_pb2.NodeGenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="Hi!")],
                sampling=common_pb2.SamplingParams(max_new_tokens=8),
            ),
            timeout=60,
        )
        answered = time.perf_counter() - started
        channel.close()
        return serving, answered
    finally:
        process.terminate()
        process.wait(timeout=30)


def _prime(config: Path | None) -> None:
    """Make every cache the node reads, the compiled step included: a node starting
    without it serves at once and compiles in a child process that outlives it, which
    would run (and compete for the CPU) during the timed starts."""
    command = [sys.executable, __file__, "--prime", *(["--config", str(config)] if config else [])]
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit("could not make the edge model's caches (compiled step)")


def _load_and_compile(config: Path | None) -> int:
    """``--prime``, in its own process: load the node's model, wait for its compiled step."""
    from edge_node.settings import EdgeSettings
    from tidegate.config import load_config
    from tidegate.inference.prepare import load_backend

    backend = load_backend(load_config(EdgeSettings, config).model)
    return 0 if backend.decoder is None or backend.wait_compiled(1800) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", type=Path, help="edge YAML (default: built-in defaults)")
    parser.add_argument("--prime", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prime:
        sys.exit(_load_and_compile(args.config))
    _prime(args.config)
    _one_start(args.config, _free_port())  # first-start effects (page cache) out of the way
    rows = [_one_start(args.config, _free_port()) for _ in range(args.runs)]
    print(f"{'run':>4} {'SERVING s':>10} {'first answer s':>15}")
    for i, (serving, answered) in enumerate(rows, 1):
        print(f"{i:>4} {serving:>10.2f} {answered:>15.2f}")
    print(
        f"{'median':>4} {statistics.median(r[0] for r in rows):>10.2f} "
        f"{statistics.median(r[1] for r in rows):>15.2f}   (load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + ")"
    )


if __name__ == "__main__":
    main()
