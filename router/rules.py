"""Policy rules beyond the threshold: pure matching, no I/O.

Rules (``RouterSettings.rules``) are tried in order and the first that matches
decides; a request no rule matches is routed by the policy alone. A rule can:

* pin a request to the edge (``route: edge_only``) — privacy: its text never
  reaches a cloud node nor a shared (Redis) cache. Matched by tenant, tag, or
  the built-in PII detector (``pii: true``, see ``router.pii``);
* force a tier (``route: edge`` / ``cloud``) for debugging: the answer comes
  from that tier whatever the confidence, and the cache is skipped;
* set the threshold (``min_confidence``) or a deadline (``deadline_s``) for the
  requests it matches.

The PII detector runs only when a rule that asks for it is reached, so a
config without such a rule pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from router.guard_settings import RuleSettings
from router.pii import Finding, describe, find_pii
from tidegate.chat import ChatMessage

Route = Literal["auto", "edge_only", "edge", "cloud"]


@dataclass(frozen=True)
class RuleMatch:
    """The rule that decided a request's route ("" and ``auto``: none did)."""

    name: str = ""
    route: Route = "auto"
    min_confidence: float | None = None
    deadline_s: float | None = None
    pii: str = ""  # what the detector found, by kind and count, when that mattered
    requested: bool = False  # the client forced this route (RouteRequest.route), no rule

    @property
    def pinned(self) -> bool:
        """Privacy pin: edge only, no shared cache."""
        return self.route == "edge_only"

    @property
    def forced(self) -> bool:
        """A debugging override of the tier: no cache, no confidence judgement."""
        return self.route in ("edge", "cloud")

    @property
    def why(self) -> str:
        """For escalation reasons and errors: which rule, and what it saw."""
        if not self.name:
            return ""
        if self.requested:
            return f"the requested route {self.route!r}"
        found = f" ({self.pii} found)" if self.pii else ""
        return f"rule {self.name!r}{found}"


NO_RULE = RuleMatch()


def match_rule(
    rules: Sequence[RuleSettings],
    tenant: str,
    tags: Sequence[str],
    messages: Sequence[ChatMessage],
) -> RuleMatch:
    """The first rule matching this request, or NO_RULE."""
    findings: list[Finding] | None = None  # the detector runs at most once, on demand
    tag_set = set(tags)
    for rule in rules:
        if rule.tenants and tenant not in rule.tenants:
            continue
        if rule.tags and tag_set.isdisjoint(rule.tags):
            continue
        found = ""
        if rule.pii:
            if findings is None:
                findings = find_pii(messages)
            if not findings:
                continue
            found = describe(findings)
        return RuleMatch(rule.name, rule.route, rule.min_confidence, rule.deadline_s, found)
    return NO_RULE


def requested_route(rule: RuleMatch, route: Literal["auto", "edge", "cloud"]) -> RuleMatch:
    """The tier a client forces (``RouteRequest.route``: ``edge`` or ``cloud``)
    in place of the matched rule's route, keeping the rule's threshold and
    deadline. A privacy pin wins: no client can send pinned text to the cloud."""
    if route == "auto" or rule.pinned:
        return rule
    return RuleMatch(
        name=f"requested:{route}",
        route=route,
        min_confidence=rule.min_confidence,
        deadline_s=rule.deadline_s,
        requested=True,
    )
