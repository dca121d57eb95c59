"""Does a fast edge variant answer as well as fp32? Paired comparison of `tidegate eval` runs.

    tidegate eval --data data/devset/devset.jsonl --split test --edge-only \\
        --edge-config fp32.yaml --cache-dir C32 --out OUT32        (and again per variant)
    python bench/edge_quality.py --reference OUT32 --candidate int4=OUT4 \\
        [--agreement int4.yaml --reference-cache C32]

For each candidate, against the reference, on the same items:
- edge accuracy and its paired difference, with a 95% bootstrap interval
  (items resampled together, 2000 draws) and McNemar's exact test on the items
  one gets right and the other wrong;
- AUROC of each confidence estimator (how well it ranks right above wrong
  answers) and its paired difference, same bootstrap;
- identical answers (text);
- with ``--agreement``: teacher-forced next-token agreement — the candidate,
  loaded as the edge node loads it (its settings YAML: static decoder and
  compiled step included), predicts each next token along the reference's
  greedy answers (read from the reference's generation cache).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from tidegate.evaluation.metrics import auroc

DRAWS = 2000


def read_items(folder: Path) -> dict[str, dict[str, Any]]:
    with open(folder / "items.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["id"]: r for r in rows if r.get("edge_correct") is not None}


def _accuracy(rows: list[dict[str, Any]]) -> float:
    return sum(bool(r["edge_correct"]) for r in rows) / len(rows)


def _auroc(rows: list[dict[str, Any]], estimator: str) -> float | None:
    scores = [r["confidence"][estimator] for r in rows]
    right = [bool(r["edge_correct"]) for r in rows]
    value = auroc(scores, right) if 0 < sum(right) < len(right) else None
    return None if value is None or math.isnan(value) else value


def _interval(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def _mcnemar(only_ref: int, only_cand: int) -> float:
    """Exact two-sided p-value of the discordant split (binomial, p = 1/2)."""
    n, k = only_ref + only_cand, min(only_ref, only_cand)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    ids = sorted(set(reference) & set(candidate))
    ref, cand = [reference[i] for i in ids], [candidate[i] for i in ids]
    estimators = sorted(set(ref[0]["confidence"]) & set(cand[0]["confidence"]))
    rng = random.Random(0)
    draws: dict[str, list[float]] = {"accuracy": [], **{e: [] for e in estimators}}
    for _ in range(DRAWS):
        pick = [rng.randrange(len(ids)) for _ in ids]
        r, c = [ref[i] for i in pick], [cand[i] for i in pick]
        draws["accuracy"].append(_accuracy(c) - _accuracy(r))
        for e in estimators:
            a, b = _auroc(c, e), _auroc(r, e)
            if a is not None and b is not None:
                draws[e].append(a - b)
    only_ref = sum(
        r["edge_correct"] and not c["edge_correct"] for r, c in zip(ref, cand, strict=True)
    )
    only_cand = sum(
        c["edge_correct"] and not r["edge_correct"] for r, c in zip(ref, cand, strict=True)
    )
    return {
        "items": len(ids),
        "accuracy": (_accuracy(ref), _accuracy(cand), *_interval(draws["accuracy"])),
        "mcnemar": (only_ref, only_cand, _mcnemar(only_ref, only_cand)),
        "same_text": sum(r["edge_text"] == c["edge_text"] for r, c in zip(ref, cand, strict=True))
        / len(ids),
        "auroc": {e: (_auroc(ref, e), _auroc(cand, e), *_interval(draws[e])) for e in estimators},
    }


def next_token_agreement(
    config: Path, reference_cache: Path, reference_model: str, data: Path, split: str, limit: int
) -> dict[str, Any]:
    """Teacher-forced: the candidate's greedy choice along the reference's own greedy answers
    (looked up in the reference's generation cache by the same key `tidegate eval` used)."""
    from edge_node.settings import EdgeSettings
    from tidegate.config import load_config
    from tidegate.evaluation.dataset import load_items
    from tidegate.evaluation.gencache import request_key
    from tidegate.evaluation.runner import DEFAULT_MAX_NEW_TOKENS, item_request
    from tidegate.inference import load_backend

    answers: dict[str, list[int]] = {}
    for path in reference_cache.glob("*.jsonl"):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    entry = json.loads(line)
                    answers[entry["key"]] = entry["value"]["token_ids"]
    backend = load_backend(load_config(EdgeSettings, config).model)
    compiled = backend.wait_compiled(1800)
    same = total = items = 0
    for item in load_items(data):
        if item.split != split or items >= limit:
            continue
        request = item_request(item, DEFAULT_MAX_NEW_TOKENS)
        answer = answers.get(request_key(reference_model, "generate", request))
        if not answer:
            continue
        got = _teacher_forced(backend, backend.encode_prompt(request), answer)
        same += sum(int(a == b) for a, b in zip(got, answer, strict=True))
        total, items = total + len(answer), items + 1
    return {
        "agreement": same / max(total, 1),
        "positions": total,
        "items": items,
        "compiled": compiled,
        "model": backend.info.model,
    }


def _teacher_forced(backend: Any, prompt: list[int], answer: list[int]) -> list[int]:
    import torch

    decoder = backend.decoder
    if decoder is None:  # transformers' forward over the whole sequence
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.tensor([prompt + answer])).logits[0]
        return logits[len(prompt) - 1 : -1].float().argmax(-1).tolist()
    decoder.reserve(len(prompt) + len(answer))
    choices = [int(decoder.prefill(prompt)[1][0])]
    for position, token in enumerate(answer[:-1], start=len(prompt)):
        choices.append(int(decoder.step(token, position)[1][0]))
    return choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="eval --out of fp32")
    parser.add_argument("--candidate", action="append", default=[], help="NAME=FOLDER (repeatable)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--agreement", action="append", default=[], help="NAME=EDGE_YAML: teacher-forced agreement"
    )
    parser.add_argument("--reference-cache", type=Path, help="the reference's eval --cache-dir")
    parser.add_argument("--reference-model", default="smollm2-135m@b179c9523d0e/none")
    parser.add_argument("--data", type=Path, default=Path("data/devset/devset.jsonl"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="items for --agreement")
    args = parser.parse_args()
    reference = read_items(args.reference)
    results = {}
    for spec in args.candidate:
        name, _, folder = spec.partition("=")
        results[name] = compare(reference, read_items(Path(folder)))
    agreements = {}
    for spec in args.agreement:
        name, _, config = spec.partition("=")
        agreements[name] = next_token_agreement(
            Path(config),
            args.reference_cache,
            args.reference_model,
            args.data,
            args.split,
            args.limit,
        )
    if args.json:
        print(json.dumps({"paired": results, "next_token_agreement": agreements}, indent=2))
        return
    for name, a in agreements.items():
        print(
            f"{name} ({a['model']}{', compiled step' if a['compiled'] else ''}): next-token "
            f"agreement with the reference {a['agreement']:.3f} over {a['positions']} positions "
            f"of {a['items']} greedy answers"
        )
    for name, r in results.items():
        ref_acc, cand_acc, low, high = r["accuracy"]
        only_ref, only_cand, p = r["mcnemar"]
        print(
            f"{name} vs reference, {r['items']} items: accuracy {ref_acc:.1%} → {cand_acc:.1%} "
            f"(Δ {cand_acc - ref_acc:+.1%}, 95% CI {low:+.1%} … {high:+.1%}; McNemar "
            f"{only_ref} lost / {only_cand} gained, p = {p:.2f}); same answer text "
            f"{r['same_text']:.1%}"
        )
        for estimator, (a_ref, a_cand, lo, hi) in r["auroc"].items():
            if a_ref is None or a_cand is None:
                continue
            print(
                f"  AUROC {estimator:<14} {a_ref:.3f} → {a_cand:.3f} "
                f"(Δ {a_cand - a_ref:+.3f}, 95% CI {lo:+.3f} … {hi:+.3f})"
            )


if __name__ == "__main__":
    main()
