from pathlib import Path

import pytest
from pydantic import Field

from tidegate.config import (
    EmptyConfigError,
    ModelSettings,
    StrictModel,
    env_overrides,
    load_config,
)
from tidegate.errors import ConfigError


class Demo(StrictModel):
    name: str = "x"
    """A name."""
    ratio: float = Field(default=0.5, ge=0, le=1)
    """A ratio."""
    model: ModelSettings = ModelSettings()
    """A model."""
    flag: bool = False
    """A flag."""
    prefix: str | None = "app:"
    """A key prefix."""
    sizes: list[int] = []
    """Some sizes."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    assert load_config(Demo).ratio == 0.5


def test_a_bad_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ratio: Input should be less than or equal to 1"):
        load_config(Demo, write(tmp_path, "ratio: 3\n"))


def test_an_unknown_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.quantisation: Extra inputs are not permitted"):
        load_config(Demo, write(tmp_path, "model:\n  quantisation: int8\n"))


def test_missing_file_and_broken_yaml_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Demo, write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Demo, write(tmp_path, "- 1\n"))


def test_unreadable_and_empty_files_are_explained(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="is not valid UTF-8"):
        load_config(Demo, bad)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(Demo, tmp_path)  # a directory: an OSError, as without permission
    empty = write(tmp_path, "# nothing yet\n")
    assert load_config(Demo, empty) == Demo()  # at startup: all defaults
    with pytest.raises(EmptyConfigError, match=f"config file {empty} is empty"):
        load_config(Demo, empty, allow_empty=False)


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    env = {"APP__RATIO": "0.25", "APP__MODEL__QUANTIZATION": "none", "OTHER": "1"}
    config = load_config(Demo, write(tmp_path, "ratio: 0.9\n"), env_prefix="APP", environ=env)
    assert config.ratio == 0.25
    assert config.model.quantization == "none"
    assert env_overrides("APP", {"APP__A__B": "true"}) == {"a": {"b": "true"}}


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        # a string stays the string it is (as YAML: a mapping, a number, an error, a comment)
        ("PREFIX", "prod:cache:", "prefix", "prod:cache:"),
        ("MODEL__REVISION", "0123456", "model.revision", "0123456"),
        ("MODEL__SOURCE", "@team/model", "model.source", "@team/model"),
        ("NAME", "v2 #canary", "name", "v2 #canary"),
        # the field's type reads it
        ("RATIO", "0.25", "ratio", 0.25),
        ("FLAG", "true", "flag", True),
        ("FLAG", "off", "flag", False),
        ("MODEL__COMPILE", "off", "model.compile", "off"),
        ("MODEL__THREADS", "4", "model.threads", 4),
        # null is None; brackets and braces are YAML
        ("PREFIX", "null", "prefix", None),
        ("MODEL__REVISION", "~", "model.revision", None),
        ("SIZES", "[1, 2, 3]", "sizes", [1, 2, 3]),
    ],
)
def test_an_environment_value_is_read_by_its_field(name, value, field, expected) -> None:
    config = load_config(Demo, env_prefix="APP", environ={f"APP__{name}": value})
    for part in field.split("."):
        config = getattr(config, part)
    assert config == expected


def test_an_environment_list_that_is_not_yaml_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"environment variable APP__SIZES: .* in '\[1, 2'"):
        load_config(Demo, env_prefix="APP", environ={"APP__SIZES": "[1, 2"})


def test_on_and_off_in_a_file_are_the_compile_choices(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare on / off as true / false
    config = load_config(Demo, write(tmp_path, "model:\n  compile: off\n"))
    assert config.model.compile == "off"
    assert load_config(Demo, write(tmp_path, "model:\n  compile: on\n")).model.compile == "on"


def test_a_bad_override_is_blamed_on_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"environment overrides.*\n  ratio"):
        load_config(Demo, env_prefix="APP", environ={"APP__RATIO": "2"})


def test_every_settings_field_is_documented() -> None:
    for name, field in ModelSettings.model_fields.items():
        assert field.description, f"ModelSettings.{name} has no docstring"


def test_a_config_nested_too_deeply_is_a_config_error(tmp_path):
    from router.settings import RouterSettings

    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(RouterSettings, deep)


@pytest.mark.parametrize(
    ("module", "cls"),
    [("router.settings", "RouterSettings"), ("edge_node.settings", "EdgeSettings"),
     ("cloud_node.settings", "CloudSettings")],
)  # fmt: skip
def test_a_port_above_65535_is_refused_not_wrapped(tmp_path: Path, module, cls) -> None:
    import importlib

    settings = getattr(importlib.import_module(module), cls)
    # gRPC and sockets would serve 127.0.0.1:99999 on port 34463 (99999 - 65536)
    with pytest.raises(ConfigError, match=r"listen: Value error, port must be 0-65535"):
        load_config(settings, write(tmp_path, "listen: 127.0.0.1:99999\n"))
    assert load_config(settings, write(tmp_path, "listen: 127.0.0.1:0\n")).listen.endswith(":0")
