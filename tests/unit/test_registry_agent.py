"""The edge agent's pieces that need no server: backoff, settings, the CLI flags."""

from __future__ import annotations

import argparse
import asyncio
import re

import pytest
import yaml

from edge_node.agent import Backoff, MeteredBackend, advertised_address, edge_name, registry_token
from edge_node.agent_settings import RegisterSettings
from edge_node.settings import EdgeSettings
from router.settings import RouterSettings
from tests.support.tiny_models import tiny_backend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.cli import _with_registration, build_parser
from tidegate.config import load_config
from tidegate.errors import ConfigError
from tidegate.registration import EDGE_NAME_PATTERN


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets():
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    many = [Backoff(1.0, 1.0).next_delay() for _ in range(200)]
    assert min(many) >= 0.5 and max(many) <= 1.0 and len(set(many)) > 150  # jittered


def test_backoff_survives_very_long_outages():
    backoff = Backoff(initial_s=0.01, max_s=30.0)
    for _ in range(10_000):
        assert backoff.next_delay() <= 30.0


async def test_the_meter_counts_requests_in_flight_and_queued():
    meter = MeteredBackend(tiny_backend(), capacity=1)
    request = GenerationRequest((ChatMessage("user", "Hi"),), SamplingParams(max_new_tokens=4))
    stream = meter.stream(request)
    await stream.__anext__()  # the first request holds the model
    assert (meter.in_flight, meter.queued) == (1, 0)
    second = asyncio.create_task(meter.generate(request))  # waits for the model
    await asyncio.sleep(0.05)
    assert (meter.in_flight, meter.queued) == (2, 1)
    await stream.aclose()
    await second
    assert (meter.in_flight, meter.queued) == (0, 0)
    await meter.generate(request)
    assert meter.in_flight == 0 and meter.info.model.startswith("tiny-llama-s0")
    await meter.close()


def test_register_settings_are_checked_naming_the_field(tmp_path):
    bad = tmp_path / "edge.yaml"
    bad.write_text("register:\n  router: no-port\n")
    with pytest.raises(ConfigError, match="register.router"):
        load_config(EdgeSettings, bad)
    bad.write_text("register:\n  backoff_initial_s: 10\n  backoff_max_s: 1\n")
    with pytest.raises(ConfigError, match="backoff_initial_s"):
        load_config(EdgeSettings, bad)
    bad.write_text("register:\n  heartbeat: 1\n")
    with pytest.raises(ConfigError, match="register.heartbeat"):
        load_config(EdgeSettings, bad)
    env = {"TIDEGATE_EDGE__REGISTER__ROUTER": "router.local:50051"}
    settings = load_config(EdgeSettings, None, env_prefix="TIDEGATE_EDGE", environ=env)
    assert settings.registration is not None
    assert settings.registration.router == "router.local:50051"


def test_the_advertised_address_defaults_to_the_bound_one():
    def settings(listen: str, **register: str) -> EdgeSettings:
        return EdgeSettings.model_validate({"listen": listen, "register": register})

    assert advertised_address(settings("127.0.0.1:0"), 41234) == "127.0.0.1:41234"
    assert advertised_address(settings("[::1]:0"), 5) == "[::1]:5"
    assert advertised_address(settings("0.0.0.0:1", advertise="edge:1"), 1) == "edge:1"
    with pytest.raises(ConfigError, match="register.advertise"):
        advertised_address(settings("0.0.0.0:50052"), 50052)


def test_the_registry_token_drops_a_trailing_newline_and_refuses_what_grpc_cannot_send(
    monkeypatch,
):
    # gRPC refuses to send a metadata value outside printable ASCII (cygrpc's
    # ExecuteBatchError, before the call leaves): the agent could never register.
    registration = RegisterSettings(token_env="TIDEGATE_TEST_REGISTRY_TOKEN")
    monkeypatch.setenv("TIDEGATE_TEST_REGISTRY_TOKEN", "s3cret-token\n")  # a Kubernetes secret
    assert registry_token(registration) == "s3cret-token"
    for bad in ("sécret", "tab\tinside", "bell\x07", "del\x7f"):
        monkeypatch.setenv("TIDEGATE_TEST_REGISTRY_TOKEN", bad)
        with pytest.raises(ConfigError, match="register.token_env.*TIDEGATE_TEST_REGISTRY_TOKEN"):
            registry_token(registration)
    monkeypatch.setenv("TIDEGATE_TEST_REGISTRY_TOKEN", "sécret")
    with pytest.raises(ConfigError) as err:
        registry_token(registration)
    assert "sécret" not in str(err.value)  # never the secret itself in a log
    monkeypatch.setenv("TIDEGATE_TEST_REGISTRY_TOKEN", " \n")
    with pytest.raises(ConfigError, match="not set \\(or empty\\)"):
        registry_token(registration)


