"""Edge model quantization side by side: load time, decode speed, memory, agreement.

    python bench/edge_quant.py [--model smollm2-135m] [--threads 2] [--new-tokens 128]

Each variant runs in its own fresh process (so load time and RSS are its own);
agreement is teacher-forced next-token agreement with fp32: every variant
predicts the next token along the fp32 greedy answers to the same prompts.
Numbers drift ±7% run to run on shared CPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash map works.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
]

VARIANTS = [  # (label, quantization, quantize_lm_head)
    ("none (fp32)", "none", True),
    ("bf16", "bf16", True),
    ("int8", "int8", True),
    ("int8, bf16 lm_head", "int8", False),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(args, quantization: str, quantize_lm_head: bool, sequences) -> dict:
    """In a fresh process: load, decode-speed, and teacher-forced argmax predictions."""
    import asyncio

    import torch

    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.config import ModelSettings
    from tidegate.inference.loading import load_model, release_freed_memory
    from tidegate.inference.quantize import quantize_model
    from tidegate.inference.transformers_backend import TransformersBackend

    torch.set_num_threads(args.threads)
    settings = ModelSettings(source=args.model, quantization=quantization, threads=args.threads)
    started = time.perf_counter()
    loaded = load_model(settings)
    model = quantize_model(loaded.model, quantization, quantize_lm_head=quantize_lm_head)
    release_freed_memory()
    load_s = time.perf_counter() - started
    backend = TransformersBackend(
        model,
        loaded.tokenizer,
        model_id=loaded.model_id,
        context_length=loaded.context_length,
        quantization=quantization,
    )
    backend.eos_ids = frozenset()  # always decode exactly --new-tokens

    async def decode() -> tuple[list[float], list[list[int]]]:
        rates, answers = [], []
        for prompt in PROMPTS[: args.speed_prompts]:
            request = GenerationRequest(
                (ChatMessage("user", prompt),), SamplingParams(max_new_tokens=args.new_tokens)
            )
            generation = await backend.generate(request)
            rates.append(generation.completion_tokens / (generation.generation_ms / 1000))
        for prompt in PROMPTS:
            request = GenerationRequest(
                (ChatMessage("user", prompt),), SamplingParams(max_new_tokens=args.new_tokens)
            )
            answers.append(backend.encode_prompt(request))
        return rates, answers

    rates, prompt_ids = asyncio.run(decode())
    predictions = []
    with torch.inference_mode():
        for ids, answer in zip(prompt_ids, sequences or [[]] * len(PROMPTS), strict=True):
            full = torch.tensor([ids + answer])  # [1, prompt + answer]
            logits = model(input_ids=full).logits[0, len(ids) - 1 : -1]  # [answer, vocab]
            predictions.append(logits.float().argmax(-1).tolist())
    return {
        "load_s": load_s,
        "tok_s": statistics.median(rates),
        "rss_mb": _rss_mb(),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "predictions": predictions,
        "prompt_ids": prompt_ids,
        "model_id": backend.info.model,
    }


def reference_answers(args) -> list[list[int]]:
    """fp32 greedy answers (token ids) to PROMPTS, stopping at EOS."""
    import asyncio

    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.config import ModelSettings
    from tidegate.inference.loading import load_backend

    backend = load_backend(
        ModelSettings(source=args.model, quantization="none", threads=args.threads)
    )

    async def answer(prompt: str) -> list[int]:
        request = GenerationRequest(
            (ChatMessage("user", prompt),), SamplingParams(max_new_tokens=args.new_tokens)
        )
        return (await backend.generate(request)).token_ids

    async def all_answers() -> list[list[int]]:
        return [await answer(p) for p in PROMPTS]

    return asyncio.run(all_answers())


def cold_load(args) -> float:
    """GGUF → safetensors conversion into an empty cache, then the load (seconds)."""
    from tidegate.config import ModelSettings
    from tidegate.inference.loading import load_model

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        load_model(ModelSettings(source=args.model, quantization="none", cache_dir=cache))
        return time.perf_counter() - started


def in_fresh_process(fn, *fn_args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, fn_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--speed-prompts", type=int, default=2)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-load measurement")
    args = parser.parse_args()

    import torch

    cold = None if args.no_cold else in_fresh_process(cold_load, args)
    sequences = in_fresh_process(reference_answers, args)
    results = {
        label: in_fresh_process(run_variant, args, quantization, lm_head, sequences)
        for label, quantization, lm_head in VARIANTS
    }
    reference = results[VARIANTS[0][0]]["predictions"]
    positions = sum(len(s) for s in sequences)
    print(
        f"\n{args.model}: {args.threads} threads, {args.new_tokens} new tokens, "
        f"torch {torch.__version__}; agreement over {positions} positions of "
        f"{len(PROMPTS)} fp32 greedy answers"
    )
    with open("/proc/loadavg") as fh:  # other work on the machine skews tok/s and load s
        print(
            f"load average at the end: {' '.join(fh.read().split()[:3])} on {mp.cpu_count()} CPUs"
        )
    if cold is not None:
        print(f"cold load (GGUF → safetensors conversion + load): {cold:.1f} s")
    columns = ("load s", "tok/s", "× fp32", "agree", "RSS MB", "peak MB")
    header = f"{'variant':<20} " + " ".join(f"{c:>7}" for c in columns)
    print(header)
    print("-" * len(header))
    base_rate = results[VARIANTS[0][0]]["tok_s"]
    for label, *_ in VARIANTS:
        r = results[label]
        same = sum(
            a == b
            for ref, got in zip(reference, r["predictions"], strict=True)
            for a, b in zip(ref, got, strict=True)
        )
        print(
            f"{label:<20} {r['load_s']:>7.2f} {r['tok_s']:>7.1f} {r['tok_s'] / base_rate:>7.2f} "
            f"{same / positions:>7.3f} {r['rss_mb']:>7.0f} {r['peak_mb']:>7.0f}"
        )


if __name__ == "__main__":
    main()
