"""The evaluation subcommands of ``tidegate``: eval, fit-combiner, calibrate.

``tidegate.cli`` registers them with ``add_parsers`` and dispatches to ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tidegate.evaluation.fitting import HEADS

COMMANDS = ("eval", "fit-combiner", "calibrate")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ev = sub.add_parser(
        "eval",
        help="evaluate the edge's confidence estimators (and the cloud) on labelled items",
        description="Run the edge model with its estimators, and the cloud model, over "
        "FILE.jsonl; write DIR/items.jsonl, DIR/metrics.json and DIR/curve.png. Model "
        "outputs are cached (keyed by model identity + prompt), so re-runs are cheap.",
    )
    ev.add_argument("--data", required=True, type=Path, help="items, one JSON object a line")
    ev.add_argument("--out", required=True, type=Path, help="output folder")
    ev.add_argument("--split", help="only items with this split (e.g. calib, test)")
    ev.add_argument("--limit", type=int, help="only the first N items (after --split)")
    ev.add_argument(
        "--sample",
        type=int,
        help="N items spread evenly over the file (after --split): a cheaper run that keeps "
        "every category's share",
    )
    tiers = ev.add_mutually_exclusive_group()
    tiers.add_argument("--edge-only", action="store_true", help="skip the cloud model")
    tiers.add_argument(
        "--cloud-only", action="store_true", help="only the cloud model (pre-fills its cache)"
    )
    ev.add_argument("--edge-config", type=Path, help="edge YAML (default: built-in defaults)")
    ev.add_argument("--cloud-config", type=Path, help="cloud YAML (default: built-in defaults)")
    ev.add_argument(
        "--estimators",
        help="comma-separated estimator names (default: single-pass ones, and combiner and "
        "gain where fitted)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=48, help="per answer (default 48)")
    ev.add_argument(
        "--cache-dir", type=Path, help="model-output cache (default ~/.cache/tidegate/eval)"
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    fit = sub.add_parser(
        "fit-combiner",
        help="fit the combiner's weights (and the gain estimator's cloud head, when the items "
        "have cloud answers) on an evaluation's items",
        description="Fit logistic regression over the single-pass features of "
        "ITEMS.jsonl (from `tidegate eval`) and write the weights for that edge model.",
    )
    fit.add_argument("--items", required=True, type=Path, help="items.jsonl from tidegate eval")
    fit.add_argument("--split", default="calib", help="fit on this split only (default calib)")
    fit.add_argument(
        "--out", type=Path, help="weights file (default edge_node/calibration/<model>.json)"
    )
    fit.add_argument(
        "--l2", type=float, help="L2 penalty (default: chosen by 5-fold cross-validation)"
    )
    fit.add_argument(
        "--heads",
        choices=HEADS,
        default="both",
        help="fit both heads (default), or only the combiner (edge) or only gain's cloud "
        "head, keeping the other's file: e.g. the combiner on the fitting set evaluated "
        "--edge-only, the cloud head on calib",
    )

    add_calibrate_parser(sub)


async def _eval(args: argparse.Namespace) -> int:
    from cloud_node.settings import CloudSettings
    from edge_node.settings import EdgeSettings
    from tidegate.config import load_config
    from tidegate.evaluation.report import summary_table
    from tidegate.evaluation.runner import EvalOptions, evaluate

    # Out-of-range options, unknown estimators, bad items and an --out that cannot be a
    # folder are ConfigErrors (exit 2) raised by evaluate before any model loads.
    options = EvalOptions(
        data=args.data,
        out=args.out,
        split=args.split,
        limit=args.limit,
        sample=args.sample,
        edge_only=args.edge_only,
        cloud_only=args.cloud_only,
        estimators=tuple(n.strip() for n in args.estimators.split(",") if n.strip())
        if args.estimators
        else None,
        max_new_tokens=args.max_new_tokens,
        cache_dir=args.cache_dir,
        edge=load_config(EdgeSettings, args.edge_config, env_prefix="TIDEGATE_EDGE"),
        cloud=load_config(CloudSettings, args.cloud_config, env_prefix="TIDEGATE_CLOUD"),
        progress=not args.no_progress,
    )
    metrics = await evaluate(options)
    print(summary_table(metrics))
    print(
        f"wrote {args.out}/items.jsonl, metrics.json"
        + (", curve.png" if metrics["routing"] else "")
    )
    return 0


def _fit(args: argparse.Namespace) -> int:
    from tidegate.evaluation.fitting import EvaluatedRun, fit_from_items
    from tidegate.evaluation.runner import read_items

    records = read_items(args.items)  # first: a missing items file is said as such
    run = EvaluatedRun.of(args.items)
    fitted = fit_from_items(
        records, run.edge_model, args.split, run.data, args.l2, args.out,
        run.cloud_model, args.heads,
    )  # fmt: skip
    print(fitted.summary)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return asyncio.run(_eval(args))
    if args.command == "fit-combiner":
        return _fit(args)
    if args.command == "calibrate":
        from tidegate.evaluation.calibrate_command import run_calibrate

        return run_calibrate(args)
    raise AssertionError(args.command)


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cal = sub.add_parser(
        "calibrate",
        help="pick the routing threshold from an evaluation and write it into a policy",
        description="Pick policy.min_confidence (and each rule's own min_confidence) for a "
        "target escalation rate or accuracy, from items.jsonl of `tidegate eval` (or a data "
        "file, which is evaluated first), and write it into the router YAML, keeping the "
        "rest of the file as it was.",
    )
    cal.add_argument(
        "--data", required=True, type=Path, help="items.jsonl from tidegate eval, or a data file"
    )
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-escalation", type=float, help="escalate at most this fraction")
    goal.add_argument(
        "--target-accuracy", help="reach this accuracy: 0.6, or relative to the cloud: 0.95xcloud"
    )
    cal.add_argument("--policy", required=True, type=Path, help="router/policy YAML to update")
    cal.add_argument("--estimator", help="default: the policy's policy.estimator, else gain")
    cal.add_argument("--split", default="calib", help="calibrate on this split (default calib)")
    cal.add_argument("--dry-run", action="store_true", help="report, don't write the policy")
    cal.add_argument(
        "--fit-combiner",
        action="store_true",
        help="first fit the combiner's weights on --split (written where the edge node loads "
        "them) and calibrate its threshold",
    )
    cal.add_argument(
        "--combiner-file",
        type=Path,
        help="where --fit-combiner writes the weights (default: the edge config's "
        "estimator_options.combiner_file, else edge_node/calibration/<model>.json)",
    )
    cal.add_argument(
        "--pin-estimator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write policy.estimator, so the router escalates scores from any other "
        "estimator (default: on)",
    )
    cal.add_argument("--out", type=Path, help="with a data file: where its evaluation goes")
    cal.add_argument("--edge-config", type=Path, help="with a data file: edge YAML")
    cal.add_argument("--cloud-config", type=Path, help="with a data file: cloud YAML")
