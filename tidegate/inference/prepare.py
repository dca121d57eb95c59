"""Load a model ready to serve: from the quantized-weight cache when it has the entry,
else load (loading.py) + quantize (quantize.py) once and fill the cache.

Start-up paths for the edge default (SmolLM2, int4):
- cold: GGUF → safetensors conversion (once), load, quantize, store in the cache;
- warm: read the quantized tensors into a meta-device skeleton; no float
  weights are ever materialised (see quantized_cache.py).
Hub ids are not cached here: their identity is only known after loading.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.config import ModelSettings

log = logging.getLogger(__name__)

AUTO_COMPILE_MIN_PARAMETERS = 10_000_000  # compile="auto": toy models are not worth a compile


@dataclass
class PreparedModel:
    model: Any
    tokenizer: Any
    model_id: str  # weights' identity, without the quantization
    context_length: int
    load_seconds: float  # resolve + load (+ conversion on a cold start)
    quantize_seconds: float  # 0 when the quantized cache had the entry
    from_quantized_cache: bool
    converted: bool  # this start converted a GGUF file


def _skeleton(location: Path, quantization: str, lm_head: Any, own_modules: bool) -> Any:
    """The model's modules with empty quantized weights, on the meta device: our own
    (llama_modules.py) when ``own_modules`` and they support the model, else transformers'."""
    import torch
    from transformers import GenerationConfig

    from tidegate.inference import llama_modules
    from tidegate.inference.quantize import quantize_model

    own_config = llama_modules.read_config(location) if own_modules else None
    with torch.device("meta"):
        if own_config is not None:
            model = llama_modules.CausalLM(own_config).to(torch.bfloat16)
        else:  # transformers' config and modeling code import torch's compiler stack
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(location))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if (location / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(location))
    return quantize_model(model, quantization, lm_head=lm_head, empty=True)


def _scheme(settings: ModelSettings, lm_head: Any) -> str:
    """The cache's name for the quantization (an lm_head other than the default is part of it)."""
    return settings.quantization if lm_head is None else f"{settings.quantization}-head{lm_head}"


