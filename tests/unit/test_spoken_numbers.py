"""Numbers spelled in words, shared by the scorer and the semantic cache's guards."""

from __future__ import annotations

import pytest

from tidegate.spoken_numbers import read_number, words_to_digits


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("zero", "0"),
        ("seventeen", "17"),
        ("ninety nine", "99"),
        ("one hundred one", "101"),
        ("one hundred and one", "101"),
        ("hundred", "100"),  # "a hundred", its article dropped
        ("nineteen hundred eighty four", "1984"),
        ("two thousand and five", "2005"),
        ("thousand and one nights", "1001 nights"),
        ("one million two hundred thousand", "1200000"),
        ("one two three", "1 2 3"),  # side by side: three numbers
        ("one and two", "1 and 2"),  # "and" joins only after hundred or a scale
        ("two thousand and", "2000 and"),  # nothing after "and": it stays
        ("thousand thousand", "1000 1000"),  # scales only descend
        ("twenty one cats", "21 cats"),
        ("zero thousand", "0 1000"),
        # a list of round numbers: each hundreds figure or repeated scale starts anew
        ("one hundred two hundred three hundred", "100 200 300"),
        ("one thousand two thousand three thousand", "1000 2000 3000"),
        ("two thousand five hundred", "2500"),
        ("one million two million", "1000000 2000000"),
    ],
)
def test_words_to_digits(text, digits):
    assert " ".join(words_to_digits(text.split())) == digits


def test_read_number_says_where_the_number_ends():
    assert read_number("a b forty two c".split(), 2) == (42, 4)
    assert read_number("a b".split(), 0) is None
