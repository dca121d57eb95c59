"""The edge agent's configuration: the ``register:`` section of an edge's YAML.

With it, ``tidegate edge serve`` also registers with a router (and keeps its
lease alive), and serves the ``tidegate.v1.Router`` API to applications on the
device, forwarding to that router and answering offline when it is away.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tidegate.config import StrictModel
from tidegate.registration import EDGE_NAME_PATTERN, EDGE_NAME_RULE, WILDCARD_HOSTS
from tidegate.server import split_address
from tidegate.tls import ClientTls


def _dialable(address: str) -> str:
    """The host of ``address``, once its port is checked to be one a client can
    dial: the router refuses the rest, so fail at startup, not on every Register."""
    host, port = split_address(address)  # raises ValueError naming the bad address
    if not 1 <= port <= 65535:
        raise ValueError(f"the port of {address!r} must be 1-65535")
    return host


def _check_router(value: str) -> str:
    _dialable(value)
    return value


def _check_advertise(value: str | None) -> str | None:
    if value is not None and _dialable(value) in WILDCARD_HOSTS:
        raise ValueError(
            f"{value!r} is a wildcard address the router cannot dial; set "
            "register.advertise to this edge's HOST:PORT as the router reaches it"
        )
    return value


def _check_name(value: str | None) -> str | None:
    if value is not None and not EDGE_NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not an edge name the router accepts: {EDGE_NAME_RULE}")
    return value


class RegisterSettings(StrictModel):
    """Register with a router, heartbeat, and serve the Router API on the device."""

    router: str = "127.0.0.1:50051"
    """HOST:PORT of the router (its gRPC port, which also serves EdgeRegistry)."""

    announce: bool = True
    """Register this edge so the router sends it work. Turn off on devices the
    router cannot dial (behind NAT): the agent then only forwards local
    applications' requests, and answers offline when the router is away."""

    advertise: str | None = None
    """HOST:PORT the router should dial to reach this edge; default: the
    ``listen`` address (required when ``listen`` binds a wildcard such as 0.0.0.0)."""

    name: str | None = Field(default=None, min_length=1, max_length=64)
    """Unique name among the router's edges; default: the advertised address."""

    capacity: int = Field(default=1, ge=1, le=4096)
    """Concurrent requests this edge serves well (the transformers backend
    generates one at a time, so requests beyond this count as queued)."""

    heartbeat_interval_s: float | None = Field(default=None, ge=0.05, le=3600.0)
    """Heartbeat period; default: the one the router asks for."""

    backoff_initial_s: float = Field(default=0.5, ge=0.01, le=60.0)
    """First wait before retrying an unreachable router; doubles per failure."""

    backoff_max_s: float = Field(default=15.0, ge=0.05, le=3600.0)
    """Longest wait between retries (each wait is jittered down to half of it):
    how long the agent may take to notice the router is back."""

    rpc_timeout_s: float = Field(default=5.0, gt=0.0, le=300.0)
    """Deadline of each Register/Heartbeat/Deregister call."""

    connect_timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    """Applications' requests: how long to wait for a connection to the router
    before answering from the local model, flagged ``offline``."""

    token_env: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"
    )
    """Name of the environment variable holding the router's registry token
    (the router's ``registry.token_env``); never the token itself."""

    tls: ClientTls | None = None
    """TLS (or mutual TLS) to the router; unset: plaintext."""

    _router = field_validator("router")(_check_router)
    _advertise = field_validator("advertise")(_check_advertise)
    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _backoff_bounds(self) -> RegisterSettings:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"register.backoff_initial_s ({self.backoff_initial_s}) must not exceed "
                f"register.backoff_max_s ({self.backoff_max_s})"
            )
        return self
