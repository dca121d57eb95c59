"""A built-in detector for personal data in a conversation: e-mail addresses,
phone numbers, payment card numbers and IBANs (bank accounts).

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
IBAN = "iban"

# local@domain.tld: a dot-separated domain ending in letters (no "a@b", no "@handle");
# letters of any script ("jörg.müller@example.de", internationalised domains).
_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.%+-]{1,64}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+"
    r"[^\W\d_]{2,24}(?![\w-])"
)

# Card numbers: 13-19 digits, in one run or in groups split by single spaces,
# dashes or dots; confirmed by the Luhn checksum (which every issuer's number
# passes), on the whole run or the groups it starts with ("4111 1111 1111 1111
# 123": the card, then its CVV). Not after a decimal point ("3.4111…").
_CARD = re.compile(r"(?<![\w,])(?<!\d\.)\d(?:[ .-]?\d){12,22}(?![\w.,]?\d)")

# Phone numbers: an optional +country code, an optional (area) group, then
# groups of digits split by spaces, dots or dashes; or one run of digits.
# 7 to 15 digits in all (E.164 allows at most 15); a subscriber group can be
# long ("+49 30 12345678", "07700 900123").
_PHONE = re.compile(
    r"(?<![\w.,+-])"
    r"(?:\+\d{1,3}[ .-]?)?"
    r"(?:\(\d{1,5}\)[ .-]?)?"
    r"(?:\d{7,15}|\d{1,5}(?:[ .-]\d{1,8}){0,5})"
    r"(?![\w]|[.,-]?\d)"
)

# IBANs: a country code, two check digits, then 11-30 letters and digits, in one
# run or in groups of four; confirmed by the ISO 13616 mod-97 check.
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![\w])")

# Separators people paste: no-break and thin spaces, and dashes other than "-".
# Each maps to one character, so offsets into the text stay right.
_SEPARATORS = str.maketrans(
    {"\u00a0": " ", "\u202f": " ", "\u2009": " ", "\u2007": " ",
     "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-"}
)  # fmt: skip
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_TIME = re.compile(r"\d{1,2}[:.]\d{2}(?:[:.]\d{2})?")


@dataclass(frozen=True)
class Finding:
    kind: str  # EMAIL, PHONE, CARD or IBAN
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


def iban_valid(text: str) -> bool:
    """The ISO 13616 check every IBAN satisfies: the number read as base 36, with its
    first four characters moved to the end, is 1 modulo 97."""
    compact = text.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _card_in(candidate: str) -> int | None:
    """The length of the card number ``candidate`` starts with (the whole of it, or
    its leading groups: a CVV or an expiry may follow), or None."""
    ends = [m.start() for m in re.finditer(r"[ .-]", candidate)] + [len(candidate)]
    for end in reversed(ends):
        digits = _digits(candidate[:end])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return end
    return None


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
    text = text.translate(_SEPARATORS)
    taken: list[tuple[int, int]] = []
    for match in _EMAIL.finditer(text):
        taken.append(match.span())
        yield Finding(EMAIL, message, *match.span())
    for match in _IBAN.finditer(text):
        if iban_valid(match.group()):
            taken.append(match.span())
            yield Finding(IBAN, message, *match.span())
    for match in _CARD.finditer(text):
        length = _card_in(match.group())
        if length is not None:
            span = (match.start(), match.start() + length)
            taken.append(span)
            yield Finding(CARD, message, *span)
    for match in _PHONE.finditer(text):
        start, end = match.span()
        if any(start < t_end and t_start < end for t_start, t_end in taken):
            continue  # part of an e-mail address or a card number already found
        if _looks_like_phone(match.group()):
            yield Finding(PHONE, message, start, end)


def find_pii(messages: Iterable[ChatMessage]) -> list[Finding]:
    """Every e-mail address, phone number, card number and IBAN in the conversation
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
    names = {EMAIL: "e-mail address", PHONE: "phone number", CARD: "card number", IBAN: "IBAN"}
    parts = [
        f"{n} {names[kind]}{'es' if n > 1 and kind == EMAIL else 's' if n > 1 else ''}"
        for kind, n in counts.items()
    ]
    return " and ".join(parts) if parts else "nothing"
