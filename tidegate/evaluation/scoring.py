"""Is a model's reply a correct answer to a labelled item?

Small models rarely answer with just the answer: they restate the question
("The capital of Japan is Tokyo."), show their working ("4 + 9 = 13"), or hedge
("Paris or Lyon"). The scorer finds *the* answer in the reply and compares it
with the accepted ones, in three modes chosen by the item:

**Normalisation** (every mode): Unicode accents dropped (NFKD), lower case,
thousands separators dropped (``14,047`` → ``14047``), ``.5`` → ``0.5``,
ordinal suffixes dropped (``42nd`` → ``42``), punctuation → spaces, the articles
*a*, *an*, *the* dropped, numbers in words → digits (``twenty-one`` → ``21``,
``one hundred and one`` → ``101``; ``tidegate.spoken_numbers``), ``minus 3`` /
``negative three`` → ``-3`` (not ``5 minus 3``), whitespace collapsed.

1. **Multiple choice** (the item has ``choices``): the first option letter that
   stands alone (``B``, ``B.``, ``(B)``, ``Answer: B``, ``A is correct``; not the
   article in ``A valid argument``) is the choice. Without a
   letter, the reply must contain exactly one option's text (longest wins when
   one option's text contains another's). A letter followed by ``or``/``/``/``,``
   and another letter (``A or C``) is a hedge: wrong.
2. **Numeric** (every accepted answer is a number): the numbers of the reply
   once what it copies from the question is dropped (runs of two or more words,
   sentence by sentence: ``Which is larger, 40 or 19? The answer is 19`` → 19;
   a bare echo ``40 or 19`` answers nothing), minus those that merely restate
   the question's numbers (``What is 4 + 9?`` → ``The sum of 4 and 9 is 13``);
   the first one left is the answer (when every number restates the question,
   the first number: ``76 is larger than 51``). After an ``=`` sign, the first
   number after the last ``=``. Compared as numbers (``7.10`` = ``7.1``). Two
   different answers joined by ``or`` (``12 or 13``, ``12 or maybe 13``) → a hedge.
3. **Text**: phrases of two or more words copied from the question are removed
   (so ``The capital of Djibouti is Ali Sabieh`` does not match ``Djibouti``),
   then an accepted answer must appear as whole words. An answer the question
   itself names (``Monaco``, for the capital of Monaco; not ``Africa`` in
   "South Africa") counts only when the reply is that answer or names it more
   often than the question does (``I don't know Monaco's capital`` is no answer).
   Element symbols and codes (two letters, or all capitals: ``He``, ``In``,
   ``XAF``, ``ALL``) must match case-sensitively, since ``he``, ``in`` and
   ``all`` are also English words. If the matched answer sits in a list of
   alternatives (``Americas, Africa, and Asia``; ``Paris or Lyon``; ``Sydney and
   Canberra``; a bulleted list: items about as short as the answer), every
   alternative must be an accepted answer.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from tidegate.evaluation.dataset import EvalItem
from tidegate.spoken_numbers import words_to_digits

_ARTICLES = {"a", "an", "the"}
_SIGNS = {"minus", "negative"}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LETTER = r"(?<![A-Za-z0-9'’])([A-Z])(?![A-Za-z0-9'’])"


def strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_words(text: str, keep_case: bool = False) -> list[str]:
    """The normalised words of ``text`` (see the module docstring)."""
    text = _THOUSANDS.sub("", strip_accents(text))
    if not keep_case:
        text = text.lower()
    text = re.sub(r"(?<![\w.])\.(?=\d)", "0.", text)  # ".5" → "0.5"
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", text, flags=re.IGNORECASE)  # "42nd" → "42"
    # Keep a decimal point between digits and a minus sign before a number.
    text = re.sub(r"(?<=\d)\.(?=\d)", "\u2024", text)  # one-dot leader: a placeholder
    text = re.sub(r"(?<![\w\u2024])-(?=\d)", "\u2212", text)  # minus sign placeholder
    text = re.sub(r"[^\w\u2024\u2212]+", " ", text).replace("\u2024", ".").replace("\u2212", "-")
    words = [w for w in text.split() if w.lower() not in _ARTICLES]
    return _signed(words_to_digits(words)) if not keep_case else words


def _signed(words: list[str]) -> list[str]:
    """ "minus 3" / "negative 3" → "-3", unless a number stands before it ("5 minus 3")."""
    out: list[str] = []
    for word in words:
        sign = out[-1] if out else ""
        before = out[-2] if len(out) > 1 else ""
        if sign in _SIGNS and _NUMBER.fullmatch(word) and not _NUMBER.fullmatch(before):
            out[-1] = word[1:] if word.startswith("-") else f"-{word}"
        else:
            out.append(word)
    return out


def normalize(text: str) -> str:
    return " ".join(normalize_words(text))


def _as_number(text: str) -> float | None:
    words = normalize_words(text)
    if len(words) != 1:
        return None
    try:
        return float(words[0])
    except ValueError:
        return None


def _contains(haystack: list[str], needle: list[str]) -> list[int]:
    """Start positions where ``needle`` occurs as whole words in ``haystack``."""
    n = len(needle)
    if n == 0:
        return []
    return [i for i in range(len(haystack) - n + 1) if haystack[i : i + n] == needle]


# ---- multiple choice ------------------------------------------------------------------------


def choose_option(reply: str, choices: dict[str, str]) -> str | None:
    """The option letter the reply picks; None for no choice or a hedge."""
    letters = "".join(re.escape(k) for k in choices if len(k) == 1)
    if letters:
        pattern = _LETTER.replace("[A-Z]", f"[{letters}]")
        # "A" followed by a lower-case word is the article ("A valid argument …"),
        # unless the word says something about A ("A is correct") or joins another
        # option to it ("A or B": a hedge, below).
        article = r"A (?!(?:is|was|seems|would|because|or|and|nor)\b)[a-z]"
        matches = (
            m for m in re.finditer(pattern, reply) if not re.match(article, reply[m.start() :])
        )
        first = next(matches, None)
        if first is not None:
            rest = reply[first.end() :]
            if re.match(
                rf"\s*(?:,|/|\bor\b|\band\b)\s*(?:option\s+)?[{letters}](?![A-Za-z])", rest
            ):
                return None  # "A or C", "A, B": a hedge
            return first.group(1)
    reply_words = normalize_words(reply)
    found = {
        key: len(words)
        for key, text in choices.items()
        if (words := normalize_words(text)) and _contains(reply_words, words)
    }
    if not found:
        return None
    longest = max(found.values())
    winners = [k for k, n in found.items() if n == longest]
    # Shorter matches inside the longest one are parts of it ("2" in "2 and 3").
    others = [k for k, n in found.items() if n < longest]
    return (
        winners[0]
        if len(winners) == 1 and not _independent(others, winners[0], choices, reply_words)
        else None
    )


def _independent(
    others: Sequence[str], winner: str, choices: dict[str, str], reply_words: list[str]
) -> bool:
    """Whether a shorter matched option also appears outside the winner's text."""
    win = normalize_words(choices[winner])
    spans = {p + j for p in _contains(reply_words, win) for j in range(len(win))}
    for key in others:
        words = normalize_words(choices[key])
        for start in _contains(reply_words, words):
            if not all(start + j in spans for j in range(len(words))):
                return True
    return False


