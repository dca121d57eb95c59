"""What each confidence estimator costs on top of one edge generation, side by side.

    python bench/estimators.py [--model smollm2-135m] [--quantization int8] [--items 24]
                               [--multi-items 8] [--max-new-tokens 48] [--threads 2]

One process, one loaded edge model, the same dev-set questions for every row.
For each question the answer is generated once (greedy, no cache) and then
scored by every estimator; the table gives each estimator's time per answer and
its ratio to the generation time. Single-pass estimators also depend on the
per-token signals the decode loop computes for every token (log-softmax and
entropy over the vocabulary); their share of the decode loop is measured
separately (``token signals``), so the single-pass total is signals + score.
Multi-pass estimators (consistency, self_verify) run on the first
``--multi-items`` questions only. Numbers drift ±7% run to run on shared CPUs;
the ratios are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

DEVSET = Path(__file__).resolve().parents[1] / "data" / "devset" / "devset.jsonl"
SINGLE_PASS_BUDGET = 0.10  # the bar: ≤ 10% of edge generation time


def _questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in DEVSET.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "test"]
    step = max(1, len(rows) // n)
    return [r["question"] for r in rows[::step][:n]]


def _signal_share(backend, tokens: int, repeats: int = 200) -> tuple[float, float]:
    """ms per token of token_signals (log-softmax + entropy) vs the bare argmax it replaces."""
    import torch

    from tidegate.inference.transformers_backend import token_signals

    vocab = backend.model.config.vocab_size
    logits = torch.randn(vocab)
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(repeats):
            logprobs, entropy = token_signals(logits)
            float(logprobs[int(torch.argmax(logprobs))]), float(entropy)
        with_signals = (time.perf_counter() - started) / repeats * 1000
        started = time.perf_counter()
        for _ in range(repeats):
            int(torch.argmax(logits))
        bare = (time.perf_counter() - started) / repeats * 1000
    return with_signals - bare, bare


async def main(args: argparse.Namespace) -> None:
    from edge_node.estimators import ESTIMATORS
    from edge_node.estimators_registry import FITTED, build_any_estimator
    from edge_node.settings import EstimatorSettings
    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.config import ModelSettings
    from tidegate.inference import load_backend

    backend = load_backend(
        ModelSettings(source=args.model, quantization=args.quantization, threads=args.threads)
    )
    single = list(ESTIMATORS)
    for name in FITTED:  # where weights are fitted for this model
        try:
            build_any_estimator(name, backend)
            single.append(name)
        except FileNotFoundError:
            pass
    options = EstimatorSettings(consistency_samples=args.samples)
    estimators = {name: build_any_estimator(name, backend, options) for name in single}
    multi = {n: build_any_estimator(n, backend, options) for n in ("self_verify", "consistency")}
    generation_ms: list[float] = []
    tokens: list[int] = []
    spent: dict[str, list[float]] = {name: [] for name in [*estimators, *multi]}
    multi_generation_ms: list[float] = []
    questions = _questions(args.items)
    await backend.generate(  # warm-up
        GenerationRequest((ChatMessage("user", "Hi"),), SamplingParams(max_new_tokens=4))
    )
    for index, question in enumerate(questions):
        request = GenerationRequest(
            (ChatMessage("user", question),), SamplingParams(max_new_tokens=args.max_new_tokens)
        )
        started = time.perf_counter()
        generation = await backend.generate(request)
        elapsed = (time.perf_counter() - started) * 1000
        generation_ms.append(elapsed)
        tokens.append(len(generation.token_ids))
        for name, estimator in estimators.items():
            started = time.perf_counter()
            for _ in range(20):  # microseconds each: repeat for a stable number
                await estimator.score(request, generation)
            spent[name].append((time.perf_counter() - started) * 1000 / 20)
        if index < args.multi_items:
            multi_generation_ms.append(elapsed)
            for name, estimator in multi.items():
                started = time.perf_counter()
                await estimator.score(request, generation)
                spent[name].append((time.perf_counter() - started) * 1000)
    signals_ms, argmax_ms = _signal_share(backend, statistics.mean(tokens))
    await backend.close()

    gen_mean = statistics.mean(generation_ms)
    per_answer_signals = signals_ms * statistics.mean(tokens)
    print(
        f"edge {backend.info.model} · {len(questions)} questions · {args.threads} threads · "
        f"generation {gen_mean:.0f} ms/answer ({statistics.mean(tokens):.1f} tokens)"
    )
    print(
        f"token signals in the decode loop: {signals_ms:.3f} ms/token over a bare argmax "
        f"({argmax_ms:.3f} ms) = {per_answer_signals:.1f} ms/answer "
        f"({100 * per_answer_signals / gen_mean:.2f}% of generation)"
    )
    header = (
        f"{'estimator':14} {'score() ms':>10} {'extra ms/answer':>16} {'vs generation':>14}  "
        f"{'kind':12} verdict"
    )
    print(header)
    print("-" * len(header))
    for name in single:
        score_ms = statistics.mean(spent[name])
        ms = score_ms + per_answer_signals  # the estimator needs the signals, too
        ratio = ms / gen_mean
        verdict = "ok (≤ 10%)" if ratio <= SINGLE_PASS_BUDGET else "OVER 10%"
        print(
            f"{name:14} {score_ms:10.3f} {ms:16.2f} {100 * ratio:13.2f}%  "
            f"{'single-pass':12} {verdict}"
        )
    multi_mean = statistics.mean(multi_generation_ms) if multi_generation_ms else float("nan")
    for name, estimator in multi.items():
        ms = statistics.mean(spent[name]) if spent[name] else float("nan")
        print(
            f"{name:14} {ms:10.1f} {ms:16.1f} {100 * ms / multi_mean:13.1f}%  {'multi-pass':12} "
            f"{estimator.extra_cost} (first {len(spent[name])} questions)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4", "bf16"])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--multi-items", type=int, default=8)
    parser.add_argument("--samples", type=int, default=5, help="consistency samples")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
