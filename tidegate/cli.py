"""The `tidegate` command line.

Heavy modules (torch, transformers, the node packages) are imported inside the
subcommands that need them, so `tidegate ask` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from tidegate.errors import ConfigError

DEFAULT_ROUTER = "127.0.0.1:50051"
# Packages that come with one role's extra (pyproject.toml): a clear message
# instead of a traceback when that role runs on an install without it.
EXTRA_OF_MODULE = {
    "redis": "router",
    "prometheus_client": "router",
    "starlette": "router",
    "uvicorn": "router",
    "httpx": "cloud-openai",
    "torch": "models",
    "transformers": "models",
    "tokenizers": "models",
    "safetensors": "models",
    "gguf": "models",
    "accelerate": "models",
}


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    from tidegate.logs import configure_logging

    if not verbose:
        # transformers draws a progress bar per weight file; our own log lines say it all.
        os.environ.setdefault("TQDM_DISABLE", "1")
    configure_logging(log_format, logging.DEBUG if verbose else logging.INFO)  # type: ignore[arg-type]


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ---------------------------------------------------------------- serve ----


async def _serve(role: str, config: str | None, args: argparse.Namespace | None = None) -> None:
    from tidegate.config import load_config

    running: list = []
    if role == "edge":
        from edge_node.service import serve_edge
        from edge_node.settings import EdgeSettings

        edge = load_config(EdgeSettings, config, env_prefix="TIDEGATE_EDGE")
        if args is not None and (args.register or args.advertise):
            edge = _with_registration(edge, args.register, args.advertise)
        running.append(await serve_edge(edge))
    elif role == "cloud":
        from cloud_node.service import serve_cloud
        from cloud_node.settings import CloudSettings

        settings = load_config(CloudSettings, config, env_prefix="TIDEGATE_CLOUD")
        running.append(await serve_cloud(settings))
    else:
        from router.service import serve_router
        from router.settings import RouterSettings

        router_settings = load_config(RouterSettings, config, env_prefix="TIDEGATE_ROUTER")
        router = await serve_router(router_settings, config)
        running.append(router)
        if router.reloader is not None and router.reloader.install_sighup():
            print(f"SIGHUP reloads {config}", flush=True)
    print(f"tidegate {role} serving on {running[0].address}", flush=True)
    if getattr(running[0], "http_url", None):  # the router's OpenAI-compatible endpoint
        print(f"OpenAI-compatible API on {running[0].http_url}/v1", flush=True)
    try:
        await _wait_for_signal()
    finally:
        for server in running:
            await server.stop()


def _with_registration(settings, router: str | None, advertise: str | None):  # type: ignore[no-untyped-def]
    """`edge serve --register ROUTER [--advertise HOST:PORT]` over the YAML's `register:`."""
    from pydantic import ValidationError

    from edge_node.agent_settings import RegisterSettings

    current = settings.registration
    data = current.model_dump(exclude_unset=True) if current is not None else {}
    if router:
        data["router"] = router
    if advertise:
        data["advertise"] = advertise
    try:
        registration = RegisterSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'] and e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"--register/--advertise: {problems}") from exc
    return settings.model_copy(update={"registration": registration})


# ------------------------------------------------------------------ up -----


def _local_router_settings(settings, *, edge, cloud, overrides):  # type: ignore[no-untyped-def]
    """``settings`` aimed at the nodes this process started, plus ``overrides``."""
    from router.settings import RouterSettings
    from tidegate.config import merge_dicts

    data = settings.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if edge is not None:
        data["edge"] = [{"name": "edge", "address": edge}]
    if cloud is not None:
        data["cloud"] = [{"name": "cloud", "address": cloud}]
    return RouterSettings.model_validate(merge_dicts(data, overrides))


