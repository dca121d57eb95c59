"""Which fitting items does the combiner learn from? Its fit on parts of the fitting set,
and on more items, side by side.

    python bench/fit_data.py --fit /tmp/tidegate-fit/items.jsonl \\
        --dev /tmp/tidegate-devset/items.jsonl [--extra /tmp/more/items.jsonl ...]

All files come from ``tidegate eval`` (README, Confidence: "Re-running it"); ``--extra``
files are evaluations of other items (``--edge-only`` is enough), e.g. more generated
questions or other kinds of question, to see whether more of them would pay before
they go into ``data/devset/fitset.jsonl``. The rows:

- the whole fitting set (the shipped recipe);
- a random part of it (``--fractions``): the learning curve;
- the fitting set with half of one group of categories left out (facts from the source
  packages: countries and elements; generated questions and MMLU): which group pays;
  these rows are the mean over ``--repeats`` random draws;
- the fitting set plus each ``--extra`` file, then plus each of its categories alone.

Each row is read as ``bench/probe_layers.py`` reads its inputs
(``tidegate.evaluation.heldout``): the combiner's AUROC on ``--dev``'s ``calib`` and
``test``, and gain's routing on ``test`` at the threshold ``tidegate calibrate`` picks on
``calib`` for at most 25% escalated, with the shipped penalties (``--l2``,
``--cloud-l2``), so the rows differ only in their fitting items. Nothing is written.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tidegate.evaluation.heldout import cell, evaluate

# Categories whose facts come from the source packages, and the rest (built by
# data/devset/build.py): the first can't grow (every country and element the dev set
# doesn't ask about is in the fitting set already), the second can, without end.
GROUPS: dict[str, Callable[[str], bool]] = {
    "countries and elements": lambda category: category.startswith(("country_", "element_")),
    "generated and MMLU": lambda category: not category.startswith(("country_", "element_")),
}


def usable(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a head can learn from or be read on: graded, with token features."""
    return [r for r in records if r.get("edge_correct") is not None and r.get("features")]


def variants(
    fit: Sequence[dict[str, Any]],
    extras: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    fractions: Sequence[float],
    repeats: int = 5,
    seed: int = 0,
) -> list[tuple[str, list[list[dict[str, Any]]]]]:
    """(name, draws of fitting items) per row, in the order the docstring lists them.
    A row that leaves items out at random has ``repeats`` draws (one draw's reading is
    as noisy as which items it happened to drop); the others have one."""
    rnd = random.Random(seed)

    def draws(make: Callable[[], list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return [make() for _ in range(repeats)]

    rows = [(f"fitting set (shipped), {len(fit)}", [list(fit)])]
    for fraction in fractions:
        size = round(len(fit) * fraction)
        rows.append(
            (f"random {fraction:.0%} of it, {size}", draws(lambda size=size: rnd.sample(fit, size)))
        )
    for group, member in GROUPS.items():
        inside = [r for r in fit if member(r["category"])]
        outside = [r for r in fit if not member(r["category"])]
        name = f"half of {group} left out, {len(outside) + len(inside) // 2}"
        rows.append((name, draws(lambda o=outside, i=inside: o + rnd.sample(i, len(i) // 2))))
    for name, extra in extras:
        rows.append((f"+ {name}, {len(extra)}", [[*fit, *extra]]))
        for category in sorted({r["category"] for r in extra}):
            more = [r for r in extra if r["category"] == category]
            rows.append((f"+ {name}: {category}, {len(more)}", [[*fit, *more]]))
    return rows


def compare(
    fit: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    extras: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    l2: float = 100.0,
    cloud_l2: float = 1000.0,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per fitting-item variant: its name and ``evaluate()``'s reading of it,
    averaged over the variant's draws. The probes read the hidden states every record
    has (``edge_node.combiner.STATES``)."""
    from edge_node.combiner import STATES

    everything = [*fit, *dev, *(r for _, extra in extras for r in extra)]
    probed = [name for name in STATES if all(r.get(name) for r in everything)]

    def inputs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{name: r[name] for name in probed} for r in records]

    rows = []
    for name, draws in variants(fit, extras, fractions, repeats, seed):
        readings = [
            evaluate(items, inputs(items), dev, inputs(dev), l2, cloud_l2) for items in draws
        ]
        row: dict[str, Any] = {"fitted on": name, "draws": len(draws)}
        for key in readings[0]:
            values = [reading[key] for reading in readings]
            row[key] = None if None in values else sum(values) / len(values)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", required=True, type=Path, help="items.jsonl the heads learn from")
    parser.add_argument("--dev", required=True, type=Path, help="items.jsonl they are read on")
    parser.add_argument(
        "--extra", type=Path, action="append", default=[], help="items.jsonl of more items"
    )
    parser.add_argument(
        "--fractions", default="0.25,0.5,0.75", help="parts of --fit, comma-separated"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="draws averaged per row that leaves items out"
    )
    parser.add_argument("--seed", type=int, default=0, help="for the random parts")
    parser.add_argument("--l2", type=float, default=100.0, help="the edge head's penalty")
    parser.add_argument("--cloud-l2", type=float, default=1000.0, help="the cloud head's penalty")
    args = parser.parse_args(argv)
    from tidegate.evaluation.runner import read_items

    fractions = [float(v) for v in args.fractions.split(",") if v.strip()]
    extras = [(str(path), usable(read_items(path))) for path in args.extra]
    rows = compare(
        usable(read_items(args.fit)),
        usable(read_items(args.dev)),
        extras,
        fractions,
        args.l2,
        args.cloud_l2,
        args.repeats,
        args.seed,
    )
    width = max(len(row["fitted on"]) for row in rows)
    header = f"{'fitted on, items':{width}} {'calib':>6} {'test':>6}"
    print(f"{header}  {'test: escalated':>15} {'of cloud':>8}")
    for row in rows:
        print(
            f"{row['fitted on']:{width}} {cell(row['calib'], '6.3f')} {cell(row['test'], '6.3f')}"
            f"  {cell(row['escalated'], '15.1%')} {cell(row['of_cloud'], '8.1%')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
