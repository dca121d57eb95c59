"""What the router's edge registry accepts: shared by the edge agent, which checks
its own settings at startup, and the router, which checks every Register.

Kept in the kernel so that the edge need not import the router (nor the router
the edge) to agree on the rules.
"""

from __future__ import annotations

import re

TOKEN_METADATA = "x-tidegate-registry-token"
"""The gRPC metadata key that carries the registry token."""

EDGE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\[\]-]{0,63}$")
EDGE_NAME_RULE = (
    "1-64 characters from letters, digits and . _ : @ - [ ], starting with a letter or digit"
)

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
"""Hosts a server can listen on but a client cannot dial."""
