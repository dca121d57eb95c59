"""One edge-benchmark variant, measured inside its own process (so RSS is its own).

    python -m tidegate.benchmarks.edge_worker '<json job>'

Prints one JSON object on its last line. Two kinds of job:
- ``prime``: make the variant's caches (quantized weights, compiled step) and
  time that first start;
- ``measure``: a warm start from those caches, then TTFT (short and 512-token
  prompts), decode tokens/s (128 new tokens, greedy) and peak RSS.
``llama.cpp`` runs through llama-cpp-python on the same GGUF file.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHORT_PROMPT = "Write a short story about a lighthouse keeper."
LONG_PARAGRAPH = (
    "The harbour town woke slowly. Fishing boats knocked against the pier while gulls "
    "argued over the night's catch, and the baker on the corner opened his shutters to "
    "a line of sleepy sailors. Beyond the breakwater the lighthouse stood white against "
    "a grey sky, its lamp still turning although the sun had already risen. "
)
LONG_QUESTION = "\n\nSummarise the text above in one sentence."
REPEATS = 3


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str  # ModelSettings.quantization, or "int8-dynamic"
    compiled: bool = False
    lm_head: str = "int8"  # int8/int4 schemes: how the lm_head is stored
    default: bool = False  # the edge node's own settings (EdgeSettings defaults)
    llama_cpp: bool = False
    threads: int | None = None  # overrides --threads (a diagnostic row)
    # llama.cpp's context, whose KV cache it allocates up front; 0: the model's own,
    # which is what the edge node accepts (it sizes its cache per request)
    n_ctx: int = 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _label(variant: Variant) -> str:
    """The quantization part of cache keys for variants ModelSettings cannot spell."""
    if variant.quantization in ("int4", "int8") and variant.lm_head != "int8":
        return f"{variant.quantization}-head{variant.lm_head}"
    return variant.quantization


# ---- our backend ---------------------------------------------------------------------


def _settings(job: dict[str, Any], variant: Variant) -> Any:
    from edge_node.settings import EdgeSettings
    from tidegate.config import ModelSettings

    base = EdgeSettings().model if variant.default else ModelSettings(source=job["model"])
    update: dict[str, Any] = {"threads": job["threads"], "cache_dir": job["cache_dir"]}
    if not variant.default:
        scheme = "none" if variant.quantization == "int8-dynamic" else variant.quantization
        update |= {"quantization": scheme, "compile": "off", "source": job["model"]}
    return base.model_copy(update=update)


def _backend(job: dict[str, Any], variant: Variant, prime: bool) -> tuple[Any, dict[str, Any]]:
    """Load the variant as a node would; returns (backend, timings).

    On the backend's own torch thread, as ``load_backend`` does: a second thread
    running torch ops would slow every op (transformers_backend's module doc).
    """
    from tidegate.inference.transformers_backend import torch_thread

    if variant.default:
        from tidegate.inference.prepare import load_backend

        started = time.perf_counter()
        backend = load_backend(_settings(job, variant))
        timings: dict[str, Any] = {"ready_s": time.perf_counter() - started}
        if prime and backend.decoder is not None:
            backend.wait_compiled(3600)
            timings["compile_s"] = time.perf_counter() - started - timings["ready_s"]
        timings["compiled"] = backend.decoder is not None and backend.wait_compiled(0)
        return backend, timings
    executor = torch_thread()
    return executor.submit(_load_variant, job, variant, prime, executor).result()


def _load_variant(
    job: dict[str, Any], variant: Variant, prime: bool, executor: Any
) -> tuple[Any, dict[str, Any]]:
    import torch

    from tidegate.inference import compiled_step
    from tidegate.inference.bundled import default_cache_root
    from tidegate.inference.prepare import prepare_model
    from tidegate.inference.transformers_backend import TransformersBackend

    settings = _settings(job, variant)
    started = time.perf_counter()
    timings: dict[str, Any] = {}
    lm_head: Any = None if _label(variant) == variant.quantization else variant.lm_head
    # compiled variants decode with the static decoder only: our own modules, as the node
    prepared = prepare_model(settings, lm_head=lm_head, own_modules=variant.compiled)
    model, tokenizer = prepared.model, prepared.tokenizer
    model_id, context = prepared.model_id, prepared.context_length
    if variant.quantization == "int8-dynamic":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    backend = TransformersBackend(
        model,
        tokenizer,
        model_id=model_id,
        context_length=context,
        quantization=_label(variant),
        threads=job["threads"],
        static_decoder=variant.compiled,
        executor=executor,
    )
    if variant.compiled:
        if backend.decoder is None:
            raise RuntimeError("the static decoder does not support this model")
        root = default_cache_root(settings.cache_dir)
        target = compiled_step.package_path(root, model_id, _label(variant), job["threads"])
        if not target.is_file():
            if not prime:
                raise RuntimeError(f"no compiled step at {target}: prime first")
            ready = time.perf_counter()
            compiled_step.build_package(backend.decoder, target)
            timings["compile_s"] = time.perf_counter() - ready
        backend.decoder.use_compiled(compiled_step.load_package(target, backend.decoder))
        timings["compiled"] = True
    timings["ready_s"] = time.perf_counter() - started - timings.get("compile_s", 0.0)
    return backend, timings


def _cold(job: dict[str, Any]) -> dict[str, Any]:
    """GGUF → safetensors into the (empty) bench cache, timed; and the long prompt."""
    from tidegate.config import ModelSettings
    from tidegate.inference.loading import load_model

    cache = Path(job["cache_dir"])
    fresh = not cache.exists() or not any(cache.iterdir())
    with tempfile.TemporaryDirectory(prefix="tidegate-cold-") as scratch:
        started = time.perf_counter()  # always into an empty cache, so cold is cold
        loaded = load_model(
            ModelSettings(
                source=job["model"], quantization="none", cache_dir=str(cache if fresh else scratch)
            )
        )
        convert_s = time.perf_counter() - started
    if not fresh:  # the variants' cache (already converted: a reload)
        load_model(ModelSettings(source=job["model"], quantization="none", cache_dir=str(cache)))
    prompt = _long_prompt(loaded.tokenizer, job["long_tokens"])
    ids = _chat_ids(loaded.tokenizer, prompt)
    return {
        "convert_s": convert_s,
        "converted": loaded.converted,
        "long_prompt": prompt,
        "long_prompt_tokens": len(ids),
    }


def _chat_ids(tokenizer: Any, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _long_prompt(tokenizer: Any, tokens: int) -> str:
    """A user message whose chat prompt is ``tokens`` tokens long (± 1 for the template)."""
    overhead = len(_chat_ids(tokenizer, ""))
    overhead += len(tokenizer(LONG_QUESTION, add_special_tokens=False)["input_ids"])
    body_ids = tokenizer(LONG_PARAGRAPH * 40, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(body_ids[: tokens - overhead]) + LONG_QUESTION


async def _measure_ours(backend: Any, job: dict[str, Any]) -> dict[str, Any]:
    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams

    def request(prompt: str, new_tokens: int) -> GenerationRequest:
        return GenerationRequest(
            (ChatMessage("user", prompt),), SamplingParams(max_new_tokens=new_tokens)
        )

    async def ttft(prompt: str) -> float:
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            await backend.generate(request(prompt, 1))
            times.append(time.perf_counter() - started)
        return min(times)  # best of the repeats, like decode

    await backend.generate(request(SHORT_PROMPT, 4))  # first-call effects out of the way
    result: dict[str, Any] = {
        "ttft_s": await ttft(SHORT_PROMPT),
        "ttft_long_s": await ttft(job["long_prompt"]),
    }
    backend.eos_ids = frozenset()  # always decode exactly new_tokens
    rates = []
    for _ in range(REPEATS):
        stamps: list[float] = []
        tokens = 0
        async for item in backend.stream(request(SHORT_PROMPT, job["new_tokens"])):
            stamps.append(time.perf_counter())
            if not isinstance(item, str):
                tokens = item.completion_tokens
        # first streamed text to the end: tokens after the first, over that time
        rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
    result["decode_tps"] = max(rates)  # best of the repeats, for both runtimes
    result["decode_tps_all"] = rates
    return result


# ---- llama.cpp -------------------------------------------------------------------------


def _gguf_path(model: str) -> Path:
    from tidegate.inference.bundled import BUNDLED_MODELS, part_files

    if model in BUNDLED_MODELS:
        files = part_files(BUNDLED_MODELS[model])
        if len(files) == 1:
            return files[0]
        raise RuntimeError(f"{model} is a multi-part GGUF; pass its assembled file")
    return Path(model)


@contextlib.contextmanager
def _without_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Load with ``use_extra_bufts`` off: the PyPI build's AMX buffer type crashes in
    ``ggml_backend_amx_mul_mat`` on CPUs with AMX (seen on a Xeon with AMX_INT8); off,
    ggml multiplies with its AVX-512 kernels. ``Llama(...)`` takes no such argument
    (0.3.36 swallows unknown keywords), so the default model parameters it starts
    from are switched for the duration of the load."""
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_extra() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


def load_llama_cpp(llama_cpp: Any, model: str, threads: int, n_ctx: int) -> Any:
    """``model``'s GGUF file in llama.cpp, on ``threads`` for prompt and decode, with
    ``n_ctx`` positions of context (0: the model's own)."""
    with _without_extra_buffer_types(llama_cpp):
        return llama_cpp.Llama(
            str(_gguf_path(model)),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            verbose=False,
        )


def _measure_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        return {"error": "llama-cpp-python is not installed (pip install -e '.[bench]')"}
    started = time.perf_counter()
    llm = load_llama_cpp(llama_cpp, job["model"], job["threads"], job["variant"]["n_ctx"])
    load_s = time.perf_counter() - started

    def complete(prompt: str, new_tokens: int, stream: bool = False) -> Any:
        return llm.create_chat_completion(
            [{"role": "user", "content": prompt}],
            max_tokens=new_tokens,
            temperature=0.0,
            stream=stream,
        )

    def ttft(prompt: str) -> float:
        times = []
        for _ in range(REPEATS):
            llm.reset()  # no prompt-cache reuse between repeats
            t0 = time.perf_counter()
            complete(prompt, 1)
            times.append(time.perf_counter() - t0)
        return min(times)  # best of the repeats, like decode

    complete(SHORT_PROMPT, 4)
    result: dict[str, Any] = {
        "ready_s": load_s,
        "ttft_s": ttft(SHORT_PROMPT),
        "ttft_long_s": ttft(job["long_prompt"]),
    }
    rates = []
    for _ in range(REPEATS):
        llm.reset()
        stamps = []
        for _chunk in complete(SHORT_PROMPT, job["new_tokens"], stream=True):
            stamps.append(time.perf_counter())
        stamps = stamps[1:]  # the first chunk is the role header, not a token
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["decode_tps"] = max(rates)  # best of the repeats, for both runtimes
    result["decode_tps_all"] = rates
    result["new_tokens_seen"] = len(stamps)
    result["amx"] = "off (use_extra_bufts=False)"
    result["n_ctx"] = llm.n_ctx()
    return result


# ---- entry ----------------------------------------------------------------------------


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    if job["kind"] == "cold":
        return _cold(job) | {"peak_rss_mb": peak_rss_mb()}
    variant = Variant(**job["variant"])
    if variant.llama_cpp:
        result = _measure_llama_cpp(job)
    else:
        started = time.perf_counter()
        import torch
        import transformers  # noqa: F401 - timed: a node imports it to load the model

        import tidegate.inference.transformers_backend  # noqa: F401

        imports_s = time.perf_counter() - started
        torch.set_num_threads(job["threads"])
        backend, result = _backend(job, variant, prime=job["kind"] == "prime")
        result["imports_s"] = imports_s
        if job["kind"] == "measure":
            result |= asyncio.run(_measure_ours(backend, job))
        result["model"] = backend.info.model
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> int:
    job = json.loads(sys.argv[1])
    try:
        result = run_job(job)
    except Exception as exc:  # noqa: BLE001 - the row reports it, the table goes on
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