def correct_choice(item: EvalItem) -> str | None:
    """The correct option letter: an accepted answer that is a letter, or whose text matches."""
    assert item.choices is not None
    for answer in item.answers:
        if answer in item.choices:
            return answer
    for answer in item.answers:
        for key, text in item.choices.items():
            if normalize(text) == normalize(answer):
                return key
    return None


# ---- numbers --------------------------------------------------------------------------------


def answer_number(reply: str, question: str) -> float | None:
    """The number the reply answers with (see the module docstring)."""
    if "=" in reply:
        after = " ".join(normalize_words(reply.rsplit("=", 1)[1]))
        numbers = _NUMBER.findall(after)
        if numbers:
            return float(numbers[0])
    # Copied runs of the question go first ("Which is larger, 40 or 19? The answer is
    # 19"): a reply that only echoes the question's numbers answers nothing.
    # (Sentence by sentence: "Which is larger? 40" restates, then answers.)
    asked_words = normalize_words(question)
    sentences = re.split(r"[?!:;\n]|\.(?!\d)", reply)
    text = " ".join(
        w for part in sentences for w in strip_restatement(normalize_words(part), asked_words)
    )
    numbers = [float(n) for n in _NUMBER.findall(text)]
    if not numbers:
        return None
    asked = {float(n) for n in _NUMBER.findall(" ".join(asked_words))}
    fresh = [n for n in numbers if n not in asked]
    return (fresh or numbers)[0]


def numeric_hedge(reply: str, question: str) -> bool:
    """Two different fresh numbers joined by "or" / "/" ("12 or 13")."""
    text = " ".join(normalize_words(reply)).replace("/", " or ")
    asked = {float(n) for n in _NUMBER.findall(" ".join(normalize_words(question)))}
    number = r"(-?\d+(?:\.\d+)?)"
    for a, b in re.findall(rf"{number}\s+or(?:\s+[a-z]+){{0,2}}\s+{number}", text):
        if float(a) != float(b) and not {float(a), float(b)} <= asked:
            return True
    return False


# ---- text -----------------------------------------------------------------------------------


def strip_restatement(reply_words: list[str], question_words: list[str]) -> list[str]:
    """Drop every run of ≥ 2 consecutive reply words that also occurs in the question."""
    keep = [True] * len(reply_words)
    i = 0
    while i < len(reply_words):
        best = 0
        for n in range(len(reply_words) - i, 1, -1):
            if _contains(question_words, reply_words[i : i + n]):
                best = n
                break
        if best:
            for j in range(i, i + best):
                keep[j] = False
            i += best
        else:
            i += 1
    return [w for w, k in zip(reply_words, keep, strict=True) if k]


