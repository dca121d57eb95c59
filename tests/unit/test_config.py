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
    assert env_overrides("APP", {"APP__A__B": "true"}) == {"a": {"b": True}}


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
