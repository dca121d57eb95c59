"""Cloud node configuration: which backend serves, and the serving limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tidegate.config import ModelSettings, StrictModel, check_address
from tidegate.tls import ServerTls


class OpenAISettings(StrictModel):
    """An OpenAI-compatible chat completions server (vLLM, TGI, llama.cpp server, …)."""

    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", min_length=1, pattern=r"^https?://\S+$"
    )
    """The API root, up to and including the version segment: requests go to
    ``{base_url}/chat/completions``."""

    model: str = Field(default="default", min_length=1, max_length=512)
    """The model name the server expects in each request (``model`` field)."""

    api_key_env: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"
    )
    """The name of the environment variable holding the API key (never the key
    itself); read when the backend starts. None: send no Authorization header."""

    timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    """Seconds to wait for a whole unary answer, or between two streamed chunks."""

    connect_timeout_s: float = Field(default=5.0, gt=0.0, le=300.0)
    """Seconds to wait for the TCP (and TLS) connection to the server."""

    context_length: int = Field(default=8192, ge=256, le=10_000_000)
    """The served model's context window (prompt + new tokens), reported by Info."""

    logprobs: bool = True
    """Ask for per-token log-probabilities (``logprobs: true``); turn off for a
    server that rejects the field. Without them the cloud answer carries no
    token-level signal."""

    max_connections: int = Field(default=64, ge=1, le=10_000)
    """At most this many concurrent HTTP connections to the server."""


class CloudSettings(StrictModel):
    """A cloud node: listen address, backend choice, and per-request limits."""

    listen: str = "127.0.0.1:50053"
    """HOST:PORT the gRPC server binds (port 0: any free port)."""

    _listen = field_validator("listen")(check_address)

    backend: Literal["transformers", "openai"] = "transformers"
    """``transformers``: load ``model`` in this process; ``openai``: forward to the
    OpenAI-compatible server described by ``openai``."""

    model: ModelSettings = ModelSettings(source="qwen2.5-coder-0.5b", quantization="int8")
    """The model to load with the transformers backend (ignored for ``openai``)."""

    openai: OpenAISettings | None = Field(default=None, validate_default=True)
    """The remote server; required when ``backend`` is ``openai``."""

    default_max_new_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """New-token limit for requests that do not set ``max_new_tokens``."""

    max_new_tokens_limit: int = Field(default=4096, ge=1, le=1_000_000, validate_default=True)
    """Requests asking for more new tokens than this are rejected (INVALID_ARGUMENT)."""

    tls: ServerTls | None = None
    """Serve over TLS (with ``client_ca_file``: mutual TLS, e.g. only the router
    may call); unset: plaintext."""

    @field_validator("openai")
    @classmethod
    def _openai_when_needed(
        cls, value: OpenAISettings | None, info: ValidationInfo
    ) -> OpenAISettings | None:
        if value is None and info.data.get("backend") == "openai":
            raise ValueError(
                "required when backend is 'openai': add an 'openai' section "
                "with at least base_url and model"
            )
        return value

    @field_validator("max_new_tokens_limit")
    @classmethod
    def _limit_covers_default(cls, value: int, info: ValidationInfo) -> int:
        default = info.data.get("default_max_new_tokens")
        if default is not None and default > value:
            raise ValueError(f"must be at least default_max_new_tokens ({default}); got {value}")
        return value
