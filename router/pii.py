"""A built-in detector for personal data in a conversation: e-mail addresses,
phone numbers and payment card numbers.

Policy rules use it to pin a request to the edge (``rules[].pii: true``), so
text that holds personal data never reaches a cloud node or a shared cache.

Tuned for recall over precision, because the two mistakes cost differently: a
false positive keeps an innocent request on the edge (a possibly weaker
answer); a false negative sends personal data off the device. Still, ordinary
numbers must not trip it, or every arithmetic question would be pinned:
dates, times, versions, IP addresses, decimals, prices and short numbers are
excluded (tests/unit/test_router_pii.py holds the near-misses).

Findings carry the kind and position only, never the matched text, so logging
a finding cannot leak what it found.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tidegate.chat import ChatMessage

EMAIL = "email"
PHONE = "phone"
CARD = "card"

# local@domain.tld: a dot-separated domain ending in letters (no "a@b", no "@handle").
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)

# Card numbers: 13-19 digits, in one run or in groups split by single spaces or
# dashes; confirmed by the Luhn checksum (which every issuer's number passes).
_CARD = re.compile(r"(?<![\w.,])\d(?:[ -]?\d){12,18}(?![\w.,]?\d)")

# Phone numbers: an optional +country code, an optional (area) group, then
# groups of digits split by spaces, dots or dashes; or one run of digits.
# 7 to 15 digits in all (E.164 allows at most 15).
_PHONE = re.compile(
    r"(?<![\w.,+-])"
    r"(?:\+\d{1,3}[ .-]?)?"
    r"(?:\(\d{1,5}\)[ .-]?)?"
    r"(?:\d{7,15}|\d{1,5}(?:[ .-]\d{1,5}){0,5})"
    r"(?![\w]|[.,-]?\d)"
)
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_TIME = re.compile(r"\d{1,2}[:.]\d{2}(?:[:.]\d{2})?")


@dataclass(frozen=True)
class Finding:
    kind: str  # EMAIL, PHONE or CARD
    message: int  # index of the message it was found in
    start: int  # character offsets in that message's content
    end: int


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _looks_like_phone(candidate: str) -> bool:
    digits = _digits(candidate)
    if not 7 <= len(digits) <= 15:
        return False
    if _DATE.fullmatch(candidate) or _IPV4.fullmatch(candidate) or _TIME.fullmatch(candidate):
        return False
    if candidate.startswith("+") or "(" in candidate:
        return True  # an explicit country or area code
    groups = re.split(r"[ .-]", candidate)
    if len(groups) == 1:
        # One bare run: a phone number is 10+ digits (7-9 digit runs are far more
        # often quantities, order numbers or years glued together).
        return len(digits) >= 10
    if all(sep == "." for sep in re.findall(r"[ .-]", candidate)) and len(groups) == 2:
        return False  # a decimal number such as 3.14159265
    # Grouped digits: phone numbers group in 2-5 digits; "1 000 000" style
    # thousands (groups of exactly 3 after the first) are amounts, not phones.
    if all(len(g) == 3 for g in groups[1:]) and len(groups[0]) <= 3 and " " in candidate:
        return False
    return all(len(g) >= 2 for g in groups[1:])


def _scan(text: str, message: int) -> Iterable[Finding]:
    taken: list[tuple[int, int]] = []
    for match in _EMAIL.finditer(text):
        taken.append(match.span())
        yield Finding(EMAIL, message, *match.span())
    for match in _CARD.finditer(text):
        if luhn_valid(_digits(match.group())):
            taken.append(match.span())
            yield Finding(CARD, message, *match.span())
    for match in _PHONE.finditer(text):
        start, end = match.span()
        if any(start < t_end and t_start < end for t_start, t_end in taken):
            continue  # part of an e-mail address or a card number already found
        if _looks_like_phone(match.group()):
            yield Finding(PHONE, message, start, end)


def find_pii(messages: Iterable[ChatMessage]) -> list[Finding]:
    """Every e-mail address, phone number and card number in the conversation
    (all messages: the system prompt and earlier turns too)."""
    findings: list[Finding] = []
    for index, message in enumerate(messages):
        findings.extend(_scan(message.content, index))
    return findings


def describe(findings: Iterable[Finding]) -> str:
    """ "2 e-mail addresses and 1 phone number": kinds and counts, never the text."""
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.kind] = counts.get(finding.kind, 0) + 1
    names = {EMAIL: "e-mail address", PHONE: "phone number", CARD: "card number"}
    parts = [
        f"{n} {names[kind]}{'es' if n > 1 and kind == EMAIL else 's' if n > 1 else ''}"
        for kind, n in counts.items()
    ]
    return " and ".join(parts) if parts else "nothing"
