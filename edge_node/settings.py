"""Edge node configuration (YAML + TIDEGATE_EDGE__* environment overrides)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge_node.agent_settings import RegisterSettings
from tidegate.config import ModelSettings, StrictModel, check_address
from tidegate.tls import ServerTls


class EstimatorSettings(StrictModel):
    """Options of the estimators that need more than the generation itself."""

    consistency_samples: int = Field(default=5, ge=2, le=32)
    """consistency: how many extra answers to sample (each a whole generation)."""

    consistency_temperature: float = Field(default=0.7, gt=0.0, le=2.0)
    """consistency: the sampling temperature of the extra answers."""

    combiner_file: str | None = None
    """combiner: the fitted weights (JSON); default
    ``edge_node/calibration/<model identity>.json``, shipped for the default edge model."""

    cloud_head_file: str | None = None
    """gain: the cloud head's fitted weights (JSON); default: ``combiner_file`` (or its
    default) with the suffix ``.cloud.json``."""

    combiner_fallback: Literal["seq_prob", "min_prob", "quantile_prob", "mean_entropy"] = "seq_prob"
    """combiner, gain: the single-pass estimator served instead when no weights exist
    for the loaded model and no file is set (a warning is logged; answers carry its
    name, so a router whose policy.estimator is ``gain`` escalates them)."""


class EdgeSettings(StrictModel):
    """An edge node: which model, which confidence estimator, where to listen."""

    listen: str = "127.0.0.1:50052"
    """HOST:PORT the ModelNode gRPC server binds (port 0 picks a free one)."""

    _listen = field_validator("listen")(check_address)

    model: ModelSettings = ModelSettings(source="smollm2-135m", quantization="int4")
    """The local model: a bundled name, Hugging Face id, folder or .gguf path."""

    estimator: str = "gain"
    """Confidence estimator whose score travels with every answer: single-pass
    seq_prob | min_prob | quantile_prob | mean_entropy | combiner (P(right), fitted
    for this exact model, see README "Confidence") | gain (the combiner against a
    fitted P(the cloud is right): escalates where the cloud is expected to do
    better), or consistency (k extra sampled generations) | self_verify (one extra
    forward pass)."""

    estimator_options: EstimatorSettings = Field(default_factory=EstimatorSettings)
    """Knobs of the estimators that have any."""

    default_max_new_tokens: int = Field(default=256, ge=1, le=32768)
    """New tokens generated when a request does not say."""

    max_new_tokens_limit: int = Field(default=2048, ge=1, le=32768)
    """Largest max_new_tokens a request may ask for (INVALID_ARGUMENT above it)."""

    tls: ServerTls | None = None
    """Serve over TLS (with ``client_ca_file``: mutual TLS, e.g. only the router
    may call); unset: plaintext."""

    # YAML key `register` (an attribute of that name would shadow pydantic's own).
    registration: RegisterSettings | None = Field(default=None, alias="register")
    """Register with a router and serve the Router API to apps on this device
    (``tidegate edge serve --register ROUTER``); unset: a plain edge node."""

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        from edge_node.estimators_registry import ESTIMATOR_NAMES

        if value not in ESTIMATOR_NAMES:
            raise ValueError(
                f"unknown estimator {value!r}; choose one of {', '.join(ESTIMATOR_NAMES)}"
            )
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> EdgeSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must not exceed "
                f"max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        return self