@pytest.mark.parametrize(
    ("register", "field", "phrase"),
    [
        ({"name": "my edge"}, "register.name", "starting with a letter or digit"),
        ({"name": "[::1]:5"}, "register.name", "starting with a letter or digit"),
        ({"advertise": "0.0.0.0:7000"}, "register.advertise", "set register.advertise"),
        ({"advertise": "[::]:7000"}, "register.advertise", "set register.advertise"),
        ({"advertise": "edge.local:70000"}, "register.advertise", "1-65535"),
        ({"router": "router.local:99999"}, "register.router", "1-65535"),
        ({"router": "router.local:0"}, "register.router", "1-65535"),
    ],
)
def test_register_settings_the_router_would_refuse_fail_at_startup(
    tmp_path, register, field, phrase
):
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({"register": register}))
    with pytest.raises(ConfigError, match=re.escape(field) + ".*" + re.escape(phrase)):
        load_config(EdgeSettings, path)


def test_the_default_name_is_one_the_router_accepts():
    def registration(listen: str, **register: str) -> tuple[RegisterSettings, str]:
        settings = EdgeSettings.model_validate({"listen": listen, "register": register})
        assert settings.registration is not None
        return settings.registration, advertised_address(settings, 5)

    assert edge_name(*registration("127.0.0.1:0")) == "127.0.0.1:5"
    assert edge_name(*registration("[::1]:0")) == "edge@[::1]:5"  # "[" cannot start a name
    assert edge_name(*registration("[::1]:0", name="kitchen")) == "kitchen"
    for name in ("127.0.0.1:5", "edge@[::1]:5", "edge@[2001:db8::7]:50052"):
        assert EDGE_NAME_PATTERN.fullmatch(name)
    long_host = "edge-0." + "a" * 60 + ".svc.cluster.local"
    with pytest.raises(ConfigError, match="register.name"):
        edge_name(*registration(f"{long_host}:0"))  # too long for a name: say to set one


def test_cli_register_flags_override_the_yaml(tmp_path):
    args = build_parser().parse_args(
        ["edge", "serve", "--register", "10.0.0.5:50051", "--advertise", "10.0.0.9:50052"]
    )
    assert (args.register, args.advertise) == ("10.0.0.5:50051", "10.0.0.9:50052")
    yaml = tmp_path / "edge.yaml"
    yaml.write_text("register:\n  router: old:1\n  capacity: 3\n")
    merged = _with_registration(load_config(EdgeSettings, yaml), args.register, None)
    assert merged.registration is not None
    assert (merged.registration.router, merged.registration.capacity) == ("10.0.0.5:50051", 3)
    fresh = _with_registration(EdgeSettings(), "r:1", "a:2")
    assert fresh.registration is not None and fresh.registration.advertise == "a:2"
    with pytest.raises(ConfigError, match="--register"):
        _with_registration(EdgeSettings(), "nonsense", None)
    assert not hasattr(build_parser().parse_args(["router", "serve"]), "register")
    assert isinstance(args, argparse.Namespace)


def test_router_registry_settings_resolve_the_store():
    assert RouterSettings().registry_store == ("memory", None)
    shared = RouterSettings.model_validate({"cache": {"url": "redis://r:6379/0"}})
    assert shared.registry_store == ("redis", "redis://r:6379/0")
    own = {"cache": {"url": "redis://r:6379/0"}, "registry": {"url": "redis://q:6379/1"}}
    assert RouterSettings.model_validate(own).registry_store == ("redis", "redis://q:6379/1")
    local = {"cache": {"url": "redis://r:6379/0"}, "registry": {"store": "memory"}}
    assert RouterSettings.model_validate(local).registry_store == ("memory", None)
    for bad, field in (
        ({"registry": {"store": "redis"}}, "registry.store"),
        ({"registry": {"heartbeat_interval_s": 10, "ttl_s": 15}}, "registry.ttl_s"),
        ({"registry": {"url": "http://x"}}, "registry.url"),
        ({"registry": {"token_env": "not a name"}}, "registry.token_env"),
    ):
        with pytest.raises(ValueError, match=field.split(".")[-1]):
            RouterSettings.model_validate(bad)
