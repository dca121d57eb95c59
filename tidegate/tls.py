"""TLS and mutual TLS for tidegate's gRPC servers (router, edge, cloud) and clients.

Certificates are PEM files named in the config. Both sides read and check them
at startup, so a missing file, a key that does not match its certificate, or a
CA file that holds no certificate fails the process then, naming the field,
instead of failing every handshake later.

* ``ServerTls``: a server's certificate chain and key; with ``client_ca_file``
  the server also demands a client certificate signed by that CA (mutual TLS).
* ``ClientTls``: the CA a client trusts (default: the system roots) and, for
  mutual TLS, the client's own certificate and key.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, model_validator

from tidegate.config import StrictModel
from tidegate.errors import ConfigError


class ServerTls(StrictModel):
    """TLS for a gRPC server; with ``client_ca_file``, mutual TLS."""

    cert_file: str = Field(min_length=1)
    """PEM certificate chain the server presents (leaf first)."""

    key_file: str = Field(min_length=1)
    """PEM private key of ``cert_file``'s leaf certificate."""

    client_ca_file: str | None = Field(default=None, min_length=1)
    """PEM CA bundle: when set, every client must present a certificate signed
    by one of these CAs (mutual TLS); unset, clients need no certificate."""


class ClientTls(StrictModel):
    """TLS for a gRPC client; with ``cert_file``/``key_file``, mutual TLS."""

    ca_file: str | None = Field(default=None, min_length=1)
    """PEM CA bundle the server's certificate must chain to; unset: the system's
    trusted roots."""

    cert_file: str | None = Field(default=None, min_length=1)
    """PEM client certificate chain, for servers that demand one (mutual TLS)."""

    key_file: str | None = Field(default=None, min_length=1)
    """PEM private key of ``cert_file``."""

    server_name: str | None = Field(default=None, min_length=1, max_length=253)
    """Check the server's certificate against this name instead of the host in
    the address (e.g. when connecting by IP to a certificate issued for a name)."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


def read_pem(path: str, field: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming ``field`` when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{field}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def _check_pair(cert_file: str, key_file: str, field: str) -> None:
    """Fail now when the key does not belong to the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{field}.cert_file/key_file: {cert_file} and {key_file} are not a matching "
            f"PEM certificate and key ({exc})"
        ) from exc


def _check_ca(ca_file: str, field: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{field}: {ca_file} holds no usable CA certificate ({exc})") from exc


def server_credentials(tls: ServerTls, field: str = "tls") -> grpc.ServerCredentials:
    """Server credentials from ``tls``; ``field`` names the section in errors."""
    cert = read_pem(tls.cert_file, f"{field}.cert_file")
    key = read_pem(tls.key_file, f"{field}.key_file")
    _check_pair(tls.cert_file, tls.key_file, field)
    client_ca = None
    if tls.client_ca_file is not None:
        client_ca = read_pem(tls.client_ca_file, f"{field}.client_ca_file")
        _check_ca(tls.client_ca_file, f"{field}.client_ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(tls: ClientTls, field: str = "tls") -> grpc.ChannelCredentials:
    """Channel credentials from ``tls``; ``field`` names the section in errors."""
    ca = None
    if tls.ca_file is not None:
        ca = read_pem(tls.ca_file, f"{field}.ca_file")
        _check_ca(tls.ca_file, f"{field}.ca_file")
    cert = key = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert = read_pem(tls.cert_file, f"{field}.cert_file")
        key = read_pem(tls.key_file, f"{field}.key_file")
        _check_pair(tls.cert_file, tls.key_file, field)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(tls: ClientTls | None) -> list[tuple[str, Any]]:
    """Extra channel options TLS needs (the server-name override)."""
    if tls is not None and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def open_channel(
    address: str,
    tls: ClientTls | None = None,
    options: Sequence[tuple[str, Any]] = (),
    field: str = "tls",
) -> grpc.aio.Channel:
    """An aio channel to ``address``: plaintext when ``tls`` is None."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address,
        channel_credentials(tls, field),
        options=[*options, *channel_options(tls)],
    )
