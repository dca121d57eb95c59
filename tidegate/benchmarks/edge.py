"""The edge model side by side with llama.cpp: TTFT, decode tokens/s, peak RSS, load times.

    tidegate bench edge [--json] [--model smollm2-135m] [--threads 2]
    python bench/edge.py ...            (the same)

Every variant runs in fresh processes (tidegate.benchmarks.edge_worker): a
*prime* process makes its caches and times the first start (quantization,
compiled-step build), then a *measure* process starts warm from those caches
and measures, so each row's peak RSS and warm load are its own. The cold
load (GGUF → safetensors conversion) is timed once, into an empty cache.

Rows: fp32, int8 dynamic (torch.ao), int8 and int4 weight-only (bf16
activations), each also "+ compile" (static KV cache + the AOT-compiled step),
int4 with an int4 lm_head + compile (the fastest we have), ``default`` (the
edge node's own settings: what it really serves with) and ``llama.cpp``
(llama-cpp-python on the same GGUF file, same threads and prompts; skipped
with a message when not installed: ``pip install -e '.[bench]'``).

Numbers drift run to run on a shared CPU: compare rows within one run (the
ratios printed against llama.cpp), and read the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from tidegate.benchmarks.edge_worker import Variant

VARIANTS = (
    Variant("fp32", "none"),
    Variant("fp32 + compile", "none", compiled=True),
    Variant("int8 dynamic", "int8-dynamic"),
    Variant("int8 dynamic + compile", "int8-dynamic", compiled=True),
    Variant("int8 wo bf16", "int8"),
    Variant("int8 wo bf16 + compile", "int8", compiled=True),
    Variant("int4 wo bf16", "int4"),
    Variant("int4 wo bf16 + compile", "int4", compiled=True),
    Variant("fastest: int4 + int4 lm_head + compile", "int4", compiled=True, lm_head="int4"),
    Variant("default", "int4", default=True),
    # the reference: llama.cpp allocating the model's whole context (8192 for SmolLM2),
    # as the edge node accepts prompts up to it
    Variant("llama.cpp", "gguf", llama_cpp=True),
    # the same, limited to 2048 tokens (a smaller KV cache allocated up front): leaner,
    # but it refuses what the edge node serves past 2048 tokens
    Variant("llama.cpp, n_ctx 2048", "gguf", llama_cpp=True, n_ctx=2048),
    # llama.cpp's threads spin-wait at each barrier: on a busy CPU, one thread fewer
    # can be faster; shown to read the 2-thread row, never used as the reference
    Variant("llama.cpp, 1 thread", "gguf", llama_cpp=True, threads=1),
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``tidegate bench edge``."""
    bench = sub.add_parser("bench", help="benchmarks (side by side, in one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    edge = bench_sub.add_parser(
        "edge",
        help="the edge model vs llama.cpp: TTFT, decode tok/s, peak RSS, load times",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(edge)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or .gguf path")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded per run (128)")
    parser.add_argument("--long-tokens", type=int, default=512, help="long prompt (512)")
    parser.add_argument(
        "--only", help="comma-separated variant names (default: all); llama.cpp always runs"
    )
    parser.add_argument(
        "--cache-dir", help="model caches (default: a fresh temporary folder, so 'cold' is cold)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved measurement rounds (best of; 3)"
    )


