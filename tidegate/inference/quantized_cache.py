"""Quantized weights cached on disk, so a node quantizes a model once, not at every start.

Layout: ``<cache root>/quantized/<model identity>/<scheme>-<key>/`` holding
``weights.safetensors`` (every parameter and buffer of the quantized model,
non-persistent ones included, each shared tensor once) and ``meta.json``
(which names alias which, and what the entry was made from). ``key`` is a
hash of the scheme, this file's format version, torch's major.minor
version and the CPU's capability (the int4 packing is torch's private layout,
and differs between AVX-512 and AVX2), so a new scheme, torch or CPU gets a
new entry; the model identity (``smollm2-135m@b179c9523d0e``: name and
weights' sha256 or fingerprint) invalidates entries when the weights change.

Loading builds the model skeleton on the meta device (no memory, no random
init), swaps in empty quantized modules and assigns the cached tensors: for
SmolLM2 int4 that is ~0.3 s and never holds the float weights, instead of
loading them (0.5 GB) and quantizing (seconds; ~27 s for Qwen-0.5B int8).
Writes go to a temporary folder renamed into place under a file lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tidegate.inference.partial_files import partial_path, sweep_stale

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHED_SCHEMES = ("int8", "int4")


def entry_dir(root: Path, model_id: str, scheme: str) -> Path:
    """Where ``model_id`` quantized as ``scheme`` lives (created on store)."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    # The int4 kernel's packed layout depends on the CPU (blocks of 64 rows with
    # AVX-512, 32 with AVX2): a cache copied to another kind of CPU must not be read.
    cpu = torch.backends.cpu.get_cpu_capability()
    key = hashlib.sha256(
        f"{scheme}|{FORMAT_VERSION}|torch{torch_version}|{cpu}".encode()
    ).hexdigest()
    safe_id = model_id.replace("/", "--").replace("@", "-")
    return root / "quantized" / safe_id / f"{scheme}-{key[:12]}"


def _named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(unique tensors by name, alias name → the name stored), over params and buffers."""
    stored: dict[str, torch.Tensor] = {}
    by_identity: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        if tensor is None:
            continue
        first = by_identity.get(id(tensor))
        if first is not None:
            aliases[name] = first
            continue
        by_identity[id(tensor)] = name
        stored[name] = tensor.detach().contiguous()
    return stored, aliases


def store(model: nn.Module, target: Path, origin: dict[str, Any]) -> None:
    """Write ``model``'s quantized tensors to ``target`` (atomic; a best-effort cache)."""
    from filelock import FileLock
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / "meta.json").is_file():
            return
        # A folder without its meta.json is an entry whose writing was cut short (or
        # damaged): the rename below cannot replace it, so it goes first.
        shutil.rmtree(target, ignore_errors=True)
        partial = partial_path(target)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir()
            tensors, aliases = _named_tensors(model)
            save_file(tensors, str(partial / "weights.safetensors"))
            meta = {"format": FORMAT_VERSION, "aliases": aliases, **origin}
            (partial / "meta.json").write_text(json.dumps(meta, indent=2))
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    current = owner._parameters.get(attr, owner._buffers.get(attr))
    if current is not None and (current.shape != tensor.shape or current.dtype != tensor.dtype):
        # Written by other code (another group size, another layout): not this model's.
        raise ValueError(
            f"{name} is {tuple(tensor.shape)} {tensor.dtype} in the cache but "
            f"{tuple(current.shape)} {current.dtype} in the model"
        )
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


# safetensors' dtype names → torch's, for the dtypes a quantized model holds.
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read straight into its own buffer.

    Not through ``safetensors``' loader: its tensors are views that keep one buffer
    per file alive, and its 8-byte alignment is not enough for the int8/int4
    kernels (they load with AVX-512 and crash, SIGSEGV, on such memory), so each
    tensor had to be cloned while the whole file was still held: the quantized
    weights twice over at start (+90 MB peak RSS for SmolLM2 int4). torch's
    allocator aligns every buffer to 64 bytes, and a tensor's bytes are read into
    it directly, one tensor at a time.
    """
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        data_start = 8 + header_size
        header.pop("__metadata__", None)
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = spec["data_offsets"]
            buffer = torch.empty(end - start, dtype=torch.uint8)
            f.seek(data_start + start)
            if end > start and f.readinto(buffer.numpy().data) != end - start:
                raise ValueError(f"{path} is truncated at {name}")
            tensors[name] = buffer.view(_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return tensors


def load(target: Path, skeleton: nn.Module) -> nn.Module | None:
    """Fill ``skeleton`` (quantized modules on meta/empty) from ``target``, or None if absent.

    Raises if the entry does not fit the skeleton (a corrupt or foreign entry).
    """
    meta_path = target / "meta.json"
    if not meta_path.is_file():
        return None
    sweep_stale(target)  # no write of it comes again to sweep what a killed one left
    started = time.perf_counter()
    meta = json.loads(meta_path.read_text())
    tensors = read_tensors(target / "weights.safetensors")
    expected, _ = _named_tensors(skeleton)
    missing = sorted(set(expected) - set(tensors) - set(meta["aliases"]))
    if missing:
        raise ValueError(f"quantized cache {target} lacks {missing[:3]}")
    for name, tensor in tensors.items():
        _set_tensor(skeleton, name, tensor)
    for alias, name in meta["aliases"].items():
        _set_tensor(skeleton, alias, tensors[name])
    left_on_meta = [n for n, t in _named_tensors(skeleton)[0].items() if t.is_meta]
    if left_on_meta:
        raise ValueError(f"quantized cache {target} left {left_on_meta[:3]} unset")
    log.info("loaded quantized weights from %s in %.2fs", target, time.perf_counter() - started)
    return skeleton.eval()
