"""deploy/scale-out: several routers behind nginx sharing Redis, vLLM as the cloud tier.

It cannot run here (no containers, no GPU), so it is checked by reading: the
compose file against the Compose Specification, every build target against the
Dockerfile, every config against its settings class, and the ports that tie
nginx, the routers, the cloud node and vLLM together.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.support.dockerfile import parse as parse_dockerfile
from tidegate.config import load_config
from tidegate.server import split_address

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "scale-out"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((HERE / "compose.yaml").read_text(encoding="utf-8"))


def router_settings():  # type: ignore[no-untyped-def]
    from router.settings import RouterSettings

    return load_config(RouterSettings, HERE / "router.yaml")


def cloud_settings():  # type: ignore[no-untyped-def]
    from cloud_node.settings import CloudSettings

    return load_config(CloudSettings, HERE / "cloud.yaml")


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text("utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors(compose)] == []


def test_builds_existing_targets_and_mounts_existing_files(compose: dict[str, Any]) -> None:
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8")).stages
    for name, service in compose["services"].items():
        if "build" in service:
            context = (HERE / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert service["build"]["target"] in stages, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (HERE / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_routers_are_replicas_sharing_redis(compose: dict[str, Any]) -> None:
    router = compose["services"]["router"]
    assert router["deploy"]["replicas"] >= 2
    assert "ports" not in router, "replicas are reached through the load balancer only"
    settings = router_settings()
    assert settings.cache.url == "redis://redis:6379/0"
    assert settings.registry.enabled and settings.registry.store == "redis"
    assert settings.budgets.url is None  # follows cache.url: one budget for all replicas
    assert settings.edge == []  # edges register themselves


def test_the_cloud_tier_is_vllm_behind_a_torch_free_cloud_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["cloud"]["build"]["target"] == "cloud-openai"
    cloud = cloud_settings()
    assert cloud.backend == "openai"
    url = urlsplit(cloud.openai.base_url)
    assert (url.hostname, url.port, url.path) == ("vllm", 8000, "/v1")
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert "8000/health" in " ".join(services["vllm"]["healthcheck"]["test"])
    (target,) = router_settings().cloud
    _, port = split_address(cloud.listen)
    assert split_address(target.address) == ("cloud", port)
    assert str(port) in services["cloud"]["expose"]


def test_nginx_balances_both_router_ports(compose: dict[str, Any]) -> None:
    nginx = (HERE / "nginx.conf").read_text(encoding="utf-8")
    settings = router_settings()
    _, grpc_port = split_address(settings.listen)
    host, http_port = split_address(settings.http.listen)
    assert host == "0.0.0.0"
    upstreams = dict(re.findall(r"upstream (\w+) \{\s*server router:(\d+)", nginx))
    assert upstreams == {"routers_grpc": str(grpc_port), "routers_http": str(http_port)}
    assert "grpc_pass grpc://routers_grpc;" in nginx and "http2 on;" in nginx
    assert "proxy_pass http://routers_http;" in nginx
    assert "proxy_buffering off;" in nginx  # server-sent events must not be held back
    lb = compose["services"]["lb"]
    assert lb["ports"] == [f"{grpc_port}:{grpc_port}", f"{http_port}:{http_port}"]
    assert lb["depends_on"]["router"]["condition"] == "service_healthy"
