"""Settings for the router's guards: who may ask (tenants, TLS), how much
(budgets), where a request may go (rules), how failures are handled (retries,
circuit breaker) and how the config is reloaded.

``router.settings.RouterSettings`` holds one section of each. Everything here
except the TLS section, the budget store (``budgets.url``/``key_prefix``) and
``reload`` itself is applied by a hot reload (``router.reload``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tidegate.config import StrictModel
from tidegate.tls import ClientTls, ServerTls

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"


class TenantSettings(StrictModel):
    """One tenant and its API keys (stored hashed)."""

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    """The tenant's name: the cache, budgets and rules are per tenant."""

    api_key_hashes: list[str] = Field(min_length=1, max_length=16)
    """SHA-256 digests of the tenant's keys, each "sha256:<64 hex>"; make one
    with ``tidegate hash-key`` (or ``--new`` for a fresh key). Several: rotate
    keys without downtime."""

    admin: bool = False
    """May see every tenant's budgets in Status (others see their own)."""

    @field_validator("api_key_hashes")
    @classmethod
    def _digests(cls, values: list[str]) -> list[str]:
        import re

        for value in values:
            if not re.fullmatch(KEY_HASH_PATTERN, value):
                raise ValueError(
                    "each entry must be 'sha256:' + 64 lowercase hex digits (the output of "
                    "`tidegate hash-key`), never the key itself"
                )
        return values


class BudgetLimits(StrictModel):
    """A tenant's limits; None: unlimited."""

    cloud_tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12)
    """Cloud tokens (prompt + completion) per calendar minute."""

    cloud_tokens_per_day: int | None = Field(default=None, ge=1, le=10**13)
    """Cloud tokens (prompt + completion) per UTC day."""

    requests_per_second: int | None = Field(default=None, ge=1, le=10**6)
    """Requests of any kind (cache hits too) per second; more are refused with
    RESOURCE_EXHAUSTED whatever ``policy.on_over_budget`` says."""


class TenantBudget(BudgetLimits):
    """One tenant's own limits (instead of ``budgets.default``)."""

    tenant: str = Field(min_length=0, max_length=128)
    """The tenant these limits are for ("" is the tenant of requests that name none)."""


class BudgetSettings(StrictModel):
    """Per-tenant budgets: cloud tokens per window and requests per second."""

    default: BudgetLimits = Field(default_factory=BudgetLimits)
    """Limits of every tenant without its own entry in ``tenants``."""

    tenants: list[TenantBudget] = Field(default_factory=list, max_length=100_000)
    """Per-tenant limits, replacing ``default`` for that tenant."""

    url: str | None = None
    """Where usage is counted. None: the Redis of ``cache.url`` when set (router
    replicas sharing a cache then share budgets too), else in-process.
    ``redis://…``: that Redis. ``memory``: in-process even with a Redis cache
    (each replica then enforces the full budget on its own)."""

    key_prefix: str = Field(default="tidegate:budget:", min_length=1, max_length=128)
    """Redis only: prefix of every budget key."""

    prompt_token_factor: float = Field(default=1.0, ge=1.0, le=16.0)
    """The reservation before a cloud call is ceil(estimated prompt tokens ×
    this) + ``prompt_overhead_tokens`` + max_new_tokens. The estimate (UTF-8
    bytes / 3) over-counts long prompts for typical tokenizers (0.7-0.8× the
    real count with the bundled models); raise this for a tokenizer that counts
    more (the router logs a warning when a call used more than it reserved)."""

    prompt_overhead_tokens: int = Field(default=64, ge=0, le=100_000)
    """Added to every reservation: chat templates insert text the estimate does
    not see (the bundled models' templates add a default system prompt: up to 61
    tokens more than the estimate on the 816 devset questions)."""

    @field_validator("url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None and value != "memory":
            if not value.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(
                    f"budgets.url must be 'memory' or start with redis://, rediss:// or "
                    f"unix:// (got {value!r}); leave it unset to follow cache.url"
                )
        return value

    @field_validator("tenants")
    @classmethod
    def _one_entry_per_tenant(cls, values: list[TenantBudget]) -> list[TenantBudget]:
        names = [b.tenant for b in values]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"one entry per tenant; repeated: {', '.join(repeated)}")
        return values

    def limits_for(self, tenant: str) -> BudgetLimits:
        for entry in self.tenants:
            if entry.tenant == tenant:
                return entry
        return self.default


