"""The answer scorer: normalisation, the three modes, and the traps small models set."""

from __future__ import annotations

import pytest

from tidegate.evaluation.dataset import EvalItem
from tidegate.evaluation.scoring import choose_option, is_correct, normalize, normalize_words

MMLU = {"A": "1", "B": "2", "C": "infinitely many", "D": "0"}


def item(question: str, *answers: str, choices: dict[str, str] | None = None) -> EvalItem:
    return EvalItem("x", question, answers, choices)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Bogotá!", "bogota"),
        ("An apple, a pear", "apple pear"),
        ("twenty-one", "21"),
        ("Eight", "8"),
        ("14,047", "14047"),
        ("7.86", "7.86"),
        ("It is -5.", "it is -5"),
        ("3022 - 908", "3022 908"),
        ("one hundred one", "101"),
        ("A hundred and five", "105"),
        ("two thousand and twenty-six", "2026"),
        ("one and two", "1 and 2"),  # side by side, not one number
        ("It is .5", "it is 0.5"),
        ("the 42nd", "42"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


ARITH = "What is 4 + 9? Answer with just the number."


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("13", True),
        ("thirteen", True),
        ("The sum of 4 and 9 is 13.", True),  # question numbers restated first
        ("4 + 9 = 13", True),
        ("4 + 9 = 12", False),
        ("12 or 13", False),  # a hedge
        ("The answer is 12.", False),
        ("", False),
    ],
)
def test_numeric(reply, right):
    assert is_correct(item(ARITH, "13"), reply) is right


def test_numbers_spelled_in_words_and_bare_decimals_are_read():
    assert is_correct(item("What is 56 + 45?", "101"), "The answer is one hundred and one.")
    assert not is_correct(item("What is 56 + 45?", "101"), "The answer is one hundred.")
    assert is_correct(item("What is 1 / 2?", "0.5"), "It is .5")
    assert not is_correct(item("What is 10 / 2?", "5"), "It is .5")


def test_numeric_comparisons_take_the_first_number():
    q = "Which is larger, 19 or 40? Answer with just the number."
    assert is_correct(item(q, "40"), "40 is larger than 19")
    assert not is_correct(item(q, "40"), "19 is a larger number than 40")
    assert is_correct(item("Which is larger, 7.86 or 7.1?", "7.86"), "7.860")


def test_numeric_thousands_and_aliases():
    q = "What is 6399 + 364? Answer with just the number."
    assert is_correct(item(q, "6763", "6,763"), "The answer is 6,763.")
    assert not is_correct(item(q, "6763", "6,763"), "6399 + 364 = 6,663")


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("Tokyo", True),
        ("The capital of Japan is Tokyo.", True),
        ("tokyo.", True),
        ("The capital of Japan is Kyoto.", False),
        ("Tokyo or Kyoto", False),
        ("Kyoto, Osaka, Tokyo", False),
        ("Tokyoite", False),  # whole words only
    ],
)
def test_text(reply, right):
    assert is_correct(item("What is the capital of Japan?", "Tokyo"), reply) is right


def test_text_does_not_count_the_restated_question():
    q = "What is the capital of Djibouti? Answer with just the city name."
    assert not is_correct(item(q, "Djibouti"), "The capital of Djibouti is Ali Sabieh.")
    assert is_correct(item(q, "Djibouti"), "The capital of Djibouti is Djibouti.")
    assert is_correct(item(q, "Djibouti"), "Djibouti")


def test_text_lists_of_alternatives():
    continent = item("On which continent is Panama?", "North America", "Americas")
    assert not is_correct(continent, "It is located in the Americas, Africa, and Asia.")
    language = item("Name one official language of the DR Congo.", "French", "Lingala")
    assert is_correct(language, "French and Lingala")  # every item is accepted
    assert not is_correct(language, "French or English")
    assert is_correct(item("q", "Sarajevo"), "Bosnia and Herzegovina's capital is Sarajevo.")
    europe = item("On which continent is Luxembourg?", "Europe")
    clauses = "It is in Central Europe, bordering Croatia to the north, and Austria to the south."
    assert is_correct(europe, clauses)  # clauses, not a list of alternatives


def test_short_capitalised_answers_match_case_sensitively():
    indium = item("What is the chemical symbol of indium?", "In")
    assert is_correct(indium, "The chemical symbol of indium is In.")
    assert not is_correct(indium, "It is found in nature.")
    assert is_correct(item("What is the chemical symbol of helium?", "He"), "He")


