"""router.pii: what the built-in detector must find, and the near-misses it must not."""

from __future__ import annotations

import pytest

from router.pii import CARD, EMAIL, IBAN, PHONE, describe, find_pii, iban_valid, luhn_valid
from tidegate.chat import ChatMessage


def kinds(text: str) -> list[str]:
    return sorted(f.kind for f in find_pii([ChatMessage("user", text)]))


FOUND = [
    ("Mail alice@example.com about it", [EMAIL]),
    ("reach me: Bob.Smith+news@mail.example.co.uk.", [EMAIL]),
    ("Call +1 415 555 2671 tomorrow", [PHONE]),
    ("my number is +44 20 7946 0958", [PHONE]),
    ("(415) 555-2671 is the office", [PHONE]),
    ("415-555-2671", [PHONE]),
    ("415.555.2671", [PHONE]),
    ("06 12 34 56 78 is my mobile", [PHONE]),
    ("+14155552671", [PHONE]),
    ("call 0612345678 please", [PHONE]),
    ("card 4111 1111 1111 1111 exp 12/27", [CARD]),
    ("4111-1111-1111-1111", [CARD]),
    ("pay with 5500005555555559", [CARD]),
    ("amex 378282246310005", [CARD]),
    ("a@example.org and +33 6 12 34 56 78", [EMAIL, PHONE]),
    # long subscriber groups (UK, German numbers)
    ("UK mobile: 07700 900123", [PHONE]),
    ("call +44 7700 900123", [PHONE]),
    ("Berlin office +49 30 12345678", [PHONE]),
    ("Festnetz 030 12345678", [PHONE]),
    # a card followed by its CVV or expiry, or split by pasted separators
    ("card 4111 1111 1111 1111 123 please", [CARD]),
    ("card 4111111111111111 12/26 thanks", [CARD]),
    ("card 4111\u00a01111\u00a01111\u00a01111", [CARD]),
    ("card 4111\u20131111\u20131111\u20131111", [CARD]),
    ("card 4111.1111.1111.1111", [CARD]),
    ("No.4111111111111111", [CARD]),
    ("call +1\u00a0415\u00a0555\u00a02671", [PHONE]),
    # bank accounts, and addresses in any script
    ("IBAN DE89 3704 0044 0532 0130 00 please", [IBAN]),
    ("to GB82WEST12345698765432", [IBAN]),
    ("write to jörg.müller@example.de", [EMAIL]),
]

# Near-misses: numbers and at-signs that are not personal data.
NOT_FOUND = [
    "What is 17 multiplied by 23?",
    "What is 1234 + 5678?",
    "The year 2024 had 366 days.",
    "Meet on 2024-01-15 at 10:30.",
    "Born 12/25/1990, moved 03.04.2005",
    "Upgrade from version 1.2.3 to 10.20.30",
    "The server is at 192.168.10.12 on port 8080",
    "pi is 3.14159265358979",
    "It costs $1,000,000 or 1 000 000 euros",
    "Order #1234567 shipped",
    "ping @alice on chat",
    "a @ b is not an address, nor is x@y",
    "email me at alice at example dot com",
    "4111 1111 1111 1112 fails the checksum",
    "ISBN 978-3-16-148410-0",
    "Coordinates 48.8566, 2.3522",
    "The ratio was 16:9 at 1920x1080",
    "Call me at noon",
    "room 12-34",
    "between 100 and 200",
    "GB82WEST12345698765433 fails the IBAN check",
    "pi is 3.4111111111111111",
]


@pytest.mark.parametrize("text,expected", FOUND)
def test_finds_personal_data(text: str, expected: list[str]) -> None:
    assert kinds(text) == sorted(expected)


@pytest.mark.parametrize("text", NOT_FOUND)
def test_near_misses_are_not_personal_data(text: str) -> None:
    assert kinds(text) == []


def test_scans_every_message_and_reports_where() -> None:
    messages = [
        ChatMessage("system", "Reply to carol@example.net"),
        ChatMessage("user", "What is 2 + 2?"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", "thanks"),
    ]
    [finding] = find_pii(messages)
    assert (finding.kind, finding.message) == (EMAIL, 0)
    assert messages[0].content[finding.start : finding.end] == "carol@example.net"


def test_description_names_kinds_and_counts_never_the_text() -> None:
    findings = find_pii([ChatMessage("user", "a@example.com b@example.com +1 415 555 2671")])
    text = describe(findings)
    assert text == "2 e-mail addresses and 1 phone number"
    assert "example" not in text
    assert describe([]) == "nothing"


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_iban_check() -> None:
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_valid("GB82WEST12345698765432")
    assert not iban_valid("GB82WEST12345698765433")