class RuleSettings(StrictModel):
    """A routing rule. Rules are tried in order; the first that matches decides.

    A rule matches when every condition it sets holds: the tenant is one of
    ``tenants``, the request carries one of ``tags``, and (with ``pii``) the
    built-in detector finds an e-mail address, phone number, card number or IBAN.
    """

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    """Shown in escalation reasons and flags, so users see which rule acted."""

    tenants: list[str] = Field(default_factory=list, max_length=10_000)
    """Match only these tenants; empty: every tenant."""

    tags: list[str] = Field(default_factory=list, max_length=1000)
    """Match requests carrying any of these tags; empty: any request."""

    pii: bool = False
    """Match only requests whose conversation holds an e-mail address, phone
    number, card number or IBAN (``router.pii``)."""

    route: Literal["auto", "edge_only", "edge", "cloud"] = "auto"
    """``auto``: the policy decides. ``edge_only``: privacy pin — only the edge
    answers; the text never reaches a cloud node or a shared (Redis) cache.
    ``edge`` / ``cloud``: force that tier (debugging); the cache is skipped."""

    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """The threshold for matching requests (a request's own min_confidence still wins)."""

    deadline_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    """A deadline for matching requests: the client's own, if shorter, wins."""

    @model_validator(mode="after")
    def _does_something(self) -> RuleSettings:
        if self.route == "auto" and self.min_confidence is None and self.deadline_s is None:
            raise ValueError(
                f"rule {self.name!r} changes nothing: set route, min_confidence or deadline_s"
            )
        return self


class RetrySettings(StrictModel):
    """Bounded retries within a tier. Tiers only ever go edge → cloud: a failed
    cloud call never goes back to the edge, so there is no fallback loop."""

    edge_attempts: int = Field(default=2, ge=1, le=10)
    """Edge calls per request at most, spread over the edge nodes first."""

    cloud_attempts: int = Field(default=3, ge=1, le=10)
    """Cloud calls per request at most, spread over the cloud nodes first."""

    backoff_initial_s: float = Field(default=0.05, ge=0.0, le=10.0)
    """Wait before asking a node again that already failed this request; doubles
    with each further retry (with jitter). A node that timed out is not asked
    again for the same request."""

    backoff_max_s: float = Field(default=1.0, ge=0.0, le=60.0)
    """Upper bound of one backoff wait."""


class BreakerSettings(StrictModel):
    """The circuit breaker that cools down a failing node."""

    failure_threshold: int = Field(default=3, ge=1, le=1000)
    """Consecutive failed calls that open the circuit: the node is not asked
    until its cooldown ends (Status shows it)."""

    cooldown_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    """First cooldown; then one trial call is let through (half-open)."""

    max_cooldown_s: float = Field(default=300.0, gt=0.0, le=86_400.0)
    """Each failed trial doubles the cooldown, up to this."""

    @model_validator(mode="after")
    def _max_covers_first(self) -> BreakerSettings:
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError(
                f"breaker.max_cooldown_s ({self.max_cooldown_s}) must be at least "
                f"breaker.cooldown_s ({self.cooldown_s})"
            )
        return self


class RouterTls(StrictModel):
    """TLS towards clients and towards the model nodes."""

    server: ServerTls | None = None
    """Serve the Router service over TLS (with ``client_ca_file``: mutual TLS);
    unset: plaintext."""

    nodes: ClientTls | None = None
    """Call the edge and cloud nodes over TLS (with ``cert_file``/``key_file``:
    mutual TLS); unset: plaintext."""


class ReloadSettings(StrictModel):
    """Hot reload: SIGHUP always reloads the config file; this adds a file watch."""

    watch_file: bool = False
    """Also reload when the config file's contents change (polled)."""

    poll_s: float = Field(default=2.0, ge=0.1, le=3600.0)
    """How often the file is checked when ``watch_file`` is on."""
