"""The learned combiner: logistic regression over the single-pass signals.

Its inputs (``features``) are the generation's token signals (log-probs,
entropies), the same over the *answer span* (the tokens that do not merely
restate the question: "The capital of Japan is **Tokyo**"), and the kind of
question and answer (multiple choice, a number, prompt length), with the
token signals also gated by that kind; and linear probes on two of the model's
own final hidden states (``STATES``): where the prompt ends, and where the
answer ends.

The score is a calibrated probability that the edge answer is right — fitted
(``fit_combiner``) on labelled evaluation items of one exact edge model variant
(``BackendInfo.model``, e.g. ``smollm2-135m@b179c9523d0e/int8``), and stored as
a small JSON file ``edge_node/calibration/<model slug>.json`` that the edge node
loads. Quantization changes the token signals, so every variant needs its own
fit: ``CombinerEstimator.for_model`` refuses a file fitted for another model.

The fit is L2-regularised logistic regression by Newton's method on standardised
features (numpy only): a few dozen features and a few hundred items need no more.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_node.estimators import quantile
from tidegate.backend import Generation
from tidegate.chat import FinishReason, GenerationRequest

CALIBRATION_DIR = Path(__file__).with_name("calibration")
_FLOOR = -20.0  # log-probs below this carry no more information (and exp underflows)

# What a log-prob means depends on the kind of answer: a multiple-choice letter, a
# number, or words. These features are also given gated by the answer's kind
# (``…_x_mc``, ``…_x_num``: the feature where that kind applies, else 0), so one
# logistic regression holds a slope per kind.
_GATED = (
    "mean_logprob",
    "min_logprob",
    "q10_logprob",
    "first_logprob",
    "mean_entropy",
    "max_entropy",
    "log_tokens",
    "answer_min_logprob",
    "answer_mean_logprob",
    "copied_fraction",
)
FEATURES: tuple[str, ...] = (
    # the generation's token signals
    "mean_logprob",
    "min_logprob",
    "q10_logprob",
    "first_logprob",
    "mean_entropy",
    "max_entropy",
    "log_tokens",
    "truncated",
    # the answer span: tokens that do not just restate the question
    "answer_min_logprob",
    "answer_mean_logprob",
    "copied_fraction",
    # the kind of question and answer
    "log_prompt_tokens",
    "multiple_choice",
    "numeric_reply",
    *(f"{name}_x_mc" for name in _GATED),
    *(f"{name}_x_num" for name in _GATED),
)
_OPTION_LINE = re.compile(r"(?m)^\s*\(?[A-Z][.)]\s")


def _answer_span(g: Generation, question: str) -> tuple[list[int], int]:
    """Indices of the answer's tokens (words not all found in the question), and how
    many tokens merely restate the question. No answer tokens: every token counts."""
    from tidegate.evaluation.scoring import normalize_words

    asked = set(normalize_words(question))
    span: list[int] = []
    copied = 0
    for i, text in enumerate(g.token_texts or [""] * len(g.logprobs)):
        words = normalize_words(text)
        if not words:
            continue  # punctuation, whitespace: neither
        if all(w in asked for w in words):
            copied += 1
        else:
            span.append(i)
    return span or list(range(len(g.logprobs))), copied


def features(g: Generation, question: str = "") -> dict[str, float]:
    """The single-pass signals the combiner reads; all 0 for an empty generation."""
    if not g.logprobs:
        return dict.fromkeys(FEATURES, 0.0)
    lps = [max(_FLOOR, lp) for lp in g.logprobs]
    entropies = g.entropies if g.entropies is not None else [-lp for lp in lps]
    q10 = quantile([math.exp(lp) for lp in lps], 0.10)
    span, copied = _answer_span(g, question)
    answer = [lps[i] for i in span]
    f = {
        "mean_logprob": sum(lps) / len(lps),
        "min_logprob": min(lps),
        "q10_logprob": max(_FLOOR, math.log(q10)) if q10 > 0 else _FLOOR,
        "first_logprob": lps[0],
        "mean_entropy": sum(entropies) / len(entropies),
        "max_entropy": max(entropies),
        "log_tokens": math.log1p(len(lps)),
        "truncated": 1.0 if g.finish_reason is FinishReason.LENGTH else 0.0,
        "answer_min_logprob": min(answer),
        "answer_mean_logprob": sum(answer) / len(answer),
        "copied_fraction": copied / len(lps),
        "log_prompt_tokens": math.log1p(g.prompt_tokens),
        "multiple_choice": 1.0 if len(_OPTION_LINE.findall(question)) >= 2 else 0.0,
        "numeric_reply": 1.0 if re.search(r"\d", g.text) else 0.0,
    }
    for name in _GATED:
        f[f"{name}_x_mc"] = f[name] * f["multiple_choice"]
        f[f"{name}_x_num"] = f[name] * f["numeric_reply"]
    return f


# The hidden states a probe can read (``Generation`` attributes of these names): before
# the answer (the prompt's last position) and after it (the answer's last token).
STATES: tuple[str, ...] = ("prompt_state", "answer_state")


def states_of(g: Generation) -> dict[str, list[float] | None]:
    """The generation's hidden states by name, as the probes read them."""
    return {name: getattr(g, name) for name in STATES}


