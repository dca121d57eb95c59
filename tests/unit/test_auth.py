"""router.auth (unit): keys → tenants, hashed storage, bearer metadata, auth off by default."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from pydantic import ValidationError

from router.auth import (
    Authenticator,
    PermissionDenied,
    TenantConfig,
    bearer_token,
    hash_key,
    new_key,
)
from router.settings import RouterSettings
from tidegate.errors import Unauthenticated

KEY_A, KEY_B = "tg_key-of-acme", "tg_key-of-globex"


def authenticator() -> Authenticator:
    return Authenticator(
        [
            TenantConfig("acme", (hash_key(KEY_A), hash_key("tg_rotated-acme"))),
            TenantConfig("globex", (hash_key(KEY_B),), admin=True),
        ]
    )


def test_hash_is_sha256_hex_and_new_keys_are_random() -> None:
    assert hash_key("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    a, b = new_key(), new_key()
    assert a != b and a.startswith("tg_") and len(a) >= 32


def test_the_key_decides_the_tenant() -> None:
    auth = authenticator()
    acme = auth.authenticate(KEY_A)
    assert (acme.name, acme.authenticated, acme.admin) == ("acme", True, False)
    assert auth.authenticate("tg_rotated-acme").name == "acme"  # either key works
    assert auth.authenticate(KEY_B).admin
    assert auth.authenticate(KEY_A, requested_tenant="acme").name == "acme"


@pytest.mark.parametrize("key", [None, "", "tg_wrong", hash_key(KEY_A)])
def test_missing_or_wrong_key_is_unauthenticated(key) -> None:
    with pytest.raises(Unauthenticated) as info:
        authenticator().authenticate(key)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_key_cannot_claim_another_tenant() -> None:
    with pytest.raises(PermissionDenied, match="belongs to tenant 'acme'") as info:
        authenticator().authenticate(KEY_A, requested_tenant="globex")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_without_tenants_auth_is_off_and_the_request_names_the_tenant() -> None:
    off = Authenticator([])
    tenant = off.authenticate(None, requested_tenant="team-x")
    assert (tenant.name, tenant.authenticated) == ("team-x", False)
    assert off.authenticate_metadata([("authorization", "garbage")], "t").name == "t"


def test_bearer_metadata() -> None:
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer  tg_abc ")]) == "tg_abc"
    assert bearer_token([("Authorization", b"bearer tg_abc")]) == "tg_abc"
    assert bearer_token([]) is None and bearer_token(None) is None
    for bad in ("tg_abc", "Basic dXNlcjpwYXNz", "Bearer "):
        with pytest.raises(Unauthenticated, match="must be 'Bearer <api key>'"):
            bearer_token([("authorization", bad)])
    auth = authenticator()
    assert auth.authenticate_metadata([("authorization", f"Bearer {KEY_B}")]).name == "globex"
    with pytest.raises(Unauthenticated, match="requires an API key"):
        auth.authenticate_metadata([])


def test_settings_store_hashes_never_keys() -> None:
    digest = hash_key(KEY_A)
    ok = RouterSettings.model_validate({"tenants": [{"name": "acme", "api_key_hashes": [digest]}]})
    assert ok.tenants[0].api_key_hashes == [digest]
    with pytest.raises(ValidationError, match="never the key itself"):
        RouterSettings.model_validate({"tenants": [{"name": "acme", "api_key_hashes": [KEY_A]}]})
    with pytest.raises(ValidationError, match="more than one tenant"):
        RouterSettings.model_validate(
            {
                "tenants": [
                    {"name": "a", "api_key_hashes": [digest]},
                    {"name": "b", "api_key_hashes": [digest]},
                ]
            }
        )
    with pytest.raises(ValidationError, match="tenant names must be unique"):
        RouterSettings.model_validate(
            {
                "tenants": [
                    {"name": "a", "api_key_hashes": [digest]},
                    {"name": "a", "api_key_hashes": [hash_key(KEY_B)]},
                ]
            }
        )
