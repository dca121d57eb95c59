"""The learned combiner: logistic regression over the single-pass signals.

Its inputs (``features``) are the generation's token signals (log-probs,
entropies), the same over the *answer span* (the tokens that do not merely
restate the question: "The capital of Japan is **Tokyo**"), and the kind of
question and answer (multiple choice, a number, prompt length), with the
token signals also gated by that kind.

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

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def question_of(request: GenerationRequest) -> str:
    """The text the answer responds to: the last user message."""
    return request.messages[-1].content if request.messages else ""


def calibration_path(model: str, directory: Path = CALIBRATION_DIR) -> Path:
    from tidegate.evaluation.gencache import model_slug

    return directory / f"{model_slug(model)}.json"


@dataclass(frozen=True)
class CombinerWeights:
    model: str  # the edge model identity the weights were fitted on
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    provenance: Mapping[str, Any]

    def probability(self, values: Mapping[str, float]) -> float:
        z = self.intercept
        for name, mu, sd, w in zip(self.features, self.mean, self.scale, self.coef, strict=True):
            z += w * (values[name] - mu) / sd
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "provenance": dict(self.provenance),
        }

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
        )
        unknown = set(weights.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"combiner weights use unknown features: {', '.join(sorted(unknown))}")
        sizes = {len(weights.mean), len(weights.scale), len(weights.coef)}
        if sizes != {len(weights.features)}:
            raise ValueError("combiner weights: features, mean, scale and coef differ in length")
        return weights


def fit_logistic(
    rows: Sequence[Sequence[float]], labels: Sequence[bool], l2: float = 1.0, steps: int = 50
) -> tuple[list[float], float]:
    """Coefficients and intercept maximising the L2-penalised log-likelihood (Newton).

    ``rows`` should be standardised; the intercept is not penalised.
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
        p = 1.0 / (1.0 + np.exp(-(design @ w)))  # [n]
        gradient = design.T @ (p - y) + penalty * w  # [d+1]
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        hessian[-1, -1] += 1e-9  # all-one-class data: keep it invertible
        update = np.linalg.solve(hessian, gradient)
        w -= update
        if float(np.max(np.abs(update))) < 1e-10:
            break
    return [float(v) for v in w[:-1]], float(w[-1])


def fit_combiner(
    samples: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    model: str,
    provenance: Mapping[str, Any],
    names: Sequence[str] = FEATURES,
    l2: float = 1.0,
) -> CombinerWeights:
    """Fit on feature dicts (``features(g, question)``) and right/wrong labels."""
    if len(samples) != len(labels) or not samples:
        raise ValueError("need as many labels as samples, and at least one")
    if all(labels) or not any(labels):
        raise ValueError("need both right and wrong answers to fit the combiner")
    columns = [[s[name] for s in samples] for name in names]
    mean = [sum(c) / len(c) for c in columns]
    scale = [
        math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) or 1.0
        for c, m in zip(columns, mean, strict=True)
    ]
    rows = [
        [(s[name] - m) / sd for name, m, sd in zip(names, mean, scale, strict=True)]
        for s in samples
    ]
    coef, intercept = fit_logistic(rows, labels, l2=l2)
    return CombinerWeights(
        model, tuple(names), tuple(mean), tuple(scale), tuple(coef), intercept, provenance
    )


@dataclass  # not frozen: the ConfidenceEstimator protocol's attributes are plain variables
class CombinerEstimator:
    """P(right) from the fitted logistic regression; costs nothing extra."""

    weights: CombinerWeights
    name: str = "combiner"
    extra_cost: str = "none"

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        return self.weights.probability(features(generation, question_of(request)))

    @classmethod
    def load(cls, path: Path) -> CombinerEstimator:
        return cls(CombinerWeights.from_json(json.loads(path.read_text(encoding="utf-8"))))

    @classmethod
    def for_model(cls, model: str, path: Path | None = None) -> CombinerEstimator:
        """The weights fitted for ``model``; FileNotFoundError / ValueError saying what to run."""
        path = path or calibration_path(model)
        if not path.is_file():
            raise FileNotFoundError(
                f"no combiner weights for edge model {model} ({path} does not exist); fit them "
                "with `tidegate eval` + `tidegate fit-combiner` (see README, Confidence), or "
                "choose a single-pass estimator"
            )
        estimator = cls.load(path)
        if estimator.weights.model != model:
            raise ValueError(
                f"{path} was fitted for edge model {estimator.weights.model}, not {model}; "
                "refit it for this model (the token signals differ between variants)"
            )
        return estimator