@pytest.mark.parametrize(
    ("reply", "choice"),
    [
        ("B", "B"),
        ("B. 2", "B"),
        ("(B)", "B"),
        ("Answer: B", "B"),
        ("The answer is 2", "B"),  # the option text, no letter
        ("infinitely many", "C"),
        ("A. 1", "A"),  # the letter decides, even with the wrong option's text
        ("A valid argument is B", "B"),  # "A valid": the article
        ("A", "A"),
        ("B or C", None),
        ("A or B", None),  # not the article "A": a hedge
        ("A and C", None),
        ("A, B", None),
        ("I don't know", None),
    ],
)
def test_choose_option(reply, choice):
    assert choose_option(reply, MMLU) == choice


def test_multiple_choice_correctness():
    mmlu = item("How many homomorphisms …?", "B", "2", choices=MMLU)
    assert is_correct(mmlu, "B. 2")
    assert is_correct(mmlu, "The answer is 2.")
    assert not is_correct(mmlu, "A. 1")
    assert not is_correct(mmlu, "B or C")
    assert not is_correct(mmlu, "A or B")


def test_minus_and_negative_sign_a_number_they_stand_before():
    assert normalize_words("Minus three.") == ["-3"]
    assert normalize_words("negative 3") == ["-3"]
    assert normalize_words("minus -3") == ["3"]
    assert normalize_words("5 minus 3 is 2") == ["5", "minus", "3", "is", "2"]
    assert normalize_words("a negative number") == ["negative", "number"]
    assert is_correct(item("What is 2 - 5?", "-3"), "Minus three.")
    assert is_correct(item("What is 2 - 5?", "-3"), "Negative three")
    assert not is_correct(item("What is 5 - 2?", "3"), "Minus three.")
    assert is_correct(item("What is 5 minus 2?", "3"), "5 minus 2 is 3")


def test_numeric_echoes_of_the_question_answer_nothing():
    q = "Which is larger, 40 or 19? Answer with just the number."
    assert not is_correct(item(q, "40"), "40 or 19")  # the question's pair, copied
    assert not is_correct(item(q, "40"), "Which is larger, 40 or 19? The answer is 19")
    assert is_correct(item(q, "19"), "Which is larger, 40 or 19? The answer is 19")
    assert is_correct(item(q, "40"), "Which is larger? 40")
    assert not is_correct(item(ARITH, "13"), "13 or maybe 12")  # a hedge with a filler


def test_an_answer_the_question_names_must_be_said_again():
    monaco = item("What is the capital of Monaco? Answer with just the city name.", "Monaco")
    assert not is_correct(monaco, "I don't know Monaco's capital.")
    assert is_correct(monaco, "The capital of Monaco is Monaco.")
    assert is_correct(monaco, "Monaco.")
    australia = item("On which continent is Australia?", "Oceania", "Australia")
    assert not is_correct(australia, "Australia is a continent in the Southern Hemisphere.")
    assert is_correct(australia, "Australia is in Oceania.")
    # Part of a longer name in the question: a bare mention is the answer.
    africa = item(
        "On which continent is South Africa? Answer with just the continent name.", "Africa"
    )
    assert is_correct(africa, "It is in Africa.")
    assert not is_correct(africa, "South Africa is at the southern tip of the continent.")


def test_lists_of_candidates_in_bullets_or_a_pair():
    canberra = item("What is the capital of Australia?", "Canberra")
    assert not is_correct(canberra, "- Sydney\n- Melbourne\n- Canberra")
    assert not is_correct(canberra, "1. Sydney\n2. Canberra")
    assert not is_correct(canberra, "Sydney and Canberra")
    assert is_correct(canberra, "Canberra, Australia")  # the city and where it is
    assert is_correct(canberra, "- Canberra")


def test_capitalised_words_match_in_any_case_symbols_and_codes_do_not():
    assert is_correct(item("Which element has the symbol Sn?", "Tin"), "The element is tin.")
    assert is_correct(item("What is the currency of Japan?", "Yen", "JPY"), "the yen")
    albania = item("What is the currency code of Albania?", "ALL")
    assert not is_correct(albania, "It is used by all Albanians.")


def test_a_letter_that_a_verb_follows_is_the_choice():
    assert choose_option("A is correct.", MMLU) == "A"
    assert choose_option("A valid argument is B", MMLU) == "B"