def _case_sensitive(answer: str) -> bool:
    """Element symbols (``He``, ``In``) and codes (``XAF``, ``ALL``) are also English words
    in lower case; a capitalised word (``Tin``, ``Yen``) is matched in any case."""
    return any(c.isupper() for c in answer) and (len(answer) <= 2 or answer.isupper())


_LIST_SPLIT = re.compile(r",|;|/|\bor\b|\band\b|\n")


_BULLET = re.compile(r"\s*(?:[-*•]|\d+[.)])\s+(.+)")


def _sentences(reply: str) -> list[tuple[str, bool]]:
    """Each sentence of the reply, and a bulleted list's items as one (``True``)."""
    lines = reply.splitlines() or [reply]
    bullets = [m.group(1) for line in lines if (m := _BULLET.fullmatch(line))]
    listed = [("; ".join(bullets), True)] if len(bullets) >= 2 else []
    return listed + [(s, False) for line in lines for s in re.split(r"(?<=[.!?])\s+", line)]


def _list_alternatives(reply: str, answer: str) -> list[str] | None:
    """The other short items when ``answer`` sits in a list of alternatives, else None."""
    for sentence, bulleted in _sentences(reply):
        parts = [p.strip(" .:!?*-\"'()") for p in _LIST_SPLIT.split(sentence)]
        parts = [p for p in parts if p]
        if len(parts) < 2:
            continue
        norm_parts = [normalize_words(p) for p in parts]
        target = normalize_words(answer)
        hit = [k for k, words in enumerate(norm_parts) if _contains(words, target)]
        if not hit:
            continue
        # The first or last item of a list is often glued to the sentence around
        # it ("located in the Americas, Africa, and Asia"): keep just the answer.
        words = norm_parts[hit[0]]
        if words[-len(target) :] == target or words[: len(target)] == target:
            norm_parts[hit[0]] = target
        # A list is of short items, about as long as the answer ("Paris", "North
        # America"); longer parts are clauses ("Hungary to the east").
        longest = max(2, len(target) + 1)
        short = [k for k, words in enumerate(norm_parts) if 0 < len(words) <= longest]
        # Two names joined by "and", each short as written ("Sydney and Canberra";
        # not "Bosnia and Herzegovina's capital is Sarajevo").
        pair = (
            len(parts) == 2
            and re.search(r"\band\b", sentence) is not None
            and all(len(normalize_words(p)) <= longest for p in parts)
        )
        if (
            hit[0] in short
            and len(short) >= 2
            and (bulleted or pair or re.search(r"\bor\b|/", sentence) or len(short) >= 3)
        ):
            return [parts[k] for k in short if k != hit[0]]
    return None


def _named_in_question(question: str, answer: str) -> int:
    """How often the question names the answer itself: *Monaco* in "the capital of
    Monaco", not *Africa* in "South Africa" or *Bissau* in "Guinea-Bissau"."""
    text = strip_accents(question)
    pattern = rf"(?<!\w){re.escape(strip_accents(answer))}(?!\w)"
    count = 0
    for m in re.finditer(pattern, text, flags=re.IGNORECASE):
        longer_name = re.search(r"[A-Z][\w'’]*[ -]$", text[: m.start()]) or re.match(
            r"[ -][A-Z]", text[m.end() :]
        )
        count += not longer_name
    return count


def text_match(reply: str, question: str, answers: Sequence[str]) -> str | None:
    """The accepted answer the reply gives, or None."""
    question_words = normalize_words(question)
    all_words = normalize_words(reply)
    reply_words = strip_restatement(all_words, question_words)
    raw_words = normalize_words(reply, keep_case=True)
    for answer in answers:
        target = normalize_words(answer)
        if _case_sensitive(answer):
            if _contains(raw_words, normalize_words(answer, keep_case=True)):
                return answer
        elif named := _named_in_question(question, answer):
            # The capital of Monaco is Monaco: a bare mention may be the question's
            # own ("I don't know Monaco's capital"); the reply must say it once more.
            if all_words == target or len(_contains(all_words, target)) > named:
                return answer
        elif _contains(reply_words, target):
            return answer
    return None


def is_correct(item: EvalItem, reply: str) -> bool:
    """Whether ``reply`` answers ``item`` correctly (see the module docstring)."""
    if not reply.strip():
        return False
    if item.choices:
        chosen = choose_option(reply, item.choices)
        return chosen is not None and chosen == correct_choice(item)
    numbers = [_as_number(a) for a in item.answers]
    if all(n is not None for n in numbers):
        if numeric_hedge(reply, item.question):
            return False
        got = answer_number(reply, item.question)
        return got is not None and any(abs(got - n) < 1e-9 for n in numbers if n is not None)
    matched = text_match(reply, item.question, item.answers)
    if matched is None:
        return False
    alternatives = _list_alternatives(reply, matched)
    if alternatives is None:
        return True
    return all(text_match(alt, "", item.answers) is not None for alt in alternatives)
