"""How the consistency estimator's answers should be compared, side by side.

    python bench/consistency_agreement.py --items /tmp/tidegate-devset/items.jsonl

Reads an evaluation whose estimators included ``consistency`` (its sampled answers
are in ``tidegate eval``'s output cache, so nothing is generated) and scores every
item again with each way of telling whether two replies give the same answer,
and with 1…k samples. Prints AUROC per split (``calib``, ``test``) and within
category (weighted by items), and the agreement stacked on the combiner (a
logistic regression over the combiner's logit and the agreement, fitted on
``calib``): what sampling adds to the single-pass signals. Choose on ``calib``;
``test`` is for the report.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Same = Callable[[str, str, str], bool]


def _variants() -> dict[str, Same]:
    from edge_node.estimators_sampling import answer_key, options_in, same_answer, same_words
    from tidegate.evaluation.scoring import answer_number, choose_option

    def exact_key(a: str, b: str, question: str) -> bool:
        return answer_key(a, question) == answer_key(b, question)

    def numbers_in_either(a: str, b: str, question: str) -> bool:
        # an earlier same_answer: a number in one reply only already disagrees, and
        # hedges, negations and restated numbers are not told apart
        options = options_in(question)
        picked = (choose_option(a, options), choose_option(b, options)) if options else None
        if picked and picked != (None, None):
            return picked[0] == picked[1]
        numbers = answer_number(a, question), answer_number(b, question)
        if numbers != (None, None):
            return numbers[0] == numbers[1]
        return same_words(a, b, question)

    return {
        "exact answer words (before)": exact_key,
        "by kind, numbers in either": numbers_in_either,
        "by kind (same_answer, shipped)": same_answer,
    }


class _CacheOnly:
    """A backend that only answers from the evaluation's cache (a miss is an error)."""

    def __init__(self, model: str) -> None:
        from tidegate.backend import BackendInfo

        self.info = BackendInfo(model, 0, "-", "cache")

    async def generate(self, request: Any) -> Any:
        raise LookupError(f"{request.request_id} is not in the eval cache: run `tidegate eval`")


async def _answers(
    records: Sequence[Mapping[str, Any]], run: Mapping[str, Any], samples: int, temperature: float
) -> list[tuple[str, str, list[str]]]:
    """(question, greedy reply, sampled replies) per record, from the cache the
    evaluation used; no samples for an empty greedy reply (the estimator scores it 0
    without sampling)."""
    from edge_node.estimators_sampling import ConsistencyEstimator
    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.evaluation.gencache import CachedBackend
    from tidegate.evaluation.runner import default_cache_dir

    where = (run.get("cache") or {}).get("dir")
    cache_dir = Path(where) if where else default_cache_dir()
    cached = CachedBackend(_CacheOnly(run["edge_model"]), cache_dir)  # type: ignore[arg-type]
    estimator = ConsistencyEstimator(cached, samples=samples, temperature=temperature)
    rows: list[tuple[str, str, list[str]]] = []
    for r in records:
        if r.get("edge_tokens") == 0:
            rows.append((r["question"], r["edge_text"], []))
            continue
        request = GenerationRequest(
            messages=(ChatMessage("user", r["question"]),),
            sampling=SamplingParams(max_new_tokens=run["max_new_tokens"]),
            request_id=r["id"],
        )
        sampled = await estimator.sample(request)
        rows.append((r["question"], r["edge_text"], [s.text for s in sampled]))
    return rows


def agreement(
    same: Same, question: str, greedy: str, sampled: Sequence[str], pairwise: bool
) -> float:
    """The fraction of samples giving the greedy answer, or of all pairs agreeing
    (0 without samples, as the estimator)."""
    if not sampled:
        return 0.0
    if pairwise:
        pairs = list(itertools.combinations([greedy, *sampled], 2))
        return sum(same(a, b, question) for a, b in pairs) / len(pairs)
    return sum(same(greedy, s, question) for s in sampled) / len(sampled)


def _cell(value: float | None, width: int) -> str:
    """An AUROC, or "-" where it is undefined (one class, or one category)."""
    return f"{value:{width}.3f}" if value is not None else "-".rjust(width)


def _stacked(records: Sequence[Mapping[str, Any]], agreement: Sequence[float]) -> list[float]:
    """The combiner's logit and the agreement, weighed by a logistic regression fitted on
    the ``calib`` items (the combiner itself was fitted on neither split)."""
    import numpy as np

    from edge_node.combiner import fit_logistic

    p = np.clip([r["confidence"]["combiner"] for r in records], 1e-6, 1 - 1e-6)
    x = np.column_stack([np.log(p / (1 - p)), agreement])  # [n, 2]
    calib = np.array([r["split"] == "calib" for r in records])
    right = np.array([bool(r["edge_correct"]) for r in records])
    coef, intercept = fit_logistic(x[calib], right[calib], l2=1e-3)
    return (x @ np.asarray(coef) + intercept).tolist()


def main(argv: list[str] | None = None) -> int:
    from tidegate.evaluation.metrics import auroc
    from tidegate.evaluation.report import within_category_auroc
    from tidegate.evaluation.runner import read_items

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", required=True, type=Path, help="a tidegate eval items.jsonl")
    parser.add_argument("--samples", type=int, help="k (default: the evaluation's)")
    parser.add_argument("--temperature", type=float, help="(default: the evaluation's)")
    args = parser.parse_args(argv)
    run = json.loads((args.items.parent / "metrics.json").read_text())["run"]
    # The evaluation's own k and temperature (runs before it recorded them: the defaults).
    used = run.get("estimator_options") or {}
    samples = args.samples or int(used.get("consistency_samples", 5))
    temperature = args.temperature or float(used.get("consistency_temperature", 0.7))
    records = [r for r in read_items(args.items) if r.get("edge_correct") is not None]
    answers = asyncio.run(_answers(records, run, samples, temperature))
    splits = sorted({r["split"] for r in records})
    right = [bool(r["edge_correct"]) for r in records]
    alone = {
        split: auroc(
            [r["confidence"]["combiner"] for r in records if r["split"] == split],
            [bool(r["edge_correct"]) for r in records if r["split"] == split],
        )
        for split in splits
    }
    print(
        f"{len(records)} items; AUROC of the agreement per split, within category, and "
        "stacked on the combiner (+comb); the combiner alone: "
        + ", ".join(f"{s} {_cell(a, 5)}" for s, a in alone.items())
    )
    header = f"{'agreement':36} {'k':>2} {'pairs':>5} " + " ".join(
        f"{s:>7} {s[:4] + ' in':>7} {s[:4] + '+comb':>9}" for s in splits
    )
    print(header)
    for (label, same), pairwise, k in itertools.product(
        _variants().items(), (False, True), range(1, samples + 1)
    ):
        scores = [agreement(same, q, g, s[:k], pairwise) for q, g, s in answers]
        stacked = _stacked(records, scores)
        cells = []
        for split in splits:
            at = [i for i, r in enumerate(records) if r["split"] == split]
            s, ok = [scores[i] for i in at], [right[i] for i in at]
            within = within_category_auroc([records[i] for i in at], s, ok)
            both = auroc([stacked[i] for i in at], ok)
            cells.append(f"{_cell(auroc(s, ok), 7)} {_cell(within, 7)} {_cell(both, 9)}")
        print(f"{label:36} {k:2d} {'yes' if pairwise else 'no':>5} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
