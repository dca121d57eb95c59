"""bench/fit_data.py: its rows leave out and add the items they name, and a row whose
items teach the combiner something reads better on held-out items than one without."""

from __future__ import annotations

import random

import pytest

from edge_node.combiner import features
from tests.support.scripts import load_script
from tidegate.backend import Generation
from tidegate.chat import FinishReason


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/fit_data.py", "fit_data")


def _items(n: int, seed: int, split: str, category: str, signal: float) -> list[dict]:
    """Records whose token signals are noise and whose prompt state says, with strength
    ``signal``, whether the edge (dimension 0) and the cloud (dimension 1) are right."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        edge_ok, cloud_ok = rng.random() < 0.35, rng.random() < 0.6
        lps = [-rng.random() * 2 for _ in range(4)]
        g = Generation("x", [1, 2, 3, 4], lps, [-x for x in lps], FinishReason.STOP, 3, "m")
        state = [rng.gauss(0, 1) for _ in range(6)]
        state[0] += signal if edge_ok else -signal
        state[1] += signal if cloud_ok else -signal
        records.append({"id": f"{split}-{category}-{i}", "split": split, "category": category,
                        "features": features(g), "prompt_state": state,
                        "edge_correct": edge_ok, "cloud_correct": cloud_ok})  # fmt: skip
    return records


def test_the_rows_leave_out_and_add_what_they_name(bench):
    fit = _items(40, 1, "fit", "country_capital", 1.0) + _items(20, 2, "fit", "arithmetic", 1.0)
    extra = _items(10, 3, "fit", "dates", 1.0) + _items(6, 4, "fit", "mmlu", 1.0)
    rows = bench.variants(fit, [("more", extra)], [0.5], repeats=3)
    names = [name for name, _ in rows]
    assert names == [
        "fitting set (shipped), 60",
        "random 50% of it, 30",
        "half of countries and elements left out, 40",
        "half of generated and MMLU left out, 50",
        "+ more, 16",
        "+ more: dates, 10",
        "+ more: mmlu, 6",
    ]
    draws = dict(rows)
    assert [len(d) for d in draws.values()] == [1, 3, 3, 3, 1, 1, 1]
    ids = {r["id"] for r in fit}
    halves = draws["random 50% of it, 30"]
    assert all(len(d) == 30 and {r["id"] for r in d} <= ids for d in halves)
    assert len({frozenset(r["id"] for r in d) for d in halves}) == 3  # different draws
    for d in draws["half of countries and elements left out, 40"]:
        assert sum(r["category"] == "country_capital" for r in d) == 20
        assert sum(r["category"] == "arithmetic" for r in d) == 20
    assert [r["category"] for r in draws["+ more: mmlu, 6"][0]][-6:] == ["mmlu"] * 6
    assert len(draws["+ more: mmlu, 6"][0]) == 66


def test_items_that_teach_something_read_better_held_out(bench):
    """The fitting set's items carry no signal the dev set's do; extra items carry it:
    adding them raises AUROC on calib and test, and gain routes on it; noise added
    does not."""
    fit = _items(300, 1, "fit", "country_capital", 0.0)
    dev = _items(200, 2, "calib", "country_capital", 2.0) + _items(
        200, 3, "test", "country_capital", 2.0
    )
    strong = _items(300, 4, "fit", "country_border", 2.0)
    noise = _items(300, 5, "fit", "arithmetic", 0.0)
    rows = {
        r["fitted on"]: r
        for r in bench.compare(fit, dev, [("strong", strong), ("noise", noise)], [0.5], repeats=2)
    }
    shipped, better = rows["fitting set (shipped), 300"], rows["+ strong, 300"]
    assert shipped["calib"] < 0.7 and shipped["test"] < 0.7
    assert better["calib"] > 0.95 and better["test"] > 0.95
    assert rows["+ noise, 300"]["test"] < 0.7
    assert rows["random 50% of it, 150"]["draws"] == 2
    # gain routes better on it, at about the quarter escalated the calib threshold aims at
    assert 0.15 < better["escalated"] < 0.35
    assert better["of_cloud"] > max(shipped["of_cloud"], rows["+ noise, 300"]["of_cloud"]) + 0.1
    # an edge-only dev set has no routing to show
    no_cloud = [r | {"cloud_correct": None} for r in dev]
    row = bench.compare(strong, no_cloud, [], [], repeats=1)[0]
    assert row["escalated"] is None and row["of_cloud"] is None and row["test"] > 0.95
