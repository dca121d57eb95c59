"""router.settings: defaults, bounds, cross-field checks, YAML and env loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.settings import RouterSettings, load_router_settings
from tidegate.config import load_config
from tidegate.errors import ConfigError

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "router" / "default_policy.yaml"


def load(tmp_path: Path, data: dict, environ: dict[str, str] | None = None) -> RouterSettings:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(RouterSettings, path, env_prefix="TIDEGATE_ROUTER", environ=environ or {})


def error_for(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return str(info.value)


def test_defaults_are_a_working_local_topology():
    s = RouterSettings()
    assert s.listen == "127.0.0.1:50051"
    assert [(t.name, t.address) for t in s.edge] == [("edge", "127.0.0.1:50052")]
    assert [(t.name, t.address) for t in s.cloud] == [("cloud", "127.0.0.1:50053")]
    assert s.cloud[0].timeout_s > s.edge[0].timeout_s
    assert s.policy.max_new_tokens_limit == 2048
    assert s.policy.edge_budget.max_prompt_tokens == 1024
    assert s.policy.edge_budget.max_new_tokens == 256
    assert s.cache.enabled and s.cache.url is None and not s.cache.cache_sampled


def test_shipped_default_policy_file_equals_the_defaults():
    assert load_router_settings(DEFAULT_POLICY) == RouterSettings()


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    walk(candidate)

    walk(RouterSettings)


def test_empty_edge_list_is_allowed(tmp_path):
    assert load(tmp_path, {"edge": []}).edge == []


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"policy": {"min_confidence": 1.5}}, "policy.min_confidence", "less than or equal"),
        ({"policy": {"min_confidence": -0.1}}, "policy.min_confidence", "greater than"),
        ({"cloud": []}, "cloud", "at least 1"),
        ({"edge": [{"address": "localhost"}]}, "edge.0.address", "HOST:PORT"),
        ({"edge": [{"timeout_s": 0}]}, "edge.0.timeout_s", "greater than"),
        ({"cloud": [{"timeout_s": -1}]}, "cloud.0.timeout_s", "greater than"),
        ({"listen": "50051"}, "listen", "HOST:PORT"),
        ({"cache": {"url": "http://redis:6379"}}, "cache.url", "redis://"),
        ({"cache": {"ttl_s": 0}}, "cache.ttl_s", "greater than"),
        ({"cache": {"max_entries": 0}}, "cache.max_entries", "greater than"),
        (
            {"policy": {"edge_budget": {"max_new_tokens": 0}}},
            "policy.edge_budget.max_new_tokens",
            "greater than",
        ),
        ({"policy": {"on_cloud_unavailable": "retry"}}, "policy.on_cloud_unavailable", "error"),
        ({"policy": {"version": ""}}, "policy.version", "at least 1"),
    ],
)
def test_bad_values_fail_naming_the_field(tmp_path, data, field, words):
    message = error_for(tmp_path, data)
    assert f"  {field}:" in message and words in message, message


def test_extra_keys_are_rejected_at_any_depth(tmp_path):
    assert "  polcy: Extra inputs" in error_for(tmp_path, {"polcy": {}})
    assert "policy.min_confidance: Extra inputs" in error_for(
        tmp_path, {"policy": {"min_confidance": 0.4}}
    )
    assert "cache.ttl: Extra inputs" in error_for(tmp_path, {"cache": {"ttl": 3}})


def test_default_max_new_tokens_must_fit_the_hard_limit(tmp_path):
    message = error_for(
        tmp_path, {"policy": {"default_max_new_tokens": 4096, "max_new_tokens_limit": 2048}}
    )
    assert "policy.default_max_new_tokens (4096)" in message
    assert "policy.max_new_tokens_limit (2048)" in message


def test_edge_budget_must_fit_the_hard_limit(tmp_path):
    message = error_for(
        tmp_path,
        {
            "policy": {
                "edge_budget": {"max_new_tokens": 512},
                "default_max_new_tokens": 100,
                "max_new_tokens_limit": 300,
            }
        },
    )
    assert "policy.edge_budget.max_new_tokens (512)" in message


def test_node_names_must_be_unique(tmp_path):
    message = error_for(
        tmp_path,
        {"edge": [{"name": "a"}], "cloud": [{"name": "a", "address": "10.0.0.1:1"}]},
    )
    assert "unique" in message and "a" in message


def test_budgets_and_rules_must_name_configured_tenants(tmp_path):
    """With tenants (auth on) a request's tenant is always one of them: a budget
    or rule naming another (a typo) would silently never apply."""
    tenants = [
        {"name": "acme", "api_key_hashes": ["sha256:" + "1" * 64]},
        {"name": "globex", "api_key_hashes": ["sha256:" + "2" * 64]},
    ]
    budgets = {"tenants": [{"tenant": "acme"}, {"tenant": "acmee", "requests_per_second": 1}]}
    rules = [{"name": "fast", "tenants": ["globex", "initech"], "deadline_s": 1.0}]
    message = error_for(tmp_path, {"tenants": tenants, "budgets": budgets, "rules": rules})
    assert "budgets.tenants.1.tenant: unknown tenant 'acmee'" in message
    assert "rules.0.tenants.1: unknown tenant 'initech'" in message
    assert "configured tenants: acme, globex" in message
    fixed = {"tenants": [{"tenant": "acme"}, {"tenant": "globex", "requests_per_second": 1}]}
    load(
        tmp_path,
        {"tenants": tenants, "budgets": fixed, "rules": [{**rules[0], "tenants": ["globex"]}]},
    )
    # Without tenants (no auth) a request names its own tenant: any name is fine.
    load(tmp_path, {"budgets": budgets, "rules": rules})


def test_env_overrides_apply_over_the_file(tmp_path):
    s = load(
        tmp_path,
        {"cache": {"ttl_s": 10}},
        environ={
            "TIDEGATE_ROUTER__CACHE__URL": "redis://127.0.0.1:6379/0",
            "TIDEGATE_ROUTER__POLICY__MIN_CONFIDENCE": "0.7",
        },
    )
    assert s.cache.url == "redis://127.0.0.1:6379/0"
    assert s.cache.ttl_s == 10
    assert s.policy.min_confidence == 0.7


def test_bad_env_override_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="policy.min_confidence"):
        load(tmp_path, {}, environ={"TIDEGATE_ROUTER__POLICY__MIN_CONFIDENCE": "2"})
