"""Every confidence estimator an edge node can be configured with, by name.

Single-pass estimators (``edge_node.estimators``) read the generation's own
token signals. The others need more: ``combiner`` its fitted weights,
``consistency`` and ``self_verify`` the backend that produced the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edge_node.estimators import ESTIMATORS as SINGLE_PASS
from edge_node.settings import EstimatorSettings
from tidegate.backend import ConfidenceEstimator, ModelBackend

log = logging.getLogger(__name__)

Factory = Callable[[ModelBackend, EstimatorSettings], ConfidenceEstimator]


def _consistency(backend: ModelBackend, options: EstimatorSettings) -> ConfidenceEstimator:
    from edge_node.estimators_sampling import ConsistencyEstimator

    return ConsistencyEstimator(
        backend, samples=options.consistency_samples, temperature=options.consistency_temperature
    )


def _self_verify(backend: ModelBackend, options: EstimatorSettings) -> ConfidenceEstimator:
    from edge_node.estimators_verify import SelfVerifyEstimator

    return SelfVerifyEstimator(backend)


def _combiner(backend: ModelBackend, options: EstimatorSettings) -> ConfidenceEstimator:
    from edge_node.combiner import CombinerEstimator

    path = Path(options.combiner_file) if options.combiner_file else None
    return CombinerEstimator.for_model(backend.info.model, path)


def _gain(backend: ModelBackend, options: EstimatorSettings) -> ConfidenceEstimator:
    from edge_node.combiner import GainEstimator

    path = Path(options.combiner_file) if options.combiner_file else None
    cloud = Path(options.cloud_head_file) if options.cloud_head_file else None
    return GainEstimator.for_model(backend.info.model, path, cloud)


# Fitted estimators: without weights for the loaded model, the edge falls back, in this
# order, then to EstimatorSettings.combiner_fallback (single-pass, needs no weights).
FITTED = ("combiner", "gain")
_FALLBACKS = {"gain": ("combiner",), "combiner": ()}
MULTI_PASS: dict[str, Factory] = {
    "combiner": _combiner,
    "gain": _gain,
    "consistency": _consistency,
    "self_verify": _self_verify,
}
ESTIMATOR_NAMES: tuple[str, ...] = (*SINGLE_PASS, *MULTI_PASS)


def build_any_estimator(
    name: str, backend: ModelBackend, options: EstimatorSettings | None = None
) -> ConfidenceEstimator:
    """The estimator ``name`` for answers of ``backend``; ValueError for an unknown name."""
    if name in SINGLE_PASS:
        return SINGLE_PASS[name]()
    try:
        factory = MULTI_PASS[name]
    except KeyError:
        raise ValueError(
            f"unknown confidence estimator {name!r}; choose one of {', '.join(ESTIMATOR_NAMES)}"
        ) from None
    return factory(backend, options or EstimatorSettings())


def edge_estimator(
    name: str, backend: ModelBackend, options: EstimatorSettings | None = None
) -> ConfidenceEstimator:
    """The estimator an edge node serves with; ConfigError naming the field if unusable.

    ``combiner`` or ``gain`` without weights for this model (no file given, none
    shipped for it) falls back with a warning: ``gain`` to ``combiner`` where only its
    weights exist (no cloud head fitted), else to ``options.combiner_fallback``. The
    answers then carry the name of the estimator actually used, so a policy
    calibrated for the fitted estimator sees the difference (see README, Confidence).
    """
    from tidegate.errors import ConfigError

    options = options or EstimatorSettings()
    try:
        return build_any_estimator(name, backend, options)
    except FileNotFoundError as exc:
        explicit = options.combiner_file or options.cloud_head_file
        if name not in FITTED or explicit:
            raise ConfigError(f"estimator: {exc}") from exc
        for fallback in (*_FALLBACKS[name], options.combiner_fallback):
            try:
                estimator = build_any_estimator(fallback, backend, options)
            except FileNotFoundError:
                continue
            log.warning("%s; serving with %s instead", exc, fallback)
            return estimator
        raise AssertionError("single-pass fallbacks need no weights") from exc
    except ValueError as exc:
        raise ConfigError(f"estimator: {exc}") from exc
