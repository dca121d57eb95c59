"""CloudSettings: defaults, bounds, the cross-field rules, YAML and env loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_node.settings import CloudSettings, OpenAISettings
from tidegate.config import load_config
from tidegate.errors import ConfigError


def test_defaults_serve_the_bundled_qwen_with_transformers() -> None:
    settings = CloudSettings()
    assert settings.listen == "127.0.0.1:50053"
    assert settings.backend == "transformers"
    assert settings.model.source == "qwen2.5-coder-0.5b"
    assert settings.model.quantization == "int8"
    assert settings.openai is None
    assert (settings.default_max_new_tokens, settings.max_new_tokens_limit) == (256, 4096)


def test_openai_backend_without_openai_section_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("backend: openai\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(CloudSettings, path)
    message = str(caught.value)
    assert str(path) in message
    assert "\n  openai:" in message  # the field path, as load_config prints it
    assert "required when backend is 'openai'" in message


def test_openai_backend_loads_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        "backend: openai\n"
        "openai:\n"
        "  base_url: http://vllm:8000/v1\n"
        "  model: Qwen/Qwen2.5-Coder-1.5B-Instruct\n"
        "  api_key_env: VLLM_KEY\n"
        "  context_length: 32768\n",
        encoding="utf-8",
    )
    settings = load_config(CloudSettings, path)
    assert settings.openai == OpenAISettings(
        base_url="http://vllm:8000/v1",
        model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        api_key_env="VLLM_KEY",
        context_length=32768,
    )


def test_env_overrides_use_the_cli_prefix() -> None:
    settings = load_config(
        CloudSettings,
        None,
        env_prefix="TIDEGATE_CLOUD",
        environ={
            "TIDEGATE_CLOUD__BACKEND": "openai",
            "TIDEGATE_CLOUD__OPENAI__BASE_URL": "http://127.0.0.1:9000/v1",
            "TIDEGATE_CLOUD__OPENAI__TIMEOUT_S": "30",
        },
    )
    assert settings.openai is not None
    assert settings.openai.base_url == "http://127.0.0.1:9000/v1"
    assert settings.openai.timeout_s == 30.0


def test_default_max_new_tokens_must_fit_the_limit() -> None:
    with pytest.raises(ValidationError) as caught:
        CloudSettings(default_max_new_tokens=5000, max_new_tokens_limit=4096)
    assert caught.value.errors()[0]["loc"] == ("max_new_tokens_limit",)
    assert "default_max_new_tokens (5000)" in str(caught.value)
    CloudSettings(default_max_new_tokens=4096, max_new_tokens_limit=4096)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", "vllm"),
        ("listen", "no-port"),
        ("default_max_new_tokens", 0),
        ("max_new_tokens_limit", 0),
        ("unknown_key", 1),
    ],
)
def test_bad_cloud_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        CloudSettings.model_validate({field: value})
    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_url", "vllm:8000"),  # no scheme
        ("base_url", ""),
        ("model", ""),
        ("api_key_env", "sk-live-123 456"),  # looks like a key, not a variable name
        ("timeout_s", 0),
        ("connect_timeout_s", -1),
        ("context_length", 10),
        ("max_connections", 0),
        ("api_key", "sk-123"),  # the key itself never goes in YAML
    ],
)
def test_bad_openai_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        OpenAISettings.model_validate({field: value})
    assert caught.value.errors()[0]["loc"][0] == field


def test_every_field_is_documented() -> None:
    for cls in (CloudSettings, OpenAISettings):
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no docstring"
