"""The static decoder's step, compiled ahead of time (torch.export + AOTInductor) and
cached on disk as a ``.pt2`` package.

Why AOT rather than ``torch.compile`` at start: loading a package takes ~0.1 s,
while a just-in-time compile re-traces the 30 layers in Python at every start
(~16 s with inductor's caches warm, ~1 min cold) and holds the GIL meanwhile,
starving the requests it was meant to speed up (measured: 8 tokens in 9 s). The
compiled step also runs without dynamo's guards or a Python wrapper (5.3 vs
6.8 ms per token for SmolLM2 int4 on 2 threads).

Lifecycle (``attach``):
- the package exists: load it (~0.1 s) before serving;
- it does not: serve with the eager static decoder at once, build the package
  in a child process (``python -m tidegate.inference.compiled_step``: no GIL
  shared with the server; ~1 min for SmolLM2 on 2 busy cores) and switch to it
  at the first generation after it is ready (loaded on the serving thread).

The compiled step multiplies by the very tensors the eager modules hold (the
prompt's prefill needs those anyway): the package is built without weights in
its library, each weight is pickled beside it by name (``pickle_weights``),
and at load the runtime is handed the eager modules' tensors by their module
path (``load_constants``, user-managed: no copy). Only the weights that have
no module path (a few scalars inductor made) are read from the package. A
package whose weights were embedded cost +95 MB of RSS for SmolLM2 int4, a
second copy of every weight.

The package key covers what the compiled code depends on: the model identity,
the quantization, the intra-op thread count (inductor bakes it into its
OpenMP loops), torch's version, the CPU's capability (inductor compiles for
it, and the int4 weights' packing differs between AVX-512 and AVX2) and the
source of the modules that define the step, so editing them, upgrading torch
or moving the cache to another kind of CPU rebuilds it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import io
import json
import logging
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from tidegate.inference.partial_files import partial_path, sweep_stale
from tidegate.inference.static_decoder import MIN_CAPACITY, StaticDecoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
# Weights neither inside the library (loading it would copy them) nor in one blob
# (loaded as one more copy), but pickled one by one under their module paths, so
# that the loader can take the eager modules' own tensors instead (``_constants``).
PACKAGE_OPTIONS = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
}


@functools.cache
def _code_fingerprint() -> str:
    """The source of everything the compiled graph is traced from."""
    from tidegate.inference import int4, llama_modules, quantize, static_decoder

    digest = hashlib.sha256()
    for module in (static_decoder, llama_modules, quantize, int4):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def package_path(root: Path, model_id: str, quantization: str, threads: int) -> Path:
    torch_version = torch.__version__.split("+")[0]
    key = hashlib.sha256(
        f"{FORMAT_VERSION}|{model_id}|{quantization}|{threads}|{torch_version}|"
        f"{torch.backends.cpu.get_cpu_capability()}|{_code_fingerprint()}".encode()
    ).hexdigest()[:16]
    safe_id = model_id.replace("/", "--").replace("@", "-")
    return root / "compiled" / safe_id / f"step-{quantization}-{threads}t-{key}.pt2"


class _StepModule(torch.nn.Module):
    """``step_function`` as a module, so that torch.export sees the weights as state."""

    def __init__(self, decoder: StaticDecoder) -> None:
        super().__init__()
        self.model = decoder.model
        self.decoder = decoder

    def forward(self, token, pos, k_caches, v_caches, cos, sin):  # type: ignore[no-untyped-def]
        return self.decoder.step_function(token, pos, k_caches, v_caches, cos, sin)


def build_package(decoder: StaticDecoder, target: Path) -> float:
    """Export and compile ``decoder``'s step into ``target`` (atomic); returns seconds."""
    import torch._inductor  # only here: the serving side loads packages without it

    started = time.perf_counter()
    keys, values = decoder.allocate_cache(MIN_CAPACITY)  # scratch: normal tensors, for export
    cos, sin = decoder.rotary_tables(MIN_CAPACITY)
    token, pos = torch.zeros(1, 1, dtype=torch.long), torch.tensor([3])
    capacity = torch.export.Dim("capacity", min=16, max=max(decoder.max_context, 32))
    layers = len(keys)
    shapes = (
        None,
        None,
        [{2: capacity}] * layers,
        [{2: capacity}] * layers,
        {0: capacity},
        {0: capacity},
    )
    with torch.no_grad():
        exported = torch.export.export(
            _StepModule(decoder), (token, pos, keys, values, cos, sin), dynamic_shapes=shapes
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target, ".pt2")
    try:
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(partial), inductor_configs=PACKAGE_OPTIONS
        )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return time.perf_counter() - started


def _state(decoder: StaticDecoder) -> dict[str, torch.Tensor]:
    """The decoder's weights by the module paths the package names them with."""
    return {
        f"model.{name}": tensor for name, tensor in decoder.model.state_dict(keep_vars=True).items()
    }