def _job(args: argparse.Namespace, cache_dir: str, kind: str, **extra: Any) -> dict[str, Any]:
    threads = (extra.get("variant") or {}).get("threads") or args.threads
    job = {
        "kind": kind,
        "model": args.model,
        "threads": threads,
        "new_tokens": args.new_tokens,
        "long_tokens": args.long_tokens,
        "cache_dir": cache_dir,
    }
    cmd = [sys.executable, "-m", "tidegate.benchmarks.edge_worker", json.dumps(job | extra)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exit {done.returncode}: {tail}"}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of the rounds for times (what the variant can do when the CPU lets it),
    worst for memory."""
    best = dict(max(runs, key=lambda r: r["decode_tps"]))
    best["ttft_s"] = min(r["ttft_s"] for r in runs)
    best["ttft_long_s"] = min(r["ttft_long_s"] for r in runs)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["load_warm_s"] = min(r["ready_s"] for r in runs)
    best["decode_tps_rounds"] = [round(r["decode_tps"], 1) for r in runs]
    best.pop("ready_s", None)
    best.pop("decode_tps_all", None)
    return best


def round_ratios(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[float]:
    """decode tok/s over llama.cpp's in the same round: both ran within seconds of each
    other, so a ratio per round cancels the load that drifts between rounds."""
    return [
        ours["decode_tps"] / theirs["decode_tps"]
        for ours, theirs in zip(runs, reference, strict=False)
        if "error" not in ours and "error" not in theirs and theirs.get("decode_tps")
    ]


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _wanted_variants(only: str | None) -> set[str] | None:
    """``--only``'s names (None: all); an unknown name is an error that lists the known."""
    if not only:
        return None
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = wanted - {v.name for v in VARIANTS}
    if unknown:
        known = "; ".join(v.name for v in VARIANTS if not v.llama_cpp)
        raise SystemExit(f"error: --only: unknown variant(s) {sorted(unknown)}; known: {known}")
    return wanted


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every variant; returns (rows, run facts)."""
    wanted = _wanted_variants(args.only)
    variants = [v for v in VARIANTS if wanted is None or v.name in wanted or v.llama_cpp]
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as scratch:
        cache_dir = args.cache_dir or scratch
        facts: dict[str, Any] = {"load_avg_start": _loadavg(), "started": time.time()}
        cold = _job(args, cache_dir, "cold")
        if "error" in cold:
            raise SystemExit(f"error: converting {args.model}: {cold['error']}")
        facts |= {k: cold[k] for k in ("convert_s", "converted", "long_prompt_tokens")}
        primes: dict[str, dict[str, Any]] = {}
        for variant in variants:  # first starts: caches, quantization, compiled steps
            extra = {"variant": asdict(variant), "long_prompt": cold["long_prompt"]}
            primes[variant.name] = (
                {} if variant.llama_cpp else _job(args, cache_dir, "prime", **extra)
            )
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for round_ in range(args.rounds):  # interleaved, alternating order: load drifts
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                if "error" in primes[variant.name]:
                    continue
                extra = {"variant": asdict(variant), "long_prompt": cold["long_prompt"]}
                runs[variant.name].append(_job(args, cache_dir, "measure", **extra))
        reference = next((runs[v.name] for v in variants if v.name == "llama.cpp"), [])
        rows = []
        for variant in variants:
            prime = primes[variant.name]
            row: dict[str, Any] = {
                "variant": variant.name,
                "threads": variant.threads or args.threads,
            }
            measured = [r for r in runs[variant.name] if "error" not in r]
            error = prime.get("error") or next(
                (r["error"] for r in runs[variant.name] if "error" in r), None
            )
            if error or not measured:
                row["error"] = error or "no measurement"
                rows.append(row)
                continue
            row |= _best(measured)
            ratios = round_ratios(runs[variant.name], reference)
            if ratios:
                row["decode_ratio_rounds"] = [round(r, 3) for r in ratios]
                row["decode_ratio_median"] = statistics.median(ratios)
            if not variant.llama_cpp:
                row["load_cold_s"] = cold["convert_s"] + prime["ready_s"]
                row["compile_s"] = prime.get("compile_s")
                row["prime_peak_rss_mb"] = prime["peak_rss_mb"]
            rows.append(row)
        facts["load_avg_end"] = _loadavg()
    return rows, facts


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render(rows: list[dict[str, Any]], facts: dict[str, Any], args: argparse.Namespace) -> str:
    import torch

    reference = next((r for r in rows if r["variant"] == "llama.cpp" and "error" not in r), None)
    # the table's ratios are against llama.cpp on the same threads
    lines = [
        f"{args.model}: {args.threads} threads, batch 1, greedy, {args.new_tokens} new tokens; "
        f"long prompt {facts['long_prompt_tokens']} tokens; torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs; load average {facts['load_avg_start']} → {facts['load_avg_end']}",
        f"cold = GGUF → safetensors ({facts['convert_s']:.1f} s, once) + first start "
        "(quantize); compile = AOT build of the decode step (once, in the background); "
        "warm = caches → ready to serve (after imports)",
        f"each variant in fresh processes; times: best of {args.rounds} interleaved rounds × 3 "
        "repeats; RSS: the worst round; ×round: median of the per-round decode ratios "
        "(each round's run against llama.cpp's in the same round)",
    ]
    header = (
        f"{'variant':<38} {'decode':>7} {'×llama':>6} {'×round':>6} {'TTFT':>6} {'×':>5} "
        f"{'TTFT512':>7} {'×':>5} {'RSS MB':>6} {'×':>5} {'cold s':>6} {'warm s':>6} {'compile':>7}"
    )
    lines += [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['variant']:<38} {row['error'][:150]}")
            continue

        def ratio(key: str, row: dict[str, Any] = row) -> str:
            if reference is None or not row.get(key) or not reference.get(key):
                return "—"
            return f"{row[key] / reference[key]:.2f}"

        lines.append(
            f"{row['variant']:<38} {row['decode_tps']:>7.1f} {ratio('decode_tps'):>6} "
            f"{_cell(row.get('decode_ratio_median'), '6.2f'):>6} "
            f"{row['ttft_s']:>6.3f} {ratio('ttft_s'):>5} {row['ttft_long_s']:>7.3f} "
            f"{ratio('ttft_long_s'):>5} {row['peak_rss_mb']:>6.0f} {ratio('peak_rss_mb'):>5} "
            f"{_cell(row.get('load_cold_s'), '6.1f'):>6} "
            f"{_cell(row.get('load_warm_s'), '6.2f'):>6} {_cell(row.get('compile_s'), '7.0f'):>7}"
        )
    if reference is not None:
        lines.append(
            "llama.cpp: llama-cpp-python 0.3.36 from PyPI (native build), use_extra_bufts=False "
            f"(AMX buffer type off: it segfaults on AMX CPUs), n_ctx {reference.get('n_ctx')} "
            "(the model's context, which the edge node accepts too), no log-probs; "
            "ours always computes each token's log-prob and entropy"
        )
        lines += _short_context_ratios(rows)
    return "\n".join(lines)


def _short_context_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Peak RSS against the llama.cpp that allocates only 2048 tokens of context."""
    short = next((r for r in rows if r["variant"] == "llama.cpp, n_ctx 2048"), None)
    if short is None or "error" in short:
        return []
    ours = [r for r in rows if not r["variant"].startswith("llama.cpp") and "error" not in r]
    base = short["peak_rss_mb"]
    ratios = ", ".join(f"{r['variant']} {r['peak_rss_mb'] / base:.2f}" for r in ours)
    return [f"peak RSS against llama.cpp with n_ctx 2048: {ratios}"] if ratios else []


def json_rows(rows: list[dict[str, Any]], facts: dict[str, Any]) -> list[dict[str, Any]]:
    """``--json``: one object per row; ``variant``, ``decode_tps``, ``ttft_s`` and
    ``peak_rss_mb`` always (None on a row that failed or was skipped: see ``error``)."""
    load_avg = f"{facts['load_avg_start']} → {facts['load_avg_end']}"
    return [
        {
            "variant": row["variant"],
            "decode_tps": row.get("decode_tps"),
            "ttft_s": row.get("ttft_s"),
            "peak_rss_mb": row.get("peak_rss_mb"),
            **row,
            "load_avg": load_avg,
        }
        for row in rows
    ]


def run(args: argparse.Namespace) -> int:
    rows, facts = measure(args)
    if args.json:
        for row in json_rows(rows, facts):
            print(json.dumps(row))
    else:
        print(render(rows, facts, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
