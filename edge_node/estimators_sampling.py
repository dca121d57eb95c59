"""Sampling-based consistency: does the model give the same answer when it samples?

k extra answers are sampled through the same backend at a temperature (seeds
0…k−1, so a score is reproducible and cacheable); the score is the fraction
that give the greedy answer's *answer* (``same_answer``), compared by what the
question asks for:

- a multiple-choice question (option lines ``A. …``): the option each reply
  picks (``tidegate.evaluation.scoring.choose_option``: the letter, or the
  option's text), so "B" and "B. 2" agree;
- two replies that both hold a number: the numbers they answer with
  (``answer_number``: echoes of the question's numbers don't count), so
  "4 + 9 = 13" and "thirteen" agree, "12" and "13" do not; a hedge ("13 or
  14") agrees with nothing, and when the number only restates the question the
  words decide ("20 September 1969 was a Saturday" / "…a Sunday");
- anything else (and a number in one reply only): the words that carry the
  answer (``answer_key``: the reply's normalised words minus the question's and
  filler) overlap by half or more (Jaccard), so "The capital of Japan is Tokyo."
  and "Tokyo" agree, "…is Kyoto." does not, and "Tokyo, Japan's capital city"
  still does; a negated reply ("Not Canberra") never agrees with a plain one.

On the dev set's ``calib`` split this reads the edge's answers better than
comparing the answer words exactly (AUROC 0.692 against 0.684, within category
0.691 against 0.654; ``python bench/consistency_agreement.py``, README,
Confidence).

Cost: k extra generations per answer (``extra_cost``).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

from tidegate.backend import Generation, ModelBackend
from tidegate.chat import GenerationRequest
from tidegate.evaluation.scoring import (
    answer_number,
    choose_option,
    normalize_words,
    numeric_hedge,
    strip_restatement,
)

FILLER = frozenset(
    "is are was were be it its this that answer answers correct of in on to and so "
    "called known as which what i my final".split()
)
_OPTION = re.compile(r"(?m)^\s*\(?([A-Z])[.)]\s+(\S.*?)\s*$")
SAME_WORDS = 0.5  # the key-word overlap (Jaccard) at which two replies give one answer
# "t": the tail of "isn't", "can't" (normalised words split at the apostrophe)
NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "none", "t"})


def options_in(question: str) -> dict[str, str]:
    """The question's options by letter ("A. 1" lines); {} for fewer than two."""
    options = {m.group(1): m.group(2) for m in _OPTION.finditer(question)}
    return options if len(options) >= 2 else {}


def answer_key(reply: str, question: str) -> frozenset[str]:
    """The words that carry the reply's answer (see the module docstring)."""
    asked = normalize_words(question)
    said = normalize_words(reply)
    words = frozenset(w for w in said if w not in asked and w not in FILLER)
    if words:
        return words
    # A reply made only of question words ("76" for "51 or 76?", "Paris is the capital
    # of France." for "Is Paris or Lyon the capital of France?"): what is left once the
    # runs it copies from the question are gone, else the whole reply.
    picked = frozenset(w for w in strip_restatement(said, asked) if w not in FILLER)
    return picked or frozenset(said)


def same_answer(reply: str, other: str, question: str) -> bool:
    """Whether two replies to ``question`` give the same answer (the module docstring)."""
    options = options_in(question)
    if options:
        picked = choose_option(reply, options), choose_option(other, options)
        if picked != (None, None):
            return picked[0] == picked[1]
    numbers = answer_number(reply, question), answer_number(other, question)
    if None not in numbers:
        if numeric_hedge(reply, question) or numeric_hedge(other, question):
            return False  # "13 or 14" gives no one answer
        # The same number, unless it only restates the question while the words say
        # otherwise ("20 September 1969 was a Saturday" / "…a Sunday").
        return numbers[0] == numbers[1] and not _words_differ(reply, other, question)
    if _negated(reply) != _negated(other):
        return False  # "Canberra" / "Not Canberra"
    return same_words(reply, other, question)


def _negated(reply: str) -> bool:
    return not NEGATIONS.isdisjoint(normalize_words(reply))


def _words_differ(reply: str, other: str, question: str) -> bool:
    """Both replies say something beyond the question and their numbers, and not the same."""
    a, b = (_new_words(r, question) for r in (reply, other))
    return bool(a) and bool(b) and len(a & b) < SAME_WORDS * len(a | b)


def _new_words(reply: str, question: str) -> frozenset[str]:
    asked = set(normalize_words(question)) | FILLER
    return frozenset(w for w in normalize_words(reply) if w not in asked and not _is_number(w))


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def same_words(reply: str, other: str, question: str) -> bool:
    """Whether the words that carry two replies' answers overlap by ``SAME_WORDS``."""
    a, b = answer_key(reply, question), answer_key(other, question)
    return bool(a | b) and len(a & b) >= SAME_WORDS * len(a | b)


class ConsistencyEstimator:
    """The fraction of k sampled answers that give the greedy answer, in [0, 1]."""

    name = "consistency"

    def __init__(self, backend: ModelBackend, samples: int = 5, temperature: float = 0.7) -> None:
        if samples < 1:
            raise ValueError("consistency needs at least one sample")
        self.backend = backend
        self.samples = samples
        self.temperature = temperature
        self.extra_cost = f"{samples} extra generations"

    async def sample(self, request: GenerationRequest) -> list[Generation]:
        """The k sampled answers to ``request`` (seeds 0…k−1)."""
        requests = [
            replace(
                request,
                sampling=replace(request.sampling, temperature=self.temperature, seed=seed),
                request_id=f"{request.request_id}/consistency-{seed}",
            )
            for seed in range(self.samples)
        ]
        # The backend serialises generations anyway; gather keeps the code flat.
        return list(await asyncio.gather(*(self.backend.generate(r) for r in requests)))

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        question = request.messages[-1].content
        sampled = await self.sample(request)
        agree = sum(1 for s in sampled if same_answer(generation.text, s.text, question))
        return agree / self.samples
