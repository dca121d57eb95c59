"""What each of the combiner's hidden-state probes buys, side by side.

    python bench/probe_ablation.py --fit /tmp/tidegate-fit/items.jsonl \
        --dev /tmp/tidegate-devset/items.jsonl

Both files come from ``tidegate eval`` (README, Confidence: "Re-running it"). The
combiner is fitted on ``--fit``'s items (penalty cross-validated, as ``tidegate
fit-combiner`` does) four times — token signals only, + the prompt's state, + the
answer's state instead, + both — and each fit's AUROC is printed per split of
``--dev`` (``calib``, ``test``), which none of the fits has seen. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    ("prompt_state",),
    ("answer_state",),
    ("prompt_state", "answer_state"),
)


def ablation(fit: Sequence[dict[str, Any]], dev: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: its probes, the chosen penalty, and AUROC per dev split."""
    from edge_node.combiner import fit_combiner
    from tidegate.evaluation.heldout import usable
    from tidegate.evaluation.metrics import auroc

    fit = usable(fit)
    labels = [bool(r["edge_correct"]) for r in fit]
    splits = sorted({r["split"] for r in dev if r.get("edge_correct") is not None})
    rows = []
    for probes in VARIANTS:
        weights = fit_combiner(
            [r["features"] for r in fit],
            labels,
            "ablation",
            {},
            l2=None,
            states={name: [r[name] for r in fit] for name in probes},
        )
        row: dict[str, Any] = {"probes": probes, "l2": weights.provenance["l2"]}
        for split in splits:
            items = [r for r in dev if r["split"] == split and r.get("edge_correct") is not None]
            scores = [weights.probability(r["features"], r) for r in items]
            row[split] = auroc(scores, [bool(r["edge_correct"]) for r in items])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", required=True, type=Path, help="items.jsonl the fits learn from")
    parser.add_argument("--dev", required=True, type=Path, help="items.jsonl they are read on")
    args = parser.parse_args(argv)
    from tidegate.evaluation.runner import read_items

    rows = ablation(read_items(args.fit), read_items(args.dev))
    splits = [k for k in rows[0] if k not in ("probes", "l2")]
    print(f"{'combiner inputs':38} {'l2':>6} " + " ".join(f"{s:>7}" for s in splits))
    for row in rows:
        name = "tokens" + "".join(f" + {p}" for p in row["probes"])
        cells = " ".join(f"{row[s]:7.3f}" if row[s] is not None else "      -" for s in splits)
        print(f"{name:38} {row['l2']:6g} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