async def start_local_stack(  # type: ignore[no-untyped-def]
    config_dir: str | None = None, log=print, router_overrides: dict | None = None
):
    """Start cloud, edge and router in this process (the `tidegate up` topology).

    Returns the running servers, router last. Config files `cloud.yaml`,
    `edge.yaml` and `router.yaml` in ``config_dir`` override the defaults.
    Without a `router.yaml`, the router is pointed at the nodes started here,
    wherever they bound (so `listen: 127.0.0.1:0` in the node files works).
    ``router_overrides`` (tests) are merged into the router's settings.
    """
    from pathlib import Path

    from cloud_node.service import serve_cloud
    from cloud_node.settings import CloudSettings
    from edge_node.service import serve_edge
    from edge_node.settings import EdgeSettings
    from router.service import serve_router
    from router.settings import RouterSettings
    from tidegate.config import load_config
    from tidegate.server import RunningServer

    def path(name: str) -> Path | None:
        if config_dir is None:
            return None
        candidate = Path(config_dir) / name
        return candidate if candidate.exists() else None

    cloud_settings = load_config(CloudSettings, path("cloud.yaml"), env_prefix="TIDEGATE_CLOUD")
    edge_settings = load_config(EdgeSettings, path("edge.yaml"), env_prefix="TIDEGATE_EDGE")
    router_settings = load_config(RouterSettings, path("router.yaml"), env_prefix="TIDEGATE_ROUTER")
    servers: list[RunningServer] = []
    try:
        log(f"loading cloud model {cloud_settings.model.source} …")
        servers.append(await serve_cloud(cloud_settings))
        log(f"cloud node ready on {servers[-1].address}")
        edge_model = edge_settings.model
        log(f"loading edge model {edge_model.source} ({edge_model.quantization}) …")
        servers.append(await serve_edge(edge_settings))
        log(f"edge node ready on {servers[-1].address}")
        if path("router.yaml") is None or router_overrides:
            router_settings = _local_router_settings(
                router_settings,
                edge=servers[1].address if path("router.yaml") is None else None,
                cloud=servers[0].address if path("router.yaml") is None else None,
                overrides=router_overrides or {},
            )
        router = await serve_router(router_settings, path("router.yaml"))
        servers.append(router)
        if router.reloader is not None:
            router.reloader.install_sighup()
    except BaseException:
        for server in reversed(servers):
            await server.stop(0)
        raise
    return servers


async def _up(config_dir: str | None) -> None:
    servers = await start_local_stack(config_dir, log=lambda m: print(m, flush=True))
    router = servers[-1]
    print(f"router listening on {router.address}", flush=True)
    print(f"try: tidegate ask --router {router.address} 'What is the capital of France?'")
    if router.http_url:
        print(f"OpenAI-compatible API on {router.http_url}/v1", flush=True)
        print(
            f"try: curl {router.http_url}/v1/chat/completions -H 'content-type: application/json'"
            ' -d \'{"model": "tidegate", "messages": [{"role": "user", "content": "Hi!"}]}\'',
            flush=True,
        )
    try:
        await _wait_for_signal()
    finally:
        for server in reversed(servers):
            await server.stop()


# ----------------------------------------------------------------- ask -----


def _ask_request(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tidegate.chat import SamplingParams
    from tidegate.client import build_request
    from tidegate.v1 import router_pb2

    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    cache_control = router_pb2.CACHE_CONTROL_DEFAULT
    if args.no_cache:
        cache_control = router_pb2.CACHE_CONTROL_BYPASS
    elif args.refresh_cache:
        cache_control = router_pb2.CACHE_CONTROL_REFRESH
    return build_request(
        args.question,
        system=args.system,
        min_confidence=args.min_confidence,
        sampling=sampling,
        tenant=args.tenant,
        tags=args.tag,
        cache_control=cache_control,
    )


async def _ask(args: argparse.Namespace) -> int:
    from tidegate.client import RouterClient, response_to_dict

    request = _ask_request(args)
    async with RouterClient(
        args.router, timeout_s=args.timeout, api_key=args.api_key, tls=_client_tls(args)
    ) as client:
        if args.stream:
            final = None
            async for event in client.stream(request):
                if event.HasField("response"):
                    final = event.response
                elif event.HasField("restart"):
                    if not args.json:  # the text so far is replaced: say so, start a new line
                        print(flush=True)
                        print(f"[restart: {event.restart.reason}]", file=sys.stderr, flush=True)
                elif not args.json:
                    print(event.delta, end="", flush=True)
            if final is None:
                print("error: the stream ended without a final response", file=sys.stderr)
                return 1
            response = final
            if not args.json:
                print()
        else:
            response = await client.generate(request)
    data = response_to_dict(response)
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    if not args.stream:
        print(data["text"])
    reason = f" — escalated: {data['escalation_reason']}" if data["escalation_reason"] else ""
    print(
        f"[{data['tier']}"
        + (f" (from {data['source_tier']})" if data["source_tier"] else "")
        + f" · confidence {data['confidence']:.3f} by {data['estimator'] or '-'}"
        + f" · {data['timings_ms']['total']:.0f} ms{reason}]",
        file=sys.stderr,
    )
    return 0


# -------------------------------------------------------------- others -----


async def _health(address: str, timeout: float) -> int:
    from tidegate.server import wait_for_health

    try:
        await wait_for_health(address, timeout=timeout)
    except TimeoutError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{address} SERVING")
    return 0


def _client_tls(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """--ca/--cert/--key/--server-name as a ClientTls; None: plaintext."""
    if not (args.ca or args.cert or args.key or args.server_name):
        return None
    from pydantic import ValidationError

    from tidegate.config import describe_validation_error
    from tidegate.tls import ClientTls

    try:
        return ClientTls(
            ca_file=args.ca, cert_file=args.cert, key_file=args.key, server_name=args.server_name
        )
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "--ca/--cert/--key")) from exc


