"""Peak RSS with a prompt that (nearly) fills the context: the edge node against llama.cpp.

    python bench/edge_long_prompt.py [--tokens 7600] [--threads 2]

`tidegate bench edge` measures memory with prompts of at most 512 tokens, where the
edge node's KV cache (sized per request) is small and llama.cpp's (allocated up
front for n_ctx) is not. This is the other end: one prompt of ``--tokens`` tokens
and 16 new ones, each runtime in a fresh process, llama.cpp with the model's own
context (as the edge node accepts). Prints a table: prompt tokens, peak RSS before
and after the prompt, TTFT, and the ratio. Needs the ``[bench]`` extra and the
edge model's caches (run `make demo` once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODEL = "smollm2-135m"


def _prompt(tokens: int) -> str:
    from tidegate.benchmarks.edge_worker import LONG_PARAGRAPH, LONG_QUESTION

    # ~63 tokens per paragraph; the exact count is measured by each runtime
    return LONG_PARAGRAPH * max(1, tokens // 63) + LONG_QUESTION


def _ours(tokens: int, threads: int) -> dict[str, float]:
    import asyncio

    from edge_node.settings import EdgeSettings
    from tidegate.benchmarks.edge_worker import peak_rss_mb
    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.inference.prepare import load_backend

    settings = EdgeSettings().model.model_copy(update={"threads": threads})
    backend = load_backend(settings)
    backend.wait_compiled(600)
    request = GenerationRequest(
        (ChatMessage("user", _prompt(tokens)),), SamplingParams(max_new_tokens=1)
    )
    before = peak_rss_mb()
    started = time.perf_counter()
    generation = asyncio.run(backend.generate(request))
    ttft = time.perf_counter() - started
    return {
        "prompt_tokens": generation.prompt_tokens,
        "peak_before_mb": before,
        "peak_mb": peak_rss_mb(),
        "ttft_s": ttft,
    }


def _llama_cpp(tokens: int, threads: int) -> dict[str, float]:
    import llama_cpp

    from tidegate.benchmarks.edge_worker import load_llama_cpp, peak_rss_mb

    llm = load_llama_cpp(llama_cpp, MODEL, threads, n_ctx=0)  # the model's own context
    before = peak_rss_mb()
    started = time.perf_counter()
    out = llm.create_chat_completion(
        [{"role": "user", "content": _prompt(tokens)}], max_tokens=1, temperature=0.0
    )
    ttft = time.perf_counter() - started
    return {
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "peak_before_mb": before,
        "peak_mb": peak_rss_mb(),
        "ttft_s": ttft,
        "n_ctx": llm.n_ctx(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("ours", "llama.cpp"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = _ours if args.worker == "ours" else _llama_cpp
        print(json.dumps(run(args.tokens, args.threads)))
        return 0
    rows = {}
    for worker in ("ours", "llama.cpp"):
        command = [sys.executable, __file__, "--worker", worker, "--tokens", str(args.tokens)]
        done = subprocess.run(
            [*command, "--threads", str(args.threads)], capture_output=True, text=True
        )
        if done.returncode != 0:
            rows[worker] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        rows[worker] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{MODEL}, {args.threads} threads, one prompt of ~{args.tokens} tokens, fresh processes")
    print(f"{'runtime':<10} {'prompt':>6} {'peak before':>11} {'peak':>6} {'×':>5} {'TTFT s':>7}")
    reference = rows.get("llama.cpp", {})
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<10} {row['error'][:120]}")
            continue
        ratio = row["peak_mb"] / reference["peak_mb"] if "peak_mb" in reference else None
        print(
            f"{name:<10} {row['prompt_tokens']:>6} {row['peak_before_mb']:>11.0f} "
            f"{row['peak_mb']:>6.0f} {'—' if ratio is None else f'{ratio:.2f}':>5} "
            f"{row['ttft_s']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
