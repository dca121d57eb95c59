"""``tidegate eval``: run the edge (with its estimators) and the cloud over labelled items.

Models run in this process through ``tidegate.inference`` / the cloud node's
backend, not through gRPC: the evaluation measures the models and estimators,
not the network, and needs per-token signals that a node only returns on
request. Every model output goes through ``gencache.CachedBackend``, so an
interrupted run resumes where it stopped and a run with another edge variant
reuses every cloud answer.

Outputs (see ``write_outputs``): ``items.jsonl``, ``metrics.json``, ``curve.png``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_node.settings import CloudSettings
from edge_node.settings import EdgeSettings
from tidegate.backend import ConfidenceEstimator, ModelBackend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.evaluation.dataset import EvalItem, load_items, read_lines
from tidegate.evaluation.gencache import CachedBackend
from tidegate.evaluation.scoring import is_correct

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 48  # the dev set's answers are a few words; keeps CPU runs short


@dataclass
class EvalOptions:
    data: Path
    out: Path
    split: str | None = None
    limit: int | None = None
    sample: int | None = None  # evenly spread subset (expensive estimators)
    edge_only: bool = False
    cloud_only: bool = False  # pre-fill the cloud cache (e.g. in the background)
    estimators: tuple[str, ...] | None = None  # None: the single-pass ones + combiner if fitted
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    cache_dir: Path | None = None  # None: $TIDEGATE_EVAL_CACHE_DIR or ~/.cache/tidegate/eval
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    cloud: CloudSettings = field(default_factory=CloudSettings)
    progress: bool = True


def default_cache_dir(cache_dir: Path | None = None) -> Path:
    """--cache-dir, else $TIDEGATE_EVAL_CACHE_DIR, else ~/.cache/tidegate/eval."""
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("TIDEGATE_EVAL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tidegate" / "eval"


def item_request(item: EvalItem, max_new_tokens: int) -> GenerationRequest:
    """What a client would send: the question as one user message, greedy."""
    return GenerationRequest(
        messages=(ChatMessage("user", item.question),),
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        request_id=item.id,
    )


def build_estimators(
    names: Sequence[str] | None, backend: ModelBackend, settings: EdgeSettings
) -> list[ConfidenceEstimator]:
    """The estimators to score with. Default: every single-pass one, and the fitted
    ones (combiner, gain) whose weights exist for this exact edge model."""
    from edge_node.estimators import ESTIMATORS
    from edge_node.estimators_registry import FITTED, build_any_estimator

    options = settings.estimator_options
    if names is not None:
        return [build_any_estimator(name, backend, options) for name in names]
    chosen: list[ConfidenceEstimator] = [
        build_any_estimator(n, backend, options) for n in ESTIMATORS
    ]
    for name in FITTED:
        try:
            chosen.append(build_any_estimator(name, backend, options))
        except FileNotFoundError as exc:
            log.warning("no %s in this run: %s", name, exc)
    return chosen


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    # Explicit disable=…: the CLI sets TQDM_DISABLE for transformers' bars, not ours.
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, file=sys.stderr)


async def _score_item(
    item: EvalItem,
    options: EvalOptions,
    edge: CachedBackend | None,
    cloud: CachedBackend | None,
    estimators: Sequence[ConfidenceEstimator],
) -> dict[str, Any]:
    from edge_node.combiner import features

    request = item_request(item, options.max_new_tokens)
    record: dict[str, Any] = {
        "id": item.id,
        "category": item.category,
        "split": item.split,
        "tags": list(item.all_tags),
        "tenant": item.tenant,
        "question": item.question,  # what tidegate calibrate runs the router's PII rules on
        "edge_text": None,
        "edge_correct": None,
        "confidence": {},
        "cloud_text": None,
        "cloud_correct": None,
        "latency_ms": {},
    }
    if edge is not None:
        generation = await edge.generate(request)
        record.update(
            edge_text=generation.text,
            edge_correct=is_correct(item, generation.text),
            edge_finish=generation.finish_reason.name.lower(),
            edge_tokens=generation.completion_tokens,
            features=features(generation, item.question),
            # the combiner's probes' inputs
            prompt_state=generation.prompt_state,
            answer_state=generation.answer_state,
        )
        record["latency_ms"]["edge"] = round(generation.generation_ms, 1)
        spent: dict[str, float] = {}
        for estimator in estimators:
            started = time.perf_counter()
            score = await estimator.score(request, generation)
            spent[estimator.name] = round((time.perf_counter() - started) * 1000.0, 2)
            record["confidence"][estimator.name] = score
        record["latency_ms"]["estimators"] = spent  # near 0 when their outputs were cached
    if cloud is not None:
        answer = await cloud.generate(request)
        record.update(cloud_text=answer.text, cloud_correct=is_correct(item, answer.text))
        record["latency_ms"]["cloud"] = round(answer.generation_ms, 1)
    return record


def _load_edge(settings: EdgeSettings) -> ModelBackend:
    from tidegate.inference import load_backend

    return load_backend(settings.model)


def _load_cloud(settings: CloudSettings) -> ModelBackend:
    from cloud_node.service import build_backend

    return build_backend(settings)


async def run_items(
    options: EvalOptions,
    items: Sequence[EvalItem],
    edge_backend: ModelBackend | None = None,
    cloud_backend: ModelBackend | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every item; returns the per-item records and the run's identity.

    Backends are loaded from the options' settings unless given (tests pass tiny ones).
    """
    cache_dir = default_cache_dir(options.cache_dir)
    edge: CachedBackend | None = None
    cloud: CachedBackend | None = None
    estimators: list[ConfidenceEstimator] = []
    loaded_edge: ModelBackend | None = None  # loaded here, so closed here
    loaded_cloud: ModelBackend | None = None
    try:
        if not options.cloud_only:
            if edge_backend is None:
                edge_backend = loaded_edge = await asyncio.to_thread(_load_edge, options.edge)
            edge = CachedBackend(edge_backend, cache_dir)
            estimators = build_estimators(options.estimators, edge, options.edge)
        if not options.edge_only:
            if cloud_backend is None:
                cloud_backend = loaded_cloud = await asyncio.to_thread(_load_cloud, options.cloud)
            cloud = CachedBackend(cloud_backend, cache_dir)
        records = []
        bar = _progress(len(items), options.progress, "eval")
        with bar:
            for item in items:
                records.append(await _score_item(item, options, edge, cloud, estimators))
                bar.update(1)
    finally:
        for loaded in (loaded_edge, loaded_cloud):
            if loaded is not None:
                await loaded.close()
    identity = {
        "edge_model": edge.info.model if edge else None,
        "cloud_model": cloud.info.model if cloud else None,
        "estimators": {e.name: e.extra_cost for e in estimators},
        # the multi-pass estimators' knobs (consistency's k and temperature)
        "estimator_options": options.edge.estimator_options.model_dump(),
        "data": str(options.data),
        "data_sha256": _sha256(options.data),
        "split": options.split,
        "sample": options.sample,
        "items": len(records),
        "max_new_tokens": options.max_new_tokens,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cache": {
            "dir": str(cache_dir),
            "edge_hits": edge.cache.hits if edge else 0,
            "cloud_hits": cloud.cache.hits if cloud else 0,
        },
    }
    return records, identity


def rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float rounded (metrics.json stays small and diffable)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_items(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """An ``items.jsonl`` of ``tidegate eval``; ConfigError naming the line where a
    record is not a JSON object or a confidence is not a number in [0, 1] (a hand-made
    or edited file: a NaN would silently skew AUROC and thresholds)."""
    from tidegate.errors import ConfigError

    lines = read_lines(Path(path), "items file")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object")
        for name, score in (record.get("confidence") or {}).items():
            if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
                raise ConfigError(
                    f"{path}:{number}: confidence {name!r} is {score!r}, not a number in [0, 1]"
                )
        records.append(record)
    return records


def check_options(options: EvalOptions) -> None:
    """ConfigError naming the option that is out of range or unknown."""
    from edge_node.estimators_registry import ESTIMATOR_NAMES
    from tidegate.errors import ConfigError

    for flag, value in (
        ("--limit", options.limit),
        ("--sample", options.sample),
        ("--max-new-tokens", options.max_new_tokens),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}")
    unknown = [name for name in options.estimators or () if name not in ESTIMATOR_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown confidence estimator {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(ESTIMATOR_NAMES)}"
        )


def _make_out(out: Path) -> None:
    """Create the output folder now, not after every item ran: ConfigError if it cannot be."""
    from tidegate.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from exc


async def evaluate(
    options: EvalOptions,
    edge_backend: ModelBackend | None = None,
    cloud_backend: ModelBackend | None = None,
) -> dict[str, Any]:
    """The whole ``tidegate eval``: run, then write items.jsonl, metrics.json, curve.png.

    Everything that can be checked before the models load is checked first (ConfigError):
    the options, the items, and that ``out`` can be the output folder."""
    check_options(options)
    items = load_items(options.data, options.split, options.limit, options.sample)
    _make_out(options.out)
    records, identity = await run_items(options, items, edge_backend, cloud_backend)
    return write_outputs(options.out, records, identity)


def write_outputs(
    out: Path, records: Sequence[dict[str, Any]], identity: Mapping[str, Any]
) -> dict[str, Any]:
    """items.jsonl, metrics.json and curve.png in ``out``; returns the metrics."""
    from tidegate.evaluation.plot import plot_curves
    from tidegate.evaluation.report import build_metrics

    out.mkdir(parents=True, exist_ok=True)
    write_items(out / "items.jsonl", records)
    metrics = build_metrics(records, identity)
    (out / "metrics.json").write_text(json.dumps(rounded(metrics), indent=1) + "\n")
    if metrics.get("routing"):
        plot_curves(metrics, out / "curve.png")
    return metrics