def question_of(request: GenerationRequest) -> str:
    """The text the answer responds to: the last user message."""
    return request.messages[-1].content if request.messages else ""


def calibration_path(model: str, directory: Path = CALIBRATION_DIR) -> Path:
    from tidegate.evaluation.gencache import model_slug

    return directory / f"{model_slug(model)}.json"


@dataclass(frozen=True)
class Probe:
    """A linear probe on one hidden state (``STATES``): one slope per standardised
    dimension. The model's own hidden state before it answers says much about whether
    the question is one it (or a larger model) can answer (Kadavath et al. 2022,
    "Language Models (Mostly) Know What They Know"); its state at the answer's end, about
    the answer it gave (measured: +0.01–0.03 AUROC over the prompt state alone)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]

    @functools.cached_property
    def _folded(self) -> tuple[tuple[float, ...], float]:
        """Σ w·(s − μ)/σ as Σ s·(w/σ) − Σ w·μ/σ: per answer, one pass over the state."""
        slope = tuple(w / sd for w, sd in zip(self.coef, self.scale, strict=True))
        offset = sum(w * mu for w, mu in zip(slope, self.mean, strict=True))
        return slope, offset

    def logit(self, state: Sequence[float] | None) -> float:
        """The probe's share of the logit; 0 (the average state) when there is no state."""
        if state is None:
            return 0.0
        if len(state) != len(self.coef):
            raise ValueError(
                f"the hidden state has {len(state)} dimensions, the probe {len(self.coef)}: "
                "the weights were fitted for another model"
            )
        slope, offset = self._folded
        return sum(map(operator.mul, state, slope)) - offset

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "scale": list(self.scale), "coef": list(self.coef)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        probe = cls(*(tuple(float(x) for x in data[k]) for k in ("mean", "scale", "coef")))
        if len({len(probe.mean), len(probe.scale), len(probe.coef)}) != 1:
            raise ValueError("combiner probe: mean, scale and coef differ in length")
        return probe