def _constants(archive: zipfile.ZipFile, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every weight the compiled code reads: the eager module's own tensor where the
    package names one with the same shape and strides (the package records no more), else
    the package's copy."""
    names = archive.namelist()
    config_name = next(n for n in names if n.endswith("data/aotinductor/model/weights_config.json"))
    root = config_name.removesuffix("aotinductor/model/weights_config.json")
    stored: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    for name, (file, shape, stride, offset) in json.loads(archive.read(config_name)).items():
        own = state.get(name)
        if (
            own is not None
            and list(own.shape) == shape
            and list(own.stride()) == stride
            and own.storage_offset() == offset
        ):
            constants[name] = own.detach()
            continue
        if file not in stored:
            blob = archive.read(f"{root}weights/{file}")
            stored[file] = torch.load(io.BytesIO(blob), weights_only=True)
        constants[name] = torch.as_strided(stored[file], shape, stride, offset)
    return constants


def load_package(target: Path, decoder: StaticDecoder) -> Any:
    """The compiled step from ``target``, multiplying by ``decoder``'s own weights:
    called like ``StaticDecoder.step_function``.

    Through torch's C++ package loader: ``torch._inductor.aoti_load_package``
    would import inductor (~70 MB, ~1 s) just to wrap it in a pytree call.
    """
    loader = torch._C._aoti.AOTIModelPackageLoader(str(target), "model", False, 1, -1)
    with zipfile.ZipFile(target) as archive:
        constants = _constants(archive, _state(decoder))
    # user-managed: the runtime keeps these tensors instead of copying them (the
    # decoder holds them for as long as the step serves)
    loader.load_constants(constants, False, True, True)

    def step(token, pos, k_caches, v_caches, cos, sin):  # type: ignore[no-untyped-def]
        logprobs, summary, hidden = loader.boxed_run([token, pos, *k_caches, *v_caches, cos, sin])
        return logprobs, summary, hidden

    return step


def _build_in_child(settings_json: str, target: Path, threads: int) -> subprocess.Popen[bytes]:
    """The build, in a child process whose output goes to ``<target>.log``.

    Not to a pipe: if the server exits first, the child still finishes (and
    the next start loads the package) instead of dying on a broken pipe.
    """
    command = [
        sys.executable,
        "-m",
        "tidegate.inference.compiled_step",
        "--settings",
        settings_json,
        "--out",
        str(target),
        "--threads",
        str(threads),
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(_log_path(target), "wb") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


def _log_path(target: Path) -> Path:
    return target.with_name(target.name + ".log")


def attach(decoder: StaticDecoder, settings: Any, model_id: str, root: Path) -> None:
    """Load the cached package now, or build it in a child process and load it when done.

    ``settings``: the node's ModelSettings (the child loads the same model the
    same way, from the quantized-weight cache).
    """
    threads = torch.get_num_threads()
    target = package_path(root, model_id, settings.quantization, threads)
    if target.is_file():
        sweep_stale(target)  # no build of it comes again to sweep what a killed one left
        try:
            started = time.perf_counter()
            decoder.use_compiled(load_package(target, decoder))
            log.info("loaded the compiled step %s in %.2fs", target, time.perf_counter() - started)
            return
        except Exception as exc:  # noqa: BLE001 - a stale or corrupt package is rebuilt
            log.warning("rebuilding the compiled step: %s could not be loaded: %s", target, exc)
            target.unlink(missing_ok=True)
    child_settings = settings.model_copy(update={"compile": "off", "threads": threads})
    try:
        child = _build_in_child(child_settings.model_dump_json(), target, threads)
    except OSError as exc:  # a read-only or full cache: serve uncompiled, as on any failure
        decoder.compile_error = f"{type(exc).__name__}: {exc}"
        decoder.compile_done.set()
        log.warning("cannot build the compiled step in %s (%s); decoding uncompiled", target, exc)
        return
    decoder.build_process = child
    log.info("compiling the decode step in the background (pid %d) → %s", child.pid, target)

    def wait() -> None:
        started = time.perf_counter()
        child.wait()
        try:
            if child.returncode != 0:
                output = _log_path(target).read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"exit {child.returncode}: {' | '.join(output[-3:])}")
            decoder.offer_compiled(lambda: load_package(target, decoder))
            log.info("compiled the decode step in %.0fs", time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - the eager step keeps serving
            decoder.compile_error = f"{type(exc).__name__}: {exc}"
            decoder.compile_done.set()
            if child.returncode is not None and child.returncode < 0:  # stopped by close()
                return
            log.warning("compiling the decode step failed; decoding uncompiled: %s", exc)

    threading.Thread(target=wait, name="tidegate-compile-wait", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Child process: load the model as ``--settings`` says and build ``--out``."""
    from filelock import FileLock

    from tidegate.config import ModelSettings
    from tidegate.inference.prepare import prepare_model

    parser = argparse.ArgumentParser(description="build the static decoder's compiled step")
    parser.add_argument("--settings", required=True, help="ModelSettings as JSON")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", required=True, type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ModelSettings.model_validate(json.loads(args.settings))
    # One build per package: a second node starting meanwhile waits, then finds it.
    with FileLock(str(args.out.with_name(args.out.name + ".lock"))):
        if args.out.is_file():
            print(f"{args.out} was built meanwhile")
            return 0
        prepared = prepare_model(settings)
        decoder = StaticDecoder(prepared.model, max_context=prepared.context_length)
        seconds = build_package(decoder, args.out)
    print(f"built {args.out} in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
