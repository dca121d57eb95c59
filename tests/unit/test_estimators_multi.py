"""Multi-pass estimators (consistency, self-verification) and the backend's next-token log-probs,
over a real tiny transformers model."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
import torch

from edge_node.estimators_sampling import (
    ConsistencyEstimator,
    answer_key,
    options_in,
    same_answer,
)
from edge_node.estimators_verify import CUT, SelfVerifyEstimator, verification_messages
from tests.support.tiny_models import TINY_CONTEXT_LENGTH, tiny_backend
from tidegate.backend import ConfidenceEstimator
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.errors import InvalidArgument

REQUEST = GenerationRequest(
    (ChatMessage("user", "What is the capital of France?"),), SamplingParams(max_new_tokens=6)
)


@pytest.fixture(scope="module")
async def backend():
    b = tiny_backend()
    yield b
    await b.close()


async def test_next_token_logprobs_match_a_direct_forward_pass(backend):
    messages = (ChatMessage("user", "Is Paris the capital? Answer yes or no."),)
    got = await backend.next_token_logprobs(messages, ["Yes", "No", "yes"])
    ids = backend.encode_prompt(GenerationRequest(messages))
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for candidate, value in got.items():
        first = backend.tokenizer(candidate, add_special_tokens=False)["input_ids"][0]
        assert value == pytest.approx(float(expected[first]), abs=1e-4)
        assert value <= 0.0


async def test_next_token_logprobs_reject_an_empty_candidate(backend):
    with pytest.raises(InvalidArgument, match="no tokens"):
        await backend.next_token_logprobs((ChatMessage("user", "q"),), [""])


async def test_self_verify_reads_p_yes_against_p_no(backend):
    estimator = SelfVerifyEstimator(backend)
    assert isinstance(estimator, ConfidenceEstimator)
    generation = await backend.generate(REQUEST)
    score = await estimator.score(REQUEST, generation)
    logprobs = await backend.next_token_logprobs(
        verification_messages(REQUEST, generation.text), ["Yes", "yes", "No", "no"]
    )
    yes = math.exp(logprobs["Yes"]) + math.exp(logprobs["yes"])
    no = math.exp(logprobs["No"]) + math.exp(logprobs["no"])
    assert 0.0 < score < 1.0
    assert score == pytest.approx(yes / (yes + no))
    assert "1 extra forward pass" in estimator.extra_cost


def test_verification_prompt_holds_question_answer_and_system_prompt():
    request = GenerationRequest(
        (ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?"))
    )
    messages = verification_messages(request, " Paris ")
    assert messages[0] == ChatMessage("system", "Be brief.")
    assert "Capital of France?" in messages[-1].content
    assert "Proposed answer: Paris\n" in messages[-1].content
    assert messages[-1].role == "user"


def filling(backend, max_new_tokens: int) -> GenerationRequest:
    """The longest question whose prompt leaves exactly room for ``max_new_tokens``
    (or one token more): a request the node accepts."""
    room = TINY_CONTEXT_LENGTH - max_new_tokens
    words = 1
    while True:
        longer = (ChatMessage("user", "word " * (words + 1)),)
        if len(backend.encode_prompt(GenerationRequest(longer))) > room:
            break
        words += 1
    messages = (ChatMessage("user", "word " * words),)
    return GenerationRequest(messages, SamplingParams(max_new_tokens=max_new_tokens))


def prompt_tokens(backend, messages) -> int:
    return len(backend.encode_prompt(GenerationRequest(tuple(messages))))


async def test_self_verify_cuts_an_answer_that_overflows_the_context(backend):
    request = filling(backend, max_new_tokens=160)
    generation = await backend.generate(request)  # the request itself fits
    as_is = verification_messages(request, generation.text)
    assert prompt_tokens(backend, as_is) + 1 > TINY_CONTEXT_LENGTH  # question + answer + template

    estimator = SelfVerifyEstimator(backend)
    score = await estimator.score(request, generation)
    fitted = estimator.fitted_messages(request, generation.text)
    assert fitted is not None
    assert prompt_tokens(backend, fitted) + 1 <= TINY_CONTEXT_LENGTH
    logprobs = await backend.next_token_logprobs(fitted, ["Yes", "yes", "No", "no"])
    yes = math.exp(logprobs["Yes"]) + math.exp(logprobs["yes"])
    no = math.exp(logprobs["No"]) + math.exp(logprobs["no"])
    assert 0.0 < score < 1.0 and score == pytest.approx(yes / (yes + no))  # judged, not neutral
    answer = fitted[-1].content.split("Proposed answer: ")[1].split("\nIs the proposed")[0]
    assert answer.endswith(CUT)  # marked as cut, and its start (the claim) kept
    kept = answer.removesuffix(CUT).strip()
    assert kept and generation.text.strip().startswith(kept)


async def test_self_verify_is_neutral_when_the_question_leaves_no_room(backend, caplog):
    request = filling(backend, max_new_tokens=1)
    generation = await backend.generate(request)
    assert generation.text.strip()
    with caplog.at_level(logging.WARNING, logger="edge_node.estimators_verify"):
        assert await SelfVerifyEstimator(backend).score(request, generation) == 0.5
    assert "fills the model's context" in caplog.text


async def test_self_verify_is_neutral_where_the_backend_cannot_count_tokens(
    backend, tmp_path, caplog
):
    # The evaluation's output cache offers next_token_logprobs but no tokenizer: the
    # prompt goes as is, and the model's refusal of it must not fail the answer.
    from tidegate.evaluation.gencache import CachedBackend

    request = filling(backend, max_new_tokens=160)
    generation = await backend.generate(request)
    with caplog.at_level(logging.WARNING, logger="edge_node.estimators_verify"):
        score = await SelfVerifyEstimator(CachedBackend(backend, tmp_path)).score(
            request, generation
        )
    assert score == 0.5 and "context of 512 tokens" in caplog.text


def test_self_verify_needs_a_backend_with_next_token_logprobs():
    with pytest.raises(ValueError, match="next-token log-probs"):
        SelfVerifyEstimator(object())


def test_answer_keys_ignore_the_restated_question_and_filler():
    q = "What is the capital of Japan?"
    assert answer_key("The capital of Japan is Tokyo.", q) == answer_key("Tokyo", q)
    assert answer_key("tokyo!", q) == answer_key("It is Tokyo", q)
    assert answer_key("The capital of Japan is Kyoto.", q) != answer_key("Tokyo", q)
    comparison = "Which is larger, 51 or 76?"
    assert answer_key("76", comparison) != answer_key("51", comparison)


MC = (
    "How many homomorphisms are there of Z into Z_2?\n"
    "A. 1\nB. 2\nC. infinitely many\nD. 0\nAnswer with just the letter."
)


def test_options_are_read_from_the_question_lines():
    assert options_in(MC) == {"A": "1", "B": "2", "C": "infinitely many", "D": "0"}
    assert options_in("What is 4 + 9?") == {}
    assert options_in("Is it A. Smith?") == {}  # one line that looks like an option is none


@pytest.mark.parametrize(
    ("reply", "other", "question", "same"),
    [
        # multiple choice: the option picked, by letter or by its text
        ("B", "B. 2", MC, True),
        ("The answer is infinitely many.", "C", MC, True),
        ("B", "D", MC, False),
        ("B", "I am not sure", MC, False),
        # numbers: the one answered with, not the question's echoed
        ("4 + 9 = 13", "13", "What is 4 + 9?", True),
        ("thirteen", "13.0", "What is 4 + 9?", True),
        ("The sum of 4 and 9 is 12", "13", "What is 4 + 9?", False),
        ("76", "The larger is 76.", "Which is larger, 51 or 76?", True),
        ("76", "51", "Which is larger, 51 or 76?", False),
        ("13", "I don't know", "What is 4 + 9?", False),
        # words: the answer's words overlap by half
        ("The capital of Japan is Tokyo.", "Tokyo", "What is the capital of Japan?", True),
        ("Tokyo", "Kyoto", "What is the capital of Japan?", False),
        ("Tokyo city", "Tokyo", "What is the capital of Japan?", True),
        ("", "", "What is the capital of Japan?", False),
        # a hedge, a negation, a number that only restates the question
        ("13", "13 or 14", "What is 4 + 9?", False),
        ("Canberra", "Not Canberra", "What is the capital of Australia?", False),
        ("Canberra", "It isn't Canberra", "What is the capital of Australia?", False),
        (
            "20 September 1969 was a Saturday.",
            "September 20, 1969 was a Sunday.",
            "What day of the week is 20 September 1969?",
            False,
        ),
        ("4 + 9 = 13", "It's 13 apples", "What is 4 + 9?", True),
        # an either-or question: the answer is one of the question's own words
        ("Paris is the capital.", "Lyon is the capital.", "Is Paris or Lyon the capital?", False),
        ("Paris", "Paris is the capital.", "Is Paris or Lyon the capital?", True),
    ],
)
def test_same_answer_compares_what_the_question_asks_for(reply, other, question, same):
    assert same_answer(reply, other, question) is same
    assert same_answer(other, reply, question) is same


async def test_consistency_near_greedy_sampling_agrees(backend):
    estimator = ConsistencyEstimator(backend, samples=3, temperature=1e-4)
    assert isinstance(estimator, ConfidenceEstimator)
    assert estimator.extra_cost == "3 extra generations"
    generation = await backend.generate(REQUEST)
    assert await estimator.score(REQUEST, generation) == 1.0


async def test_consistency_hot_sampling_of_a_random_model_disagrees(backend):
    estimator = ConsistencyEstimator(backend, samples=4, temperature=2.0)
    generation = await backend.generate(REQUEST)
    first = await estimator.score(REQUEST, generation)
    assert first in (0.0, 0.25, 0.5, 0.75)  # a random model rarely repeats itself when hot
    assert await estimator.score(REQUEST, generation) == first  # seeded: reproducible


async def test_consistency_compares_against_the_given_answer(backend):
    estimator = ConsistencyEstimator(backend, samples=2, temperature=1e-4)
    generation = await backend.generate(REQUEST)
    generation.text = "something the model would never say"
    assert await estimator.score(REQUEST, generation) == 0.0


@pytest.mark.parametrize("kind", ["consistency", "self_verify"])
async def test_a_streamed_answer_can_be_scored_by_an_estimator_that_runs_the_model(backend, kind):
    # The node scores the stream's final item while the stream is paused on it: the model
    # lock must be free by then, or the estimator's own generation waits on it forever.
    estimator = (
        ConsistencyEstimator(backend, samples=2, temperature=1e-4)
        if kind == "consistency"
        else SelfVerifyEstimator(backend)
    )
    async with asyncio.timeout(60):
        async for item in backend.stream(REQUEST):
            if not isinstance(item, str):
                score = await estimator.score(REQUEST, item)
    assert 0.0 <= score <= 1.0