def _hash_key(key: str | None, new: bool) -> int:
    from router.auth import hash_key, new_key

    if new:
        key = new_key()
        print(f"key:  {key}")
        print(f"hash: {hash_key(key)}")
        print("give the key to the client; put the hash under tenants[].api_key_hashes")
        return 0
    if key is None:
        key = sys.stdin.readline().strip()
    if not key:
        print("error: no key given (argument, or one line on stdin)", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _as_json(message: Any) -> dict[str, Any]:
    """Every field of ``message`` (false, zero and empty ones too: a missing ``healthy``
    must not read as unknown), with 64-bit integers as JSON numbers, not strings."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _unquote_int64(message.DESCRIPTOR, data)


def _unquote_int64(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf.descriptor import FieldDescriptor

    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        many = isinstance(value, list)
        if field.message_type is not None:
            if not field.message_type.GetOptions().map_entry:
                for entry in value if many else [value]:
                    _unquote_int64(field.message_type, entry)
        elif field.cpp_type in wide:
            data[field.name] = [int(v) for v in value] if many else int(value)
    return data


async def _status(address: str, as_json: bool, args: argparse.Namespace | None = None) -> int:
    from tidegate.client import RouterClient

    api_key = args.api_key if args is not None else None
    tls = _client_tls(args) if args is not None else None
    async with RouterClient(address, timeout_s=10, api_key=api_key, tls=tls) as client:
        status = await client.status()
    if as_json:
        print(json.dumps(_as_json(status)))
        return 0
    print(f"policy {status.policy_version}")
    for node in status.nodes:
        state = "healthy" if node.healthy else f"UNHEALTHY ({node.last_error})"
        if node.cooldown_remaining_s > 0:
            state += f", cooled down for {node.cooldown_remaining_s:.1f} s more"
        if node.consecutive_failures:
            state += f", {node.consecutive_failures} consecutive failures"
        if node.registered:
            state += f", registered (load {node.load:.2f} of capacity {node.capacity}"
            state += f", heartbeat {node.heartbeat_age_s:.1f} s ago)"
        print(f"  {node.tier:5} {node.name:12} {node.address:22} {node.model:40} {state}")
    lookups = status.cache_hits + status.cache_misses
    rate = f"{100.0 * status.cache_hits / lookups:.1f}%" if lookups else "-"
    print(
        f"cache ({'Redis, shared' if status.cache_shared else 'in-process'}): "
        f"{status.cache_entries} entries, {status.cache_hits} hits "
        f"({status.cache_semantic_hits} semantic), {status.cache_misses} misses, "
        f"hit rate {rate}"
    )
    for budget in status.budgets:
        print(
            f"budget {budget.tenant or '(default)'}: {budget.remaining:g} of {budget.limit:g} "
            f"{budget.unit} left this {budget.window}"
        )
    return 0


def _models(as_json: bool, cache_dir: str | None) -> int:
    """Bundled, converted and Hugging Face cached models (reads disk only: no torch)."""
    from tidegate.inference.local_models import (
        converted_root,
        hub_cache_dir,
        local_models,
        render,
    )

    models = local_models(cache_dir)
    if as_json:
        print(json.dumps([m.to_dict() for m in models]))
    else:
        print(render(models, hub_cache_dir(), converted_root(cache_dir)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidegate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("TIDEGATE_LOG_FORMAT", "text"),
        help="log lines as text, or one JSON object per line with the request id "
        "(default: $TIDEGATE_LOG_FORMAT or text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run cloud, edge and router locally (bundled models)")
    up.add_argument("--config-dir", help="folder with cloud.yaml / edge.yaml / router.yaml")

    demo = sub.add_parser("demo", help="start the local stack and show edge, escalation, cache")
    demo.add_argument("--config-dir", help="folder with cloud.yaml / edge.yaml / router.yaml")

    for role in ("router", "edge", "cloud"):
        node = sub.add_parser(role, help=f"{role} node commands")
        node_sub = node.add_subparsers(dest="action", required=True)
        serve = node_sub.add_parser("serve", help=f"serve the {role} node")
        serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
        if role == "edge":
            serve.add_argument(
                "--register",
                metavar="ROUTER",
                help="register with the router at HOST:PORT (retrying while it is away) and "
                "serve its API to local apps, answering offline without it",
            )
            serve.add_argument(
                "--advertise",
                metavar="HOST:PORT",
                help="the address the router should dial (default: the listen address)",
            )

    ask = sub.add_parser("ask", help="ask the router a question")
    ask.add_argument("question")
    ask.add_argument("--router", default=DEFAULT_ROUTER, help="router HOST:PORT")
    ask.add_argument("--min-confidence", type=float, help="override the policy threshold")
    ask.add_argument("--max-new-tokens", type=int)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--tenant", default="")
    ask.add_argument("--tag", action="append", default=[], help="request tag (repeatable)")
    ask.add_argument("--stream", action="store_true", help="stream the answer")
    cache = ask.add_mutually_exclusive_group()
    cache.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the router's cache"
    )
    cache.add_argument(
        "--refresh-cache",
        action="store_true",
        help="skip the cached answer, ask a model, and store its answer",
    )
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    _add_client_auth(ask)

    health = sub.add_parser("health", help="exit 0 when HOST:PORT reports SERVING")
    health.add_argument("address")
    health.add_argument("--timeout", type=float, default=5.0)

    status = sub.add_parser("status", help="the router's view of nodes and cache")
    status.add_argument("--router", default=DEFAULT_ROUTER)
    status.add_argument("--json", action="store_true")
    _add_client_auth(status)

    hash_key = sub.add_parser(
        "hash-key", help="print the sha256 hash of an API key for tenants[].api_key_hashes"
    )
    hash_key.add_argument("key", nargs="?", help="the key (default: one line from stdin)")
    hash_key.add_argument("--new", action="store_true", help="generate a new random key too")

    models = sub.add_parser(
        "models", help="models available here: bundled, converted, Hugging Face cache"
    )
    models.add_argument("--json", action="store_true", help="one JSON list")
    models.add_argument("--cache-dir", help="tidegate's model cache (default: model.cache_dir's)")

    from tidegate.evaluation import commands as evaluation_commands  # eval, fit-combiner, …

    evaluation_commands.add_parsers(sub)

    from tidegate.benchmarks import edge as edge_bench  # tidegate bench edge (no torch here)

    edge_bench.add_parser(sub)
    return parser


def _add_client_auth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TIDEGATE_API_KEY") or None,
        help="API key for a router with tenants (default: $TIDEGATE_API_KEY)",
    )
    parser.add_argument("--ca", help="TLS: PEM CA bundle the router's certificate chains to")
    parser.add_argument("--cert", help="mutual TLS: PEM client certificate")
    parser.add_argument("--key", help="mutual TLS: PEM client key")
    parser.add_argument("--server-name", help="TLS: name to check the router's certificate for")


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_format)
    try:
        if args.command == "up":
            asyncio.run(_up(args.config_dir))
        elif args.command == "demo":
            from tidegate.demo import run_demo

            return asyncio.run(run_demo(args.config_dir))
        elif args.command in ("router", "edge", "cloud"):
            asyncio.run(_serve(args.command, args.config, args))
        elif args.command == "ask":
            return asyncio.run(_ask(args))
        elif args.command == "health":
            return asyncio.run(_health(args.address, args.timeout))
        elif args.command == "status":
            return asyncio.run(_status(args.router, args.json, args))
        elif args.command == "hash-key":
            return _hash_key(args.key, args.new)
        elif args.command == "models":
            return _models(args.json, args.cache_dir)
        elif args.command in ("eval", "fit-combiner", "calibrate"):
            from tidegate.evaluation import commands as evaluation_commands

            return evaluation_commands.run(args)
        elif args.command == "bench":
            from tidegate.benchmarks import edge as edge_bench

            return edge_bench.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in EXTRA_OF_MODULE:
            raise
        package = exc.name.split(".")[0]
        extra = EXTRA_OF_MODULE[package]
        if extra == "models":  # the model stack comes with the edge and cloud extras
            extra = args.command if args.command in ("edge", "cloud") else "all"
        print(
            f"error: `tidegate {args.command}` needs the Python package {package!r}, "
            f"which is not installed: pip install 'tidegate[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    sys.exit(run())
