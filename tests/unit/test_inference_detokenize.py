"""Incremental detokenization and stop-string hold-back."""

from __future__ import annotations

from tests.support.tiny_models import tiny_tokenizer
from tidegate.inference.detokenize import IncrementalDecoder, StopTextBuffer


def test_multibyte_characters_are_never_split():
    tokenizer = tiny_tokenizer()
    text = "東京 🙂 naïve café"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the rare characters are split into byte tokens
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped():
    tokenizer = tiny_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    ids += tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "Hello"


def test_stop_prefix_is_held_back_then_released():
    buffer = StopTextBuffer(["world"])
    assert buffer.push("Hello wor") == "Hello "
    assert buffer.push("k") == "work"
    assert buffer.push(" wo") == " "
    assert buffer.finish() == "wo"
    assert buffer.text == "Hello work wo" and not buffer.stopped


def test_stop_string_cuts_and_is_not_emitted():
    buffer = StopTextBuffer(["\n\nUser:", "###"])
    out = buffer.push("Answer: 4\n")
    out += buffer.push("\nUs")
    out += buffer.push("er: more")
    assert buffer.stopped
    assert out == buffer.text == "Answer: 4"
    assert buffer.push("ignored") == "" and buffer.finish() == ""


def test_earliest_stop_string_wins():
    buffer = StopTextBuffer(["abcd", "c"])
    assert buffer.push("xxabc") == "xxab"
    assert buffer.stopped and buffer.text == "xxab"


def test_no_stops_releases_everything():
    buffer = StopTextBuffer([])
    assert buffer.push("abc") == "abc"
    assert buffer.finish() == ""
