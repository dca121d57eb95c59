"""Guards for semantic cache matches: what must be equal between two questions
before one's cached answer may answer the other (``router.semantic_cache``).

Embeddings rate a negated question, a changed number or a swapped name as
near-duplicates (cosine 0.93–0.99 with all-MiniLM-L6-v2), so the similarity
alone cannot be trusted with them. ``features`` extracts, cheaply and without
a model, what those changes alter; ``guard_refusal`` compares two questions:

* negation markers (not, no, never, without, n't, …), as a multiset;
* numbers, digits and number words in one spelling ("17" = "seventeen",
  "1,000" = "1000", ".5" = "0.5"; ordinals too), in order: "10 divided by 2"
  is not "2 divided by 10" (so "2 + 3" and "3 + 2" are refused too: a missed
  paraphrase, which precision allows);
* operator symbols (``+ - * / = < > ^ % & |``, ``!=``: "3 + 5" is not "3 * 5",
  though its words and numbers are), in order: "3 + 5 * 2" is not "3 * 5 + 2";
* the question words that change what is asked (who/whom, whose, when, where,
  why, how), as a multiset; "what" and "which" are left out, as wording;
* the connectives "and" and "or" (not the "and" inside "one hundred and
  five"), as a multiset;
* named entities: the words capitalised (after the first word) in either
  question, in the order they appear in each;
* direction and comparison words (before/after, more/less, from, …);
* content words — everything but function words, politeness fillers,
  possessives and plural endings — with the direction words, in order.
  Letters and digits written together are one content word ("CO2", "IPv4",
  "log2", "python3.11"), not a word and a number. Words in any script count
  (the function-word lists are English: in other languages more words are
  compared, which errs towards a miss).

A comma (or other clause punctuation) ends a spoken number: "twenty, one and
five" is three numbers, "twenty-one and five" two.

Precision over recall: a missed paraphrase costs a model call, a false match
serves another question's answer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from tidegate.spoken_numbers import NUMBER_WORDS, words_to_digits

# A hyphen between letters joins a word ("well-known"); anywhere else it is minus.
_OPERATOR = re.compile(r"!=|[+*/×÷=<>^%&|]|(?<![^\W\d_])-(?![^\W\d_])")
_TOKEN = re.compile(
    # a number: "3", "-5", "3.14", "1,000", "21st", ".5", "-.5"
    r"(?<![\w.])-?(?:\d+(?:[.,]\d+)*(?:st|nd|rd|th)?|\.\d+)"
    # a word, in any script ([^\W\d_]: a letter; "Петрову" and "Иванову" are words,
    # or every guard sees nothing in a Cyrillic or Chinese question); digits after its
    # first letter belong to it ("co2", "h2o", "ipv4", "log2", "python3.11"): reading
    # them as a number would compare "CO2" as "CO"
    r"|[^\W\d_]+(?:\d[^\W_]*(?:\.\d+)*)?(?:['’][^\W\d_]+)*"
    # punctuation that ends a spoken number ("twenty, one" is 20 and 1)
    r"|[,;:.!?]"
)
_SEPARATORS = frozenset(",;:.!?")

NEGATIONS = {
    "not": "not",
    "no": "no",
    "never": "never",
    "none": "none",
    "nobody": "nobody",
    "nothing": "nothing",
    "nowhere": "nowhere",
    "neither": "neither",
    "nor": "nor",
    "without": "without",
    "cannot": "not",
    "non": "not",
    "except": "except",
    "excluding": "except",
    # typed without the apostrophe
    "dont": "not",
    "doesnt": "not",
    "didnt": "not",
    "isnt": "not",
    "arent": "not",
    "wasnt": "not",
    "werent": "not",
    "cant": "not",
    "wont": "not",
    "shouldnt": "not",
    "couldnt": "not",
    "wouldnt": "not",
    "havent": "not",
    "hasnt": "not",
}

# Function words whose change flips a question but which embeddings barely see.
POLARITY = frozenset(
    "before after above below over under more less most least fewer greater than "
    "from into onto up down out off against between until since during inside outside "
    "within beyond".split()
)

# Question words that change what is asked ("When was X born?" is not "Where
# was X born?"). "what" and "which" are not among them: "What countries use
# the euro?" asks what "Which countries use the euro?" does.
QUESTION_WORDS = {
    "who": "who",
    "whom": "who",
    "whose": "whose",
    "when": "when",
    "where": "where",
    "why": "why",
    "how": "how",
}

# "True and False" is not "True or False".
CONNECTIVES = frozenset({"and", "or"})

ORDINALS = {
    w: f"{i + 1}th"
    for i, w in enumerate(
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
    )
}

# Words that carry no content of their own: question words, auxiliaries,
# pronouns, articles, most prepositions, politeness and request fillers.
STOPWORDS = frozenset(
    """
    a an the this that these those there here it its it's i me my mine we us our you your
    he him his she her they them their what which who whom whose when where why how
    is are was were be been being am do does did done doing have has had having
    can could would should will shall may might must ought
    of in on at to for by with about as and or but if so then also
    please kindly pls tell give show explain describe let know want like need help
    just actually really exactly
    some any way ways thing things using use via
    hi hello hey thanks thank
    """.split()
)


@dataclass(frozen=True)
class QuestionFeatures:
    """What the guards compare between two questions."""

    negations: Counter[str]
    numbers: tuple[str, ...]  # in order: "10 / 2" is not "2 / 10"
    operators: tuple[str, ...]  # in order: "3 + 5 * 2" is not "3 * 5 + 2"
    questions: Counter[str]  # who, whose, when, where, why, how
    connectives: Counter[str]  # and, or
    polarity: Counter[str]
    capitalised: frozenset[str]  # content words capitalised after the first word
    content: tuple[str, ...]  # content and direction words, in order


def _stem(word: str) -> str:
    """Crude: possessive and plural removed ("France's" → "france", "lists" → "list")."""
    word = re.sub(r"['’]s$", "", word)
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _number(token: str) -> str:
    """A digit token in one spelling: "1,000" → "1000", "21st" → "21th", ".5" → "0.5"."""
    match = re.fullmatch(r"(-?[\d.,]+?)(st|nd|rd|th)?", token)
    assert match is not None
    digits, suffix = match.groups()
    if "," in digits and re.fullmatch(r"-?\d{1,3}(,\d{3})+", digits):
        digits = digits.replace(",", "")
    digits = re.sub(r"^(-?)\.", r"\g<1>0.", digits)  # ".5" → "0.5", "-.5" → "-0.5"
    return digits + ("th" if suffix else "")


def features(text: str) -> QuestionFeatures:
    negations: Counter[str] = Counter()
    numbers: list[str] = []
    questions: Counter[str] = Counter()
    connectives: Counter[str] = Counter()
    polarity: Counter[str] = Counter()
    capitalised: set[str] = set()
    content: list[str] = []
    spoken: list[str] = []  # number words being read ("twenty three" → 23)

    def end_number() -> None:
        for word in words_to_digits(spoken):
            if word == "and":  # no number took it ("one and two"): a connective
                connectives["and"] += 1
            else:
                numbers.append(word)
        spoken.clear()

    for index, raw in enumerate(_TOKEN.findall(text)):
        token = raw.replace("’", "'")
        lower = token.lower()
        if lower in _SEPARATORS:
            end_number()
            continue
        if lower[0].isdigit() or lower[0] in "-.":
            end_number()
            numbers.append(_number(lower))
            continue
        if lower in NUMBER_WORDS or (lower == "and" and spoken):
            spoken.append(lower)  # "one hundred and five"
            continue
        end_number()
        if lower in ORDINALS:
            numbers.append(ORDINALS[lower])
            continue
        if lower in CONNECTIVES:
            connectives[lower] += 1
            continue
        if lower.endswith("n't"):
            negations["not"] += 1
            lower = {"ca": "can", "wo": "will", "sha": "shall"}.get(lower[:-3], lower[:-3])
        if lower in NEGATIONS:
            negations[NEGATIONS[lower]] += 1
            continue
        if lower in POLARITY:
            polarity[lower] += 1
            content.append(lower)  # where it stands matters: "from Paris to London"
            continue
        stem = _stem(lower)
        if stem in QUESTION_WORDS:  # "how", "How's", "whom"
            questions[QUESTION_WORDS[stem]] += 1
            continue
        if stem in STOPWORDS or lower in STOPWORDS:
            continue
        if index > 0 and token[0].isupper():
            capitalised.add(stem)
        content.append(stem)
    end_number()
    return QuestionFeatures(
        negations=negations,
        numbers=tuple(numbers),
        operators=tuple(_OPERATOR.findall(text)),
        questions=questions,
        connectives=connectives,
        polarity=polarity,
        capitalised=frozenset(capitalised),
        content=tuple(content),
    )


def _entities(question: QuestionFeatures, names: frozenset[str]) -> list[str]:
    return [word for word in question.content if word in names]


def guard_refusal(a: QuestionFeatures, b: QuestionFeatures) -> str | None:
    """Why question ``b`` must not be answered with ``a``'s answer (None: it may)."""
    if a.negations != b.negations:
        return "negation differs"
    if a.numbers != b.numbers:
        return "numbers differ"
    if a.operators != b.operators:
        return "operators differ"
    if a.questions != b.questions:
        return "question words differ"
    if a.connectives != b.connectives:
        return "connectives differ"
    # Names are recognised by their capital in either question, so a question
    # typed in lower case still matches its capitalised twin.
    names = a.capitalised | b.capitalised
    if names and _entities(a, names) != _entities(b, names):
        return "named entities differ"
    if a.polarity != b.polarity:
        return "direction or comparison words differ"
    if a.content != b.content:
        return (
            "content words differ"
            if sorted(a.content) != sorted(b.content)
            else "word order differs"
        )
    return None
