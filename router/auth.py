"""Tenants and API keys: who is asking.

Transport-agnostic: ``Authenticator.authenticate(api_key)`` maps a key to its
tenant (any front end can call it: the gRPC servicer reads the key from the
``authorization: Bearer <key>`` metadata, an HTTP front end from its header).

* No tenants configured: authentication is off, and the tenant is whatever the
  request names (the ``tenant`` field; "" when unset). This keeps a local
  ``tidegate up`` working without keys.
* Tenants configured: every request needs a key of one of them, and the tenant
  comes from the key, never from the request body. A body naming another
  tenant is refused (PERMISSION_DENIED), not silently rewritten.

Keys are stored as SHA-256 hex digests (``tidegate hash-key``). A plain,
unsalted hash is enough because keys are random tokens with ≥128 bits of
entropy (``tidegate hash-key --new`` makes one), not passwords: no dictionary
to attack. Lookup goes through the digest, so the comparison never touches the
secret itself and its timing reveals nothing useful about any stored key.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from tidegate.errors import TidegateError, Unauthenticated

KEY_PREFIX = "tg_"  # generated keys start with this, so a leaked one is recognisable
HASH_PREFIX = "sha256:"


class PermissionDenied(TidegateError):
    code = grpc.StatusCode.PERMISSION_DENIED


def hash_key(api_key: str) -> str:
    """What the config stores for ``api_key``: "sha256:" + 64 hex digits."""
    return HASH_PREFIX + hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (192 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class TenantConfig:
    """The slice of a tenant's settings the authenticator needs."""

    name: str
    key_hashes: tuple[str, ...]
    admin: bool = False


@dataclass(frozen=True)
class Tenant:
    """The caller, as established by authentication."""

    name: str
    authenticated: bool  # False: auth is off and the name came from the request
    admin: bool = False  # may see every tenant's budgets in Status


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key in ``authorization: Bearer <key>`` metadata, or None when absent.

    A malformed header raises UNAUTHENTICATED saying what is wrong with it.
    """
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the authorization metadata must be 'Bearer <api key>' "
                "(tidegate ask --api-key KEY, or TIDEGATE_API_KEY)"
            )
        return token.strip()
    return None


class Authenticator:
    """Maps API keys to tenants; immutable (a reload builds a new one)."""

    def __init__(self, tenants: Sequence[TenantConfig]) -> None:
        self._by_hash: dict[str, TenantConfig] = {}
        for tenant in tenants:
            for digest in tenant.key_hashes:
                self._by_hash[digest.lower()] = tenant
        self.enabled = bool(tenants)
        self.tenant_names = tuple(t.name for t in tenants)

    def authenticate(self, api_key: str | None, requested_tenant: str = "") -> Tenant:
        """The tenant making this request.

        ``requested_tenant`` is what the request body names: used as the tenant
        when auth is off; when auth is on it must be empty or the key's own.
        Raises Unauthenticated (missing or unknown key) or PermissionDenied.
        """
        if not self.enabled:
            return Tenant(requested_tenant, authenticated=False)
        if not api_key:
            raise Unauthenticated(
                "this router requires an API key: send 'authorization: Bearer <key>' "
                "(tidegate ask --api-key KEY, or TIDEGATE_API_KEY)"
            )
        config = self._by_hash.get(hash_key(api_key))
        if config is None:
            raise Unauthenticated("the API key is not valid for this router")
        if requested_tenant and requested_tenant != config.name:
            raise PermissionDenied(
                f"the request names tenant {requested_tenant!r} but the API key belongs to "
                f"tenant {config.name!r}; leave the tenant field empty or use that tenant's key"
            )
        return Tenant(config.name, authenticated=True, admin=config.admin)

    def authenticate_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, requested_tenant: str = ""
    ) -> Tenant:
        """``authenticate`` with the key from gRPC invocation metadata."""
        if not self.enabled:
            return Tenant(requested_tenant, authenticated=False)
        return self.authenticate(bearer_token(metadata), requested_tenant)