@dataclass(frozen=True)
class CombinerWeights:
    model: str  # the edge model identity the weights were fitted on
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    provenance: Mapping[str, Any]
    # One probe per hidden state it was fitted with (names from ``STATES``); none: fitted
    # on the token features alone.
    probes: Mapping[str, Probe] = field(default_factory=dict)
    # What the probability is of: "edge" (the edge answer is right) or the identity of
    # the cloud model whose answer would be right (the gain estimator's cloud head).
    predicts: str = "edge"

    def probability(
        self,
        values: Mapping[str, float],
        states: Mapping[str, Sequence[float] | None] | None = None,
    ) -> float:
        """P from the features (``features(g, question)``) and the hidden states by name:
        ``states_of(g)``, or any mapping that holds them under those names, such as an
        eval record (a missing one counts as the average state)."""
        z = self.intercept
        for name, mu, sd, w in zip(self.features, self.mean, self.scale, self.coef, strict=True):
            z += w * (values[name] - mu) / sd
        for name, probe in self.probes.items():
            z += probe.logit((states or {}).get(name))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = {
            "model": self.model,
            "predicts": self.predicts,
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "provenance": dict(self.provenance),
        }
        if self.probes:
            data["probes"] = {name: probe.to_json() for name, probe in self.probes.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CombinerWeights:
        weights = cls(
            model=str(data["model"]),
            features=tuple(data["features"]),
            mean=tuple(float(x) for x in data["mean"]),
            scale=tuple(float(x) for x in data["scale"]),
            coef=tuple(float(x) for x in data["coef"]),
            intercept=float(data["intercept"]),
            provenance=dict(data.get("provenance", {})),
            probes=_probes_from_json(data),
            predicts=str(data.get("predicts", "edge")),
        )
        unknown = set(weights.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"combiner weights use unknown features: {', '.join(sorted(unknown))}")
        sizes = {len(weights.mean), len(weights.scale), len(weights.coef)}
        if sizes != {len(weights.features)}:
            raise ValueError("combiner weights: features, mean, scale and coef differ in length")
        return weights


def _probes_from_json(data: Mapping[str, Any]) -> dict[str, Probe]:
    """``probes`` by state name; weights written before the answer state have one
    ``probe``, on the prompt state."""
    probes = dict(data.get("probes") or {})
    if data.get("probe"):
        probes.setdefault("prompt_state", data["probe"])
    unknown = set(probes) - set(STATES)
    if unknown:
        raise ValueError(f"combiner weights probe unknown states: {', '.join(sorted(unknown))}")
    return {name: Probe.from_json(probes[name]) for name in STATES if name in probes}


def fit_logistic(
    rows: Any, labels: Any, l2: float = 1.0, steps: int = 50
) -> tuple[list[float], float]:
    """Coefficients and intercept maximising the L2-penalised log-likelihood (Newton).

    ``rows`` ([n, d], sequences or an array) should be standardised; ``labels`` [n] are
    right/wrong; the intercept is not penalised.
    """
    import numpy as np

    x = np.asarray(rows, dtype=float)  # [n, d]
    y = np.asarray(labels, dtype=float)  # [n]
    n, d = x.shape
    design = np.hstack([x, np.ones((n, 1))])  # [n, d+1], the intercept last
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    w = np.zeros(d + 1)
    for _ in range(steps):
        p = 0.5 + 0.5 * np.tanh(0.5 * (design @ w))  # [n] the sigmoid, without exp's overflow
        gradient = design.T @ (p - y) + penalty * w  # [d+1]
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        hessian[-1, -1] += 1e-9  # all-one-class data: keep it invertible
        update = np.linalg.solve(hessian, gradient)
        w -= update
        if float(np.max(np.abs(update))) < 1e-10:
            break
    return [float(v) for v in w[:-1]], float(w[-1])


L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)  # the penalties cross-validation chooses from


def _standardise(x: Any) -> tuple[Any, Any, Any]:
    """(standardised x, column means, column scales); a constant column keeps scale 1."""
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    return (x - mean) / scale, mean, scale


def choose_l2(x: Any, y: Any, folds: int = 5, grid: Sequence[float] = L2_GRID) -> float:
    """The penalty with the best cross-validated AUROC on (x, y) (ties: the larger, the
    simpler model). Folds are a fixed shuffle, so the choice is reproducible."""
    import numpy as np

    from tidegate.evaluation.metrics import auroc

    order = np.random.default_rng(0).permutation(len(y))
    parts = [p for p in np.array_split(order, folds) if len(p)]
    best, best_auroc = grid[-1], -1.0
    for l2 in sorted(grid, reverse=True):
        scores = np.zeros(len(y))
        for part in parts:
            train = np.setdiff1d(order, part)
            if y[train].min() == y[train].max():
                continue  # a fold with one class only: nothing to learn from it
            z, mean, scale = _standardise(x[train])
            coef, intercept = fit_logistic(z, y[train], l2=l2)
            scores[part] = ((x[part] - mean) / scale) @ np.asarray(coef) + intercept
        value = auroc(scores.tolist(), [bool(v) for v in y]) or 0.0
        if value > best_auroc + 1e-9:
            best, best_auroc = l2, value
    return best


