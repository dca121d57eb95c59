"""Loading YAML configuration into pydantic models, failing early and precisely.

House rules for every settings class: ``extra="forbid"`` (a typo is an error,
not a silently ignored key), a default, bounds and a docstring on every field.
Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tidegate.errors import ConfigError


class EmptyConfigError(ConfigError):
    """The config file holds no document (empty, or only blanks and comments)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSettings(StrictModel):
    """Which model a node serves and how it is loaded."""

    source: str = Field(default="smollm2-135m", min_length=1)
    """A bundled model name (see `tidegate models`), a Hugging Face model id,
    a local folder with a transformers model, or a path to a .gguf file."""

    gguf_file: str | None = None
    """With a Hugging Face id or folder that holds GGUF files: which file to load."""

    revision: str | None = None
    """Hugging Face revision (branch, tag or commit) for hub ids."""

    quantization: Literal["none", "int8", "int4", "bf16"] = "int8"
    """`int4`: int4 weight-only linears (groups of 32, as in the bundled Q4_1
    GGUF files) with bf16 activations and an int8 lm_head, the fastest;
    `int8`: int8 weight-only linears with bf16 activations; `bf16`: all
    weights in bf16; `none`: fp32 as loaded. int8/int4 weights are cached on
    disk after the first quantization (under `cache_dir`/quantized)."""

    compile: Literal["auto", "on", "off"] = "auto"
    """Decode through a static KV cache with a compiled per-token step (Llama
    and Qwen2 models; others use transformers' forward): `on`; `off`:
    transformers' forward, nothing compiled; `auto`: `on` for models of 10M
    parameters or more (toy models are not worth a compile). The step is
    compiled ahead of time (torch.export + AOTInductor) once per model,
    quantization and thread count, in a background process while the node
    already serves uncompiled (~1 min for SmolLM2), and loaded from
    `cache_dir`/compiled at later starts (~1 s)."""

    threads: int | None = Field(default=None, ge=1, le=256)
    """torch intra-op threads; default: all cores."""

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off as true / false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    cache_dir: str | None = None
    """Where converted (GGUF → safetensors) models are kept; default
    $TIDEGATE_CACHE_DIR or ~/.cache/tidegate."""


M = TypeVar("M", bound=BaseModel)


def check_address(value: str) -> str:
    """A HOST:PORT field: ValueError unless it is one, its port 0-65535."""
    from tidegate.server import split_address

    _, port = split_address(value)  # raises ValueError naming the bad address
    if port > 65535:  # gRPC and sockets would wrap it to another port, silently
        raise ValueError(f"port must be 0-65535 (0: any free port), got {value!r}")
    return value


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def describe_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        lines.append(f"  {_field_path(err['loc'])}: {err['msg']}")
    return "\n".join(lines)


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(path)}: {key} is not a section")
        data = node
    data[path[-1]] = value


def env_overrides(prefix: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """``PREFIX__CACHE__URL=redis://…`` → ``{"cache": {"url": "redis://…"}}``.

    A value stays the string it is, and the field's type reads it as pydantic
    reads a string (``0.7`` for a number, ``true`` / ``off`` for a flag): parsed as
    YAML, ``prod:cache:`` would be a mapping, ``0123456`` a number, ``@v1`` an
    error and ``v2 #canary`` would lose its ``#canary``. Two exceptions: ``null``
    or ``~`` is None, and a value in brackets or braces (``[a, b]``, ``{k: v}``)
    is a YAML list or mapping, for the fields that hold one.
    """
    overrides: dict[str, Any] = {}
    marker = prefix.upper() + "__"
    for name, raw in environ.items():
        if name.startswith(marker):
            path = [part.lower() for part in name[len(marker) :].split("__")]
            _set_path(overrides, path, _env_value(name, raw))
    return overrides


def _env_value(name: str, raw: str) -> Any:
    text = raw.strip()
    if text in ("null", "~"):
        return None
    if not (text.startswith("[") or text.startswith("{")):
        return raw
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"environment variable {name}: {problem} in {raw!r}") from None


def merge_dicts(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[M],
    path: str | Path | None = None,
    *,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
    allow_empty: bool = True,
) -> M:
    """Read ``path`` (or nothing: all defaults), apply env overrides, validate.

    An empty file means all defaults, unless ``allow_empty`` is False: then it
    raises EmptyConfigError. Raises ConfigError whose message names the file
    and every bad field (or why the file could not be read).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except OSError as exc:  # no permission, a directory, an I/O error
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid UTF-8: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except RecursionError as exc:  # PyYAML's parser recurses per nesting level
            raise ConfigError(f"config file {path} is nested too deeply to be a config") from exc
        if loaded is None:
            if not allow_empty:
                raise EmptyConfigError(
                    f"config file {path} is empty (no settings, only blanks or comments)"
                )
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    if env_prefix:
        overrides = env_overrides(env_prefix, os.environ if environ is None else environ)
        if overrides:
            data = merge_dicts(data, overrides)
            source += f" (with {env_prefix.upper()}__* environment overrides)"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
