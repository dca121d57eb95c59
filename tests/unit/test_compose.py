"""compose.yaml, the Dockerfile and deploy/*.yaml: valid, consistent, and pointing at real files.

compose.yaml is checked against the official Compose Specification schema
(vendored in tests/schemas, see its README), and each check is shown to fail on
a broken file so that it cannot pass vacuously.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.dockerfile import parse as parse_dockerfile
from tidegate.cli import build_parser
from tidegate.config import load_config
from tidegate.server import split_address

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "tests" / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
NODE_SERVICES = ("cloud", "edge", "router")
CONFIG_DIR = "/etc/tidegate"
MODEL_CACHE = "/home/tidegate/.cache/tidegate"


def settings_class(role: str) -> type:
    if role == "cloud":
        from cloud_node.settings import CloudSettings

        return CloudSettings
    if role == "edge":
        from edge_node.settings import EdgeSettings

        return EdgeSettings
    from router.settings import RouterSettings

    return RouterSettings


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft202012Validator  # the draft the file declares
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [e.message for e in validator.iter_errors(document)]


def test_vendored_schema_is_the_documented_file() -> None:
    digest = hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256
    readme = (SCHEMA_PATH.parent / "README.md").read_text(encoding="utf-8")
    assert SCHEMA_SHA256 in readme and "compose-spec/compose-spec" in readme
    assert "Apache" in (SCHEMA_PATH.parent / "LICENSE.compose-spec").read_text(encoding="utf-8")


def test_compose_file_matches_the_compose_specification(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
    assert errors(validator, compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(
            lambda c: c["services"]["cloud"].update(bogus_key=1), id="unknown-service-key"
        ),
        pytest.param(lambda c: c.update(servcies={}), id="unknown-top-level-key"),
        pytest.param(
            lambda c: c["services"]["router"]["depends_on"]["cloud"].update(condition="ready"),
            id="bad-depends-on-condition",
        ),
        pytest.param(
            lambda c: c["services"]["redis"]["healthcheck"].update(every="5s"),
            id="unknown-healthcheck-key",
        ),
        pytest.param(lambda c: c["services"]["edge"].update(ports="50052"), id="ports-not-a-list"),
    ],
)
def test_schema_rejects_a_broken_compose_file(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any], breakage: Any
) -> None:
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert errors(validator, broken), "the schema accepted a broken compose file"


def test_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", *NODE_SERVICES}
    assert services["redis"]["image"].startswith("redis:7-alpine")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    depends = services["router"]["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == {
        "redis": "service_healthy",
        "cloud": "service_healthy",
    }  # not the edge: it registers itself once the router is up
    assert "depends_on" not in services["edge"]  # it retries until the router answers
    # gRPC, OpenAI HTTP, Prometheus metrics
    assert services["router"]["ports"] == ["50051:50051", "8080:8080", "9464:9464"]
    for name in ("cloud", "edge", "redis"):
        assert "ports" not in services[name], f"{name} should not be published"


@pytest.mark.parametrize("role", NODE_SERVICES)
def test_node_service_runs_the_cli_on_its_mounted_config(
    compose: dict[str, Any], role: str
) -> None:
    service = compose["services"][role]
    config_path = f"{CONFIG_DIR}/{role}.yaml"
    assert service["command"] == [role, "serve", "--config", config_path]
    # The command is a valid CLI invocation (the image's entrypoint is `tidegate`).
    args = build_parser().parse_args(service["command"])
    assert args.config == config_path

    # Build the role's target of the one Dockerfile (tests/unit/test_dockerfile.py
    # checks each target: non-root, health check, no torch in the router's).
    build = service["build"]
    dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
    assert build["target"] == role
    assert role in parse_dockerfile(dockerfile.read_text(encoding="utf-8")).stages
    assert service["image"] == f"tidegate-{role}:local"

    # The config is a read-only bind mount of an existing deploy/ file.
    mounts = [v.split(":") for v in service["volumes"]]
    binds = {target: (source, mode) for source, target, *mode in mounts if source.startswith(".")}
    source, mode = binds[config_path]
    assert (ROOT / source).resolve() == (ROOT / "deploy" / f"{role}.yaml").resolve()
    assert mode == ["ro"]
    for source, target, *_ in mounts:
        if not source.startswith((".", "/")):
            assert source in compose["volumes"], f"named volume {source} is not declared"
            assert target == MODEL_CACHE

    # The healthcheck asks the gRPC health service on the port the config listens on.
    settings = load_config(settings_class(role), ROOT / "deploy" / f"{role}.yaml")
    host, port = split_address(settings.listen)
    assert host == "0.0.0.0", "inside the compose network a node must listen on all interfaces"
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "tidegate", "health"]
    assert test[3] == f"127.0.0.1:{port}"
    assert build_parser().parse_args(test[2:]).address == test[3]
    exposed = service.get("expose", []) + [p.split(":")[-1] for p in service.get("ports", [])]
    assert str(port) in exposed


def test_model_nodes_share_the_model_cache_volume(compose: dict[str, Any]) -> None:
    for role in ("cloud", "edge"):
        assert f"model-cache:{MODEL_CACHE}" in compose["services"][role]["volumes"]


@pytest.mark.parametrize("role", NODE_SERVICES)
def test_deploy_config_validates(role: str) -> None:
    load_config(settings_class(role), ROOT / "deploy" / f"{role}.yaml")


def test_every_deploy_file_is_used_and_valid(compose: dict[str, Any]) -> None:
    mounted = {
        (ROOT / v.split(":")[0]).resolve()
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if v.startswith("./")
    }
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        assert path.resolve() in mounted, f"{path.name} is not mounted by compose.yaml"
        load_config(settings_class(path.stem), path)


def test_router_reaches_nodes_and_redis_by_service_name(compose: dict[str, Any]) -> None:
    router = load_config(settings_class("router"), ROOT / "deploy" / "router.yaml")
    assert router.cache.url == "redis://redis:6379/0"
    assert router.cloud, "the router has no cloud node"
    for targets, role in ((router.edge, "edge"), (router.cloud, "cloud")):
        node = load_config(settings_class(role), ROOT / "deploy" / f"{role}.yaml")
        _, node_port = split_address(node.listen)
        for target in targets:
            assert split_address(target.address) == (role, node_port)
            assert role in compose["services"]


def test_the_edge_registers_with_the_router_by_service_name(compose: dict[str, Any]) -> None:
    """The router lists no edge: the edge registers, advertising the address the
    router dials inside the compose network, and the router keeps leases in Redis."""
    router = load_config(settings_class("router"), ROOT / "deploy" / "router.yaml")
    edge = load_config(settings_class("edge"), ROOT / "deploy" / "edge.yaml")
    assert router.edge == [] and router.registry.enabled
    assert router.registry_store == ("redis", "redis://redis:6379/0")
    registration = edge.registration
    assert registration is not None and registration.announce
    _, router_port = split_address(router.listen)
    assert split_address(registration.router) == ("router", router_port)
    _, edge_port = split_address(edge.listen)
    assert registration.advertise is not None
    assert split_address(registration.advertise) == ("edge", edge_port)
    assert registration.name not in {t.name for t in router.cloud}


def test_router_publishes_the_openai_endpoint_it_serves(compose: dict[str, Any]) -> None:
    router = load_config(settings_class("router"), ROOT / "deploy" / "router.yaml")
    assert router.http.enabled
    host, port = split_address(router.http.listen)
    assert host == "0.0.0.0", "inside the container HTTP must listen on all interfaces"
    assert f"{port}:{port}" in compose["services"]["router"]["ports"]


def test_router_publishes_its_metrics(compose: dict[str, Any]) -> None:
    router = load_config(settings_class("router"), ROOT / "deploy" / "router.yaml")
    assert router.metrics.enabled
    assert router.metrics.host == "0.0.0.0", "inside the container metrics must bind all interfaces"
    port = router.metrics.port
    assert f"{port}:{port}" in compose["services"]["router"]["ports"]


def test_router_limits_fit_the_nodes_limits() -> None:
    """A request the router accepts must not be rejected by the node it sends it to."""
    router = load_config(settings_class("router"), ROOT / "deploy" / "router.yaml")
    edge = load_config(settings_class("edge"), ROOT / "deploy" / "edge.yaml")
    cloud = load_config(settings_class("cloud"), ROOT / "deploy" / "cloud.yaml")
    assert router.policy.max_new_tokens_limit <= cloud.max_new_tokens_limit
    assert router.policy.edge_budget.max_new_tokens <= edge.max_new_tokens_limit


def test_a_broken_deploy_file_fails_naming_the_field(tmp_path: Path) -> None:
    from tidegate.errors import ConfigError

    data = yaml.safe_load((ROOT / "deploy" / "cloud.yaml").read_text(encoding="utf-8"))
    data["backend"] = "openai"
    broken = tmp_path / "cloud.yaml"
    broken.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"openai"):
        load_config(settings_class("cloud"), broken)