def fit_combiner(
    samples: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    model: str,
    provenance: Mapping[str, Any],
    names: Sequence[str] = FEATURES,
    l2: float | None = 1.0,
    states: Mapping[str, Sequence[Sequence[float]]] | None = None,
    predicts: str = "edge",
) -> CombinerWeights:
    """Fit on feature dicts (``features(g, question)``) and right/wrong labels.

    ``states``: hidden states by name (``STATES``), one per sample each: fitted jointly,
    one probe per name. ``l2=None``: the penalty is chosen by 5-fold cross-validation
    (``choose_l2``), recorded in the provenance.
    """
    import numpy as np

    if len(samples) != len(labels) or not samples:
        raise ValueError("need as many labels as samples, and at least one")
    if all(labels) or not any(labels):
        raise ValueError("need both right and wrong answers to fit the combiner")
    x = np.array([[s[name] for name in names] for s in samples], dtype=float)  # [n, f]
    states = states or {}
    unknown = set(states) - set(STATES)
    if unknown:
        raise ValueError(f"no probe for states {', '.join(sorted(unknown))}")
    columns: dict[str, slice] = {}  # state name -> its columns in x
    for name in (n for n in STATES if n in states):
        vectors = states[name]
        if len(vectors) != len(samples) or len({len(v) for v in vectors}) != 1:
            raise ValueError(f"need one {name} per sample, all of one size")
        columns[name] = slice(x.shape[1], x.shape[1] + len(vectors[0]))
        x = np.hstack([x, np.asarray(vectors, dtype=float)])  # [n, f + hidden (+ hidden)]
    y = np.asarray(labels, dtype=float)
    if l2 is None:
        l2 = choose_l2(x, y)
    z, mean, scale = _standardise(x)
    coef, intercept = fit_logistic(z, y, l2=l2)
    f = len(names)
    probes = {
        name: Probe(tuple(mean[c].tolist()), tuple(scale[c].tolist()), tuple(coef[c]))
        for name, c in columns.items()
    }
    return CombinerWeights(
        model,
        tuple(names),
        tuple(mean[:f].tolist()),
        tuple(scale[:f].tolist()),
        tuple(coef[:f]),
        intercept,
        dict(provenance) | {"l2": l2},
        probes=probes,
        predicts=predicts,
    )


def load_weights(path: Path, model: str, what: str = "combiner weights") -> CombinerWeights:
    """Weights fitted for ``model``; FileNotFoundError / ValueError saying what to run."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no {what} for edge model {model} ({path} does not exist); fit them with "
            "`tidegate eval` + `tidegate fit-combiner` (see README, Confidence), or choose a "
            "single-pass estimator"
        )
    weights = CombinerWeights.from_json(json.loads(path.read_text(encoding="utf-8")))
    if weights.model != model:
        raise ValueError(
            f"{path} was fitted for edge model {weights.model}, not {model}; "
            "refit it for this model (the token signals differ between variants)"
        )
    return weights


@dataclass  # not frozen: the ConfidenceEstimator protocol's attributes are plain variables
class CombinerEstimator:
    """P(right) from the fitted logistic regression; costs nothing extra."""

    weights: CombinerWeights
    name: str = "combiner"
    extra_cost: str = "none"

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        return self.weights.probability(
            features(generation, question_of(request)), states_of(generation)
        )

    @classmethod
    def load(cls, path: Path) -> CombinerEstimator:
        return cls(CombinerWeights.from_json(json.loads(path.read_text(encoding="utf-8"))))

    @classmethod
    def for_model(cls, model: str, path: Path | None = None) -> CombinerEstimator:
        """The weights fitted for ``model``; FileNotFoundError / ValueError saying what to run."""
        return cls(load_weights(path or calibration_path(model), model))


def gain_score(p_edge: float, p_cloud: float) -> float:
    """½ + ½·(P(edge right) − P(cloud right)): the expected gain of keeping the edge
    answer, in [0, 1]; below ½ the cloud is expected to do better."""
    return 0.5 + 0.5 * (p_edge - p_cloud)


@dataclass
class GainEstimator:
    """Keep the edge answer unless the cloud is expected to do better.

    Two heads over the same single-pass features and probes: the combiner's P(the edge
    answer is right), and P(the cloud model's answer would be right), fitted on the
    cloud's answers to the same questions. Escalating a question both models get wrong
    (or both right) spends budget for nothing; the gain ranks questions by what
    escalating them is expected to win. Costs nothing extra. The cloud head is fitted
    for one cloud model (``predicts``): refit it when the cloud changes.
    """

    edge: CombinerWeights
    cloud: CombinerWeights
    name: str = "gain"
    extra_cost: str = "none"

    def gain(
        self, values: Mapping[str, float], states: Mapping[str, Sequence[float] | None]
    ) -> float:
        """The score from the features (``features(g, question)``) and the hidden states
        (``states_of(g)``)."""
        return gain_score(
            self.edge.probability(values, states), self.cloud.probability(values, states)
        )

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        return self.gain(features(generation, question_of(request)), states_of(generation))

    @classmethod
    def for_model(
        cls, model: str, path: Path | None = None, cloud_path: Path | None = None
    ) -> GainEstimator:
        edge_path = path or calibration_path(model)
        cloud_path = cloud_path or cloud_head_path(edge_path)
        return cls(
            load_weights(edge_path, model),
            load_weights(cloud_path, model, "cloud-head weights (gain estimator)"),
        )


def cloud_head_path(edge_path: Path) -> Path:
    """Where the cloud head lives beside the combiner's weights: ``<slug>.cloud.json``."""
    return edge_path.with_suffix(".cloud.json")