def _tokenizer(location: Path) -> Any:
    """The model's tokenizer. A plain tokenizers-backed one is loaded through its own
    class: ``AutoTokenizer`` first loads the model's config class, which imports
    torch's compiler stack (+100 MB resident; see llama_modules.py)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        config = json.loads((location / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    plain = config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    if plain and (location / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(location))
    return AutoTokenizer.from_pretrained(str(location))


def _from_cache(
    settings: ModelSettings, root: Path, lm_head: Any, own_modules: bool
) -> PreparedModel | None:
    from tidegate.inference import quantized_cache
    from tidegate.inference.loading import context_length, release_freed_memory, resolve_source

    started = time.perf_counter()
    resolved = resolve_source(settings, root)
    if resolved.kind == "hub" or not isinstance(resolved.location, Path):
        return None
    entry = quantized_cache.entry_dir(root, resolved.model_id, _scheme(settings, lm_head))
    if not (entry / "meta.json").is_file():
        return None
    # The tokenizer first, its garbage handed back before the weights come: loading
    # it peaks ~45 MB above what it keeps, which on top of the weights was the start's
    # peak RSS.
    tokenizer = _tokenizer(resolved.location)
    release_freed_memory()
    try:
        skeleton = _skeleton(resolved.location, settings.quantization, lm_head, own_modules)
        model = quantized_cache.load(entry, skeleton)
    except Exception as exc:  # noqa: BLE001 - a bad entry is re-made, not fatal
        log.warning("ignoring quantized cache entry %s (made again): %s", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if model is None:
        return None
    return PreparedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=resolved.model_id,
        context_length=context_length(model, tokenizer),
        load_seconds=time.perf_counter() - started,
        quantize_seconds=0.0,
        from_quantized_cache=True,
        converted=resolved.converted,
    )


def prepare_model(
    settings: ModelSettings, *, lm_head: Any = None, own_modules: bool = False
) -> PreparedModel:
    """Load and quantize ``settings.source`` (synchronous: seconds).

    ``lm_head``: quantize_model's choice for the output layer (None: its default;
    the benchmark's int4-lm_head variant passes "int4"). ``own_modules``: build the
    model from llama_modules.py where it can (a model only the static decoder can
    serve, without transformers' modeling code in memory) when it comes from the
    quantized cache; a first start, which quantizes, serves transformers' modules."""
    import torch

    from tidegate.inference import quantized_cache
    from tidegate.inference.bundled import default_cache_root
    from tidegate.inference.loading import load_model, release_freed_memory
    from tidegate.inference.quantize import quantize_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    root = default_cache_root(settings.cache_dir)
    cached = settings.quantization in quantized_cache.CACHED_SCHEMES
    if cached and (prepared := _from_cache(settings, root, lm_head, own_modules)) is not None:
        release_freed_memory()  # what reading the weights freed
        return prepared
    loaded = load_model(settings)
    started = time.perf_counter()
    model = quantize_model(loaded.model, settings.quantization, lm_head=lm_head)
    release_freed_memory()
    quantize_seconds = time.perf_counter() - started
    log.info(
        "quantized %s to %s in %.2fs", loaded.model_id, settings.quantization, quantize_seconds
    )
    if cached and loaded.source_kind != "hub":
        entry = quantized_cache.entry_dir(root, loaded.model_id, _scheme(settings, lm_head))
        try:
            quantized_cache.store(
                model, entry, {"model": loaded.model_id, "quantization": settings.quantization}
            )
        # A read-only or full cache only costs the next start its quantization
        # (safetensors reports a full disk as its own SafetensorError, not OSError).
        except Exception as exc:  # noqa: BLE001
            log.warning("could not cache quantized weights in %s: %s", entry, exc)
    return PreparedModel(
        model=model,
        tokenizer=loaded.tokenizer,
        model_id=loaded.model_id,
        context_length=loaded.context_length,
        load_seconds=loaded.load_seconds,
        quantize_seconds=quantize_seconds,
        from_quantized_cache=False,
        converted=loaded.converted,
    )


def wants_static_decoder(settings: ModelSettings, model: Any) -> bool:
    """``compile``: on, off, or auto (on for models of AUTO_COMPILE_MIN_PARAMETERS or more)."""
    if settings.compile != "auto":
        return settings.compile == "on"
    parameters = sum(t.numel() for t in model.parameters())
    parameters += sum(t.numel() for t in model.buffers())  # quantized weights are buffers
    return parameters >= AUTO_COMPILE_MIN_PARAMETERS


def load_backend(settings: ModelSettings) -> Any:
    """Load, quantize and wrap ``settings`` into a TransformersBackend (synchronous).

    With the static decoder, the compiled step is loaded from its cache or
    built in a child process while the backend already serves (compiled_step.py).
    """
    from tidegate.inference.transformers_backend import torch_thread

    # Loaded on the thread that will serve it: one OpenMP pool (see transformers_backend).
    executor = torch_thread()
    return executor.submit(_load_backend_on, settings, executor).result()


def _load_backend_on(settings: ModelSettings, executor: Any) -> Any:
    from tidegate.inference import compiled_step
    from tidegate.inference.bundled import default_cache_root
    from tidegate.inference.transformers_backend import TransformersBackend

    # compile "off" keeps transformers' forward (and so its classes), as documented;
    # otherwise our modules, which the static decoder serves, compiled or not
    prepared = prepare_model(settings, own_modules=settings.compile != "off")
    static = wants_static_decoder(settings, prepared.model)  # and a compiled step for it
    backend = TransformersBackend(
        prepared.model,
        prepared.tokenizer,
        model_id=prepared.model_id,
        context_length=prepared.context_length,
        quantization=settings.quantization,
        threads=settings.threads,
        static_decoder=static,
        executor=executor,
    )
    if backend.decoder is not None and static:
        root = default_cache_root(settings.cache_dir)
        compiled_step.attach(backend.decoder, settings, prepared.model_id, root)
    return backend
