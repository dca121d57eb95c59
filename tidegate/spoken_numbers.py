"""Numbers spelled in words: "twenty-one" → 21, "one hundred and five" → 105.

Shared by the scorer (a reply "one hundred one" answers 101) and the semantic
cache's guards ("two thousand three hundred" asks about 2300). Words come in
lower case and already split ("twenty-one" → "twenty", "one"); the scorer has
dropped articles, so "a hundred" arrives as "hundred" and reads as 100.

Only well-formed numbers are read, so that words which merely stand side by
side stay apart: "one two three" is 1, 2, 3 and "one and two" is 1, "and", 2
("and" joins only after "hundred" or a scale: "one hundred and five").
"""

from __future__ import annotations

from collections.abc import Sequence

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
UNITS = {w: i for i, w in enumerate(_UNITS)}
TENS = {w: 20 + 10 * i for i, w in enumerate(_TENS)}
SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
NUMBER_WORDS = frozenset(UNITS) | frozenset(TENS) | frozenset(SCALES) | {"hundred"}


def _word(words: Sequence[str], i: int) -> str:
    return words[i] if i < len(words) else ""


def _below_hundred(words: Sequence[str], i: int) -> tuple[int, int] | None:
    """ "seven", "seventeen", "seventy", "seventy seven"."""
    word = _word(words, i)
    if word in TENS:
        unit = UNITS.get(_word(words, i + 1), 0)
        return (TENS[word] + unit, i + 2) if 1 <= unit <= 9 else (TENS[word], i + 1)
    if word in UNITS:
        return UNITS[word], i + 1
    return None


def _below_thousand(words: Sequence[str], i: int) -> tuple[int, int] | None:
    """Up to "nine hundred and ninety nine" ("nineteen hundred" is 1900)."""
    small = _below_hundred(words, i)
    value, end = small if small else (None, i)
    if _word(words, end) != "hundred" or value == 0:
        return small
    value, end = (value or 1) * 100, end + 1
    after_and = end + 1 if _word(words, end) == "and" else end
    rest = _below_hundred(words, after_and)
    # "one hundred two hundred" is 100 and 200: a hundreds figure starts a new number.
    if rest and rest[0] > 0 and _word(words, rest[1]) != "hundred":
        value, end = value + rest[0], rest[1]
    return value, end


def read_number(words: Sequence[str], start: int) -> tuple[int, int] | None:
    """The number spelled from ``words[start]`` on and the index after it, or None."""
    total, end, last_scale = 0, start, None
    while True:
        part = _below_thousand(words, end)
        value, after = part if part else (None, end)
        scale = SCALES.get(_word(words, after))
        if last_scale is not None and scale is not None and scale >= last_scale:
            return total, end  # "one thousand two thousand": the next number starts here
        if scale is None or value == 0:
            if value is None:  # nothing after "and": leave the "and" unread
                return (total, end) if last_scale is not None else None
            return total + value, after
        total, last_scale = total + (value or 1) * scale, scale
        end = after + 1
        if _word(words, end) == "and" and _below_thousand(words, end + 1):
            end += 1


def words_to_digits(words: Sequence[str]) -> list[str]:
    """Each spelled number replaced by its digits: ["twenty", "one", "cats"] → ["21", "cats"]."""
    out: list[str] = []
    i = 0
    while i < len(words):
        read = read_number(words, i) if words[i] in NUMBER_WORDS else None
        if read is None:
            out.append(words[i])
            i += 1
        else:
            out.append(str(read[0]))
            i = read[1]
    return out
