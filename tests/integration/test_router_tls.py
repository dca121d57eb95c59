"""TLS and mutual TLS: clients → router and router → nodes, over real gRPC servers
on loopback with certificates generated for this test session (tests.support.certs)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest

from router.service import serve_router
from router.settings import RouterSettings
from tests.support.certs import TestCA
from tests.support.cli import tidegate
from tests.support.stack import CountingBackend, ask, cloud_backend, status_code
from tests.support.tiny_models import tiny_backend
from tidegate.errors import ConfigError
from tidegate.node_servicer import ModelNodeServicer, NodeLimits
from tidegate.server import RunningServer, start_server, wait_for_health
from tidegate.tls import ClientTls, ServerTls, open_channel
from tidegate.v1 import router_pb2, router_pb2_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder)
    other = TestCA(folder, "untrusted CA")
    return {
        "ca": ca.ca_file,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "untrusted_ca": other.ca_file,
        "untrusted_client": other.issue("client", server=False),
    }


@pytest.fixture
async def exits():
    async with AsyncExitStack() as stack:
        yield stack


async def tls_node(exits, pki, role: str, backend) -> RunningServer:
    """A ModelNode that demands a client certificate from our CA (mutual TLS)."""
    server_tls = ServerTls(
        cert_file=pki["server"].cert, key_file=pki["server"].key, client_ca_file=pki["ca"]
    )
    estimator = None
    if role == "edge":
        from edge_node.estimators import build_estimator

        estimator = build_estimator("seq_prob")
    servicer = ModelNodeServicer(backend, role, estimator, NodeLimits(16, 4096))
    server = await start_server([servicer.service()], "127.0.0.1:0", server_tls)
    exits.push_async_callback(backend.close)
    exits.push_async_callback(server.stop, 0)
    client = ClientTls(ca_file=pki["ca"], cert_file=pki["client"].cert, key_file=pki["client"].key)
    await wait_for_health(server.address, timeout=10, tls=client)
    return server


async def start_router(exits, edge: list[str], cloud: list[str], **overrides: Any) -> str:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http": {"enabled": False},
        "metrics": {"enabled": False},
        "edge": [{"name": f"edge{i}", "address": a} for i, a in enumerate(edge)],
        "cloud": [{"name": f"cloud{i}", "address": a} for i, a in enumerate(cloud)],
        "policy": {"default_max_new_tokens": 16},
        "retries": {"edge_attempts": 1, "cloud_attempts": 1},
        **overrides,
    }
    server = await serve_router(RouterSettings.model_validate(data))
    exits.push_async_callback(server.stop, 0)
    return server.address


async def call(exits, address: str, tls: ClientTls | None, **kwargs: Any):
    channel = open_channel(address, tls)
    exits.push_async_callback(channel.close)
    stub = router_pb2_grpc.RouterStub(channel)
    return await stub.Generate(ask(**kwargs), timeout=15)


async def test_router_serves_clients_over_tls_and_mutual_tls(exits, pki):
    cloud_server = await tls_node(exits, pki, "cloud", cloud_backend())
    nodes_tls = {
        "ca_file": pki["ca"],
        "cert_file": pki["client"].cert,
        "key_file": pki["client"].key,
    }
    server = {"cert_file": pki["server"].cert, "key_file": pki["server"].key}
    tls_only = await start_router(
        exits, [], [cloud_server.address], tls={"server": server, "nodes": nodes_tls}
    )
    trusted = ClientTls(ca_file=pki["ca"])
    r = await call(exits, tls_only, trusted)
    assert r.tier == router_pb2.TIER_CLOUD and r.text
    # A plaintext client, or one trusting another CA, cannot talk to it.
    for tls in (None, ClientTls(ca_file=pki["untrusted_ca"])):
        code, _ = await status_code(call(exits, tls_only, tls))
        assert code == grpc.StatusCode.UNAVAILABLE

    mutual = await start_router(
        exits,
        [],
        [cloud_server.address],
        tls={"server": {**server, "client_ca_file": pki["ca"]}, "nodes": nodes_tls},
    )
    with_cert = ClientTls(
        ca_file=pki["ca"], cert_file=pki["client"].cert, key_file=pki["client"].key
    )
    assert (await call(exits, mutual, with_cert)).tier == router_pb2.TIER_CLOUD
    foreign = pki["untrusted_client"]
    for tls in (
        trusted,  # no client certificate
        ClientTls(ca_file=pki["ca"], cert_file=foreign.cert, key_file=foreign.key),
    ):
        code, _ = await status_code(call(exits, mutual, tls))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_router_reaches_mutual_tls_nodes_only_with_its_certificate(exits, pki):
    edge = CountingBackend(tiny_backend(seed=0))
    edge_server = await tls_node(exits, pki, "edge", edge)
    cloud_server = await tls_node(exits, pki, "cloud", cloud_backend())
    nodes_tls = {
        "ca_file": pki["ca"],
        "cert_file": pki["client"].cert,
        "key_file": pki["client"].key,
    }
    router = await start_router(
        exits, [edge_server.address], [cloud_server.address], tls={"nodes": nodes_tls}
    )
    kept = await call(exits, router, None, min_confidence=0.0)
    assert kept.tier == router_pb2.TIER_EDGE and edge.calls == 1
    escalated = await call(exits, router, None, min_confidence=1.0, tenant="esc")
    assert escalated.tier == router_pb2.TIER_CLOUD

    # Without a client certificate the nodes refuse the handshake: the edge counts
    # as down, and the cloud's refusal is UNAVAILABLE naming the node.
    no_cert = await start_router(
        exits, [edge_server.address], [cloud_server.address], tls={"nodes": {"ca_file": pki["ca"]}}
    )
    code, details = await status_code(call(exits, no_cert, None, min_confidence=0.0, tenant="x"))
    assert code == grpc.StatusCode.UNAVAILABLE and "cloud node cloud0" in details
    assert edge.calls == 2  # the handshake failed before any request reached it
    plaintext = await start_router(exits, [edge_server.address], [cloud_server.address])
    code, _ = await status_code(call(exits, plaintext, None, min_confidence=0.0, tenant="y"))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_bad_tls_files_fail_at_startup_naming_the_field(exits, pki, tmp_path):
    missing = str(tmp_path / "nope.pem")
    wrong_key = pki["client"].key  # not the server certificate's key
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    cases = [
        ({"server": {"cert_file": missing, "key_file": pki["server"].key}}, "tls.server.cert_file"),
        (
            {"server": {"cert_file": pki["server"].cert, "key_file": wrong_key}},
            "tls.server.cert_file/key_file",
        ),
        ({"nodes": {"ca_file": str(not_pem)}}, "tls.nodes.ca_file"),
    ]
    for tls, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            await start_router(exits, [], ["127.0.0.1:1"], tls=tls)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        RouterSettings.model_validate({"tls": {"nodes": {"cert_file": pki["client"].cert}}})


async def test_cli_asks_over_mutual_tls(exits, pki):
    cloud_server = await tls_node(exits, pki, "cloud", cloud_backend())
    server = {
        "cert_file": pki["server"].cert,
        "key_file": pki["server"].key,
        "client_ca_file": pki["ca"],
    }
    nodes_tls = {
        "ca_file": pki["ca"],
        "cert_file": pki["client"].cert,
        "key_file": pki["client"].key,
    }
    router = await start_router(
        exits, [], [cloud_server.address], tls={"server": server, "nodes": nodes_tls}
    )
    ask_hi = ["ask", "--router", router, "--json", "hi there"]
    tls_args = ["--ca", pki["ca"], "--cert", pki["client"].cert, "--key", pki["client"].key]
    code, out, err = await tidegate(*ask_hi, *tls_args, timeout_s=60)
    assert code == 0, err
    assert '"tier": "cloud"' in out
    code, _, err = await tidegate(*ask_hi, "--ca", pki["ca"], timeout_s=60)
    assert code == 1 and "UNAVAILABLE" in err
