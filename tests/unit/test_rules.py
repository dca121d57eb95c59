"""router.rules: first match wins, per tenant, per tag, and with the PII detector."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.guard_settings import RuleSettings
from router.rules import NO_RULE, match_rule
from router.settings import RouterSettings
from tidegate.chat import ChatMessage

RULES = [
    RuleSettings(name="debug", tags=["force-cloud"], route="cloud"),
    RuleSettings(name="private", tags=["private", "secret"], route="edge_only"),
    RuleSettings(name="acme-pii", tenants=["acme"], pii=True, route="edge_only"),
    RuleSettings(name="acme", tenants=["acme"], min_confidence=0.8, deadline_s=2.0),
]


def user(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", text),)


def test_no_match_is_no_rule() -> None:
    assert match_rule(RULES, "other", [], user("hi")) == NO_RULE
    assert not NO_RULE.pinned and not NO_RULE.forced and NO_RULE.why == ""


def test_tag_match_and_first_match_wins() -> None:
    m = match_rule(RULES, "acme", ["secret"], user("mail a@example.com"))
    assert (m.name, m.route, m.pinned, m.forced) == ("private", "edge_only", True, False)
    both = match_rule(RULES, "acme", ["private", "force-cloud"], user("hi"))
    assert both.name == "debug" and both.forced  # listed first


def test_tenant_rule_with_pii_matches_only_when_the_detector_fires() -> None:
    m = match_rule(RULES, "acme", [], user("call +1 415 555 2671"))
    assert m.name == "acme-pii" and m.pinned
    assert m.why == "rule 'acme-pii' (1 phone number found)"
    plain = match_rule(RULES, "acme", [], user("What is 17 * 23?"))
    assert (plain.name, plain.route, plain.min_confidence, plain.deadline_s) == (
        "acme",
        "auto",
        0.8,
        2.0,
    )
    assert match_rule(RULES, "globex", [], user("call +1 415 555 2671")) == NO_RULE


def test_pii_anywhere_in_the_conversation() -> None:
    rules = [RuleSettings(name="pii", pii=True, route="edge_only")]
    messages = (
        ChatMessage("system", "The customer is bob@example.com"),
        ChatMessage("user", "Summarise the ticket"),
    )
    assert match_rule(rules, "", [], messages).pinned


def test_the_detector_runs_only_when_a_pii_rule_is_reached(monkeypatch) -> None:
    import router.rules

    calls = []
    monkeypatch.setattr(router.rules, "find_pii", lambda m: calls.append(1) or [])
    match_rule(RULES, "globex", ["private"], user("x"))  # matched before any pii rule
    match_rule(RULES, "globex", [], user("x"))  # the pii rule is for acme only
    assert calls == []
    match_rule(RULES, "acme", [], user("x"))
    assert calls == [1]


def test_rule_validation() -> None:
    with pytest.raises(ValidationError, match="rule 'noop' changes nothing"):
        RuleSettings(name="noop", tags=["x"])
    with pytest.raises(ValidationError, match="rule names must be unique; repeated: r"):
        RouterSettings.model_validate(
            {"rules": [{"name": "r", "route": "cloud"}, {"name": "r", "route": "edge"}]}
        )
    with pytest.raises(ValidationError, match="route"):
        RuleSettings(name="bad", route="moon")  # type: ignore[arg-type]
