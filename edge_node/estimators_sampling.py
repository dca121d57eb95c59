"""Sampling-based consistency: does the model give the same answer when it samples?

k extra answers are sampled through the same backend at a temperature (seeds
0…k−1, so a score is reproducible and cacheable); the score is the fraction
whose *answer* agrees with the greedy answer's. Answers are compared as keys:
the reply's normalised words (``tidegate.evaluation.scoring``: case,
punctuation, articles, number words) minus words the question already holds
and filler, so "The capital of Japan is Tokyo." and "Tokyo" agree while "…is
Kyoto." does not. Cost: k extra generations per answer (``extra_cost``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tidegate.backend import Generation, ModelBackend
from tidegate.chat import GenerationRequest
from tidegate.evaluation.scoring import normalize_words

FILLER = frozenset(
    "is are was were be it its this that answer answers correct of in on to and so "
    "called known as which what i my final".split()
)


def answer_key(reply: str, question: str) -> frozenset[str]:
    """The words that carry the reply's answer (see the module docstring)."""
    asked = set(normalize_words(question))
    words = frozenset(w for w in normalize_words(reply) if w not in asked and w not in FILLER)
    # A reply made only of question words ("76" for "51 or 76?") is its own key.
    return words or frozenset(normalize_words(reply))


class ConsistencyEstimator:
    """Agreement of k sampled answers with the greedy one, in [0, 1]."""

    name = "consistency"

    def __init__(self, backend: ModelBackend, samples: int = 5, temperature: float = 0.7) -> None:
        if samples < 1:
            raise ValueError("consistency needs at least one sample")
        self.backend = backend
        self.samples = samples
        self.temperature = temperature
        self.extra_cost = f"{samples} extra generations"

    async def score(self, request: GenerationRequest, generation: Generation) -> float:
        if not generation.logprobs:
            return 0.0
        question = request.messages[-1].content
        reference = answer_key(generation.text, question)
        requests = [
            replace(
                request,
                sampling=replace(request.sampling, temperature=self.temperature, seed=seed),
                request_id=f"{request.request_id}/consistency-{seed}",
            )
            for seed in range(self.samples)
        ]
        # The backend serialises generations anyway; gather keeps the code flat.
        sampled = await asyncio.gather(*(self.backend.generate(r) for r in requests))
        agree = sum(1 for s in sampled if answer_key(s.text, question) == reference)
        return agree / self.samples
