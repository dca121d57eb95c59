"""The ``tidegate calibrate`` command: load the evaluation, calibrate each threshold, write."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_node.estimators_registry import FITTED
from tidegate.errors import ConfigError
from tidegate.evaluation.calibrate import (
    Calibration,
    Replay,
    Target,
    calibrate,
    replay,
    route_groups,
)
from tidegate.evaluation.policy_yaml import ValueUpdate, apply_updates

if TYPE_CHECKING:
    from tidegate.evaluation.fitting import EvaluatedRun


def _is_items_file(path: Path) -> bool:
    """Whether ``path`` is an items.jsonl of ``tidegate eval`` (its first record has
    ``edge_correct``) rather than a data file; ConfigError when it is neither: not
    readable, not UTF-8, or its first line not a JSON object."""
    from tidegate.evaluation.dataset import not_utf8, unreadable

    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise not_utf8(path, raw, exc, number) from exc
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}:{number}: expected a JSON object")
                return "edge_correct" in record
    except OSError as exc:
        raise unreadable(path, exc, "--data") from exc
    return False


def _evaluation(args: argparse.Namespace, estimator: str) -> tuple[list[dict[str, Any]], str, str]:
    """The items, the edge model identity and the data they come from: read, or
    evaluated now from a data file.

    With ``--fit-combiner`` the combiner is fitted first on the calibration split
    (the weights file the edge node loads) and the items are scored with it.
    """
    from tidegate.evaluation.fitting import EvaluatedRun, fit_from_items
    from tidegate.evaluation.runner import read_items, write_outputs

    evaluated: _Evaluated | None = None
    if _is_items_file(args.data):
        records, run = read_items(args.data), EvaluatedRun.of(args.data)
        combiner_file = args.combiner_file
    else:
        evaluated = _evaluate_now(args, estimator)
        records, run, combiner_file = evaluated.records, evaluated.run, evaluated.combiner_file
    if args.fit_combiner:
        fitted = fit_from_items(
            records, run.edge_model, args.split, run.data, out=combiner_file,
            cloud_model=run.cloud_model,
        )  # fmt: skip
        print(fitted.summary)
        # Scored from the recorded features with the weights just fitted (not by
        # running the eval again: its edge would load the weights its config names).
        fitted.rescore(records)
        if evaluated is not None:
            write_outputs(evaluated.out, records, evaluated.identity)
    if evaluated is not None:
        print(f"evaluation of {args.data} in {evaluated.out}", file=sys.stderr)
    return records, run.edge_model, run.data


@dataclass(frozen=True)
class _Evaluated:
    records: list[dict[str, Any]]
    run: EvaluatedRun
    identity: dict[str, Any]  # metrics.json's "run"
    out: Path
    combiner_file: Path | None  # where --fit-combiner writes


def _evaluate_now(args: argparse.Namespace, estimator: str) -> _Evaluated:
    """``--data`` is a data file: evaluate it now."""
    from cloud_node.settings import CloudSettings
    from edge_node.settings import EdgeSettings
    from tidegate.config import load_config
    from tidegate.evaluation.fitting import EvaluatedRun
    from tidegate.evaluation.runner import EvalOptions, evaluate, read_items

    out = args.out or Path(tempfile.mkdtemp(prefix="tidegate-calibrate-"))
    options = EvalOptions(
        data=args.data,
        out=out,
        estimators=None if estimator in FITTED else (estimator,),
        edge=load_config(EdgeSettings, args.edge_config, env_prefix="TIDEGATE_EDGE"),
        cloud=load_config(CloudSettings, args.cloud_config, env_prefix="TIDEGATE_CLOUD"),
    )
    identity = asyncio.run(evaluate(options))["run"]
    items = out / "items.jsonl"
    configured = options.edge.estimator_options.combiner_file
    return _Evaluated(
        records=read_items(items),
        run=EvaluatedRun.from_run(identity, items),
        identity=identity,
        out=out,
        combiner_file=args.combiner_file or (Path(configured) if configured else None),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _provenance(
    estimator: str,
    model: str,
    source: str,
    split: str,
    target: Target,
    result: Calibration,
    held: Replay | None,
) -> list[str]:
    lines = [
        f"{time.strftime('%Y-%m-%d', time.gmtime())} by `tidegate calibrate`, estimator "
        f"{estimator} on edge model {model}",
        f"data {source} split {split} ({result.items} items), target {target.describe()}"
        + ("" if result.reached else " (NOT reached: closest point)"),
        f"expected: {_pct(result.escalated)} escalated, routed accuracy {_pct(result.accuracy)} "
        f"(edge only {_pct(result.edge_accuracy)}, cloud only {_pct(result.cloud_accuracy)})",
    ]
    if held is not None and held.items:
        lines.append(
            f"held out ({held.items} items): {_pct(held.escalated)} escalated, accuracy "
            f"{_pct(held.accuracy)}, {_of_cloud(held)}"
        )
    return lines


def _of_cloud(held: Replay) -> str:
    """ "92.0% of cloud-only (95% CI 84–100%)": the held-out accuracy against cloud-only."""
    text = f"{_pct(held.of_cloud)} of cloud-only"
    if held.of_cloud_ci95:
        low, high = held.of_cloud_ci95
        text += f" (95% CI {100 * low:.0f}–{100 * high:.0f}%)"
    return text


def _validate(text: str, policy: Path) -> None:
    """The new file must still load as router settings; ConfigError naming the field if not."""
    from router.settings import load_router_settings

    fd, tmp = tempfile.mkstemp(suffix=".yaml", dir=policy.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        load_router_settings(tmp)
    except ConfigError as exc:  # named as the file it would become, not the temporary one
        raise ConfigError(str(exc).replace(tmp, f"{policy} (as edited)")) from exc
    finally:
        os.unlink(tmp)


def _exact(threshold: float) -> str:
    """4 decimals, unless the threshold needs more (scores closer than that): the
    number printed is the number written."""
    short = f"{threshold:.4f}"
    return short if float(short) == threshold else repr(threshold)


def _report(name: str, result: Calibration, held: Replay | None) -> str:
    line = (
        f"{name:24} threshold {_exact(result.threshold)}  {result.items:4} items  "
        f"escalated {_pct(result.escalated):>6}  accuracy {_pct(result.accuracy):>6}  "
        f"(edge {_pct(result.edge_accuracy)}, cloud {_pct(result.cloud_accuracy)})"
    )
    if not result.reached:
        line += "  target NOT reached"
    if held is not None and held.items:
        line += f"\n{'':24} held out: {held.items:4} items  escalated {_pct(held.escalated):>6}  "
        line += f"accuracy {_pct(held.accuracy):>6} (cloud {_pct(held.cloud_accuracy)}: "
        line += f"{_of_cloud(held)})"
    return line


def run_calibrate(args: argparse.Namespace) -> int:
    from router.settings import load_router_settings

    try:
        target = Target.parse(args.target_escalation, args.target_accuracy)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = load_router_settings(args.policy)
    estimator = args.estimator or settings.policy.estimator or "gain"
    if args.fit_combiner and estimator not in FITTED:
        print(
            f"error: --fit-combiner fits {' and '.join(FITTED)}, not {estimator}; "
            "drop --estimator or choose one of those",
            file=sys.stderr,
        )
        return 2
    records, model, source = _evaluation(args, estimator)
    calib = [r for r in records if r.get("split") == args.split]
    if not calib:
        print(f"error: no items with split {args.split!r} in {args.data}", file=sys.stderr)
        return 2
    held_out = [r for r in records if r.get("split") not in (args.split, None, "")]
    rules: Sequence[Any] = getattr(settings, "rules", [])
    groups = route_groups(calib, rules)
    held_groups: Mapping[int | None, list[Mapping[str, Any]]] = route_groups(held_out, rules)
    updates: list[ValueUpdate] = []
    print(f"estimator {estimator} · edge model {model} · target {target.describe()}")
    for key, members in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        name = "policy.min_confidence" if key is None else f"rules[{rules[key].name}]"
        if not members:
            print(f"{name:24} no calibration items reach it; left as it is")
            continue
        try:
            result = calibrate(members, estimator, target)
        except ValueError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        held = None
        if held_groups.get(key):
            held = replay(held_groups[key], estimator, result.threshold)
        print(_report(name, result, held))
        comment = _provenance(estimator, model, source, args.split, target, result, held)
        path: tuple[str | int, ...] = ("policy",) if key is None else ("rules", key)
        updates.append(ValueUpdate(path, "min_confidence", repr(result.threshold), comment))
    if args.pin_estimator:
        updates.append(ValueUpdate(("policy",), "estimator", estimator))
    try:
        # Bytes, not text mode: the file's line endings (CRLF too) are kept as they are.
        text = args.policy.read_bytes().decode("utf-8")
        new = apply_updates(text, updates)
        _validate(new, args.policy)
    except (OSError, UnicodeDecodeError, ValueError, ConfigError) as exc:
        print(f"error: {args.policy}: {exc}; the file is not changed", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"(dry run: {args.policy} not changed)")
        return 0
    try:
        args.policy.write_bytes(new.encode("utf-8"))
    except OSError as exc:
        print(f"error: cannot write {args.policy}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.policy}")
    return 0
