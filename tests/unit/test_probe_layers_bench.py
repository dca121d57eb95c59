"""bench/probe_layers.py: the residual stream it reads is each layer's output, its
re-read of a cached answer is what the decode loop saw, and its scan finds the layer
that carries the signal."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
import torch

from edge_node.combiner import features
from tests.support.scripts import load_script
from tests.support.tiny_models import TINY_CONTEXT_LENGTH, tiny_model_and_tokenizer
from tidegate.backend import Generation
from tidegate.chat import FinishReason
from tidegate.evaluation.dataset import load_items
from tidegate.evaluation.gencache import CachedBackend, OutputCache
from tidegate.evaluation.runner import DEFAULT_MAX_NEW_TOKENS, item_request
from tidegate.inference.static_decoder import StaticDecoder
from tidegate.inference.transformers_backend import TransformersBackend


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/probe_layers.py", "probe_layers")


def test_the_residual_stream_is_each_layers_output(bench):
    """As transformers' own forward computes it (its last entry has the final norm)."""
    model, _ = tiny_model_and_tokenizer()
    ids = list(range(5, 25))
    stream = bench.residual_stream(StaticDecoder(model, max_context=TINY_CONTEXT_LENGTH), ids)
    with torch.inference_mode():
        expected = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert stream.shape == (2, len(ids), 64)
        torch.testing.assert_close(stream[0], expected[1][0])
        torch.testing.assert_close(model.model.norm(stream[1]), expected[2][0])


def test_a_cached_answer_is_re_read_as_the_decode_loop_read_it(bench, tmp_path):
    """collect() feeds the prompt and the answer's fed tokens from the eval's cache; the
    last layer's state at the answer's end, normed, is the answer state the loop recorded."""
    model, tokenizer = tiny_model_and_tokenizer()
    backend = TransformersBackend(
        model, tokenizer, model_id="tiny@t", context_length=TINY_CONTEXT_LENGTH,
        quantization="none", static_decoder=True,
    )  # fmt: skip
    data = tmp_path / "data.jsonl"
    rows = [{"id": f"q{i}", "question": q, "answers": ["x"], "split": "fit"}
            for i, q in enumerate(["What is the capital of France?", "Hello, world!"])]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cached = CachedBackend(backend, tmp_path / "cache")
    answers = {}
    for item in load_items(data):
        request = item_request(item, DEFAULT_MAX_NEW_TOKENS)
        answers[item.id] = asyncio.run(cached.generate(request))
    records = [{"id": r["id"]} for r in rows]
    states = bench.collect(
        backend, records, data, [0, 1], OutputCache(tmp_path / "cache", "tiny@t/none")
    )
    for record in records:
        generation = answers[record["id"]]
        reading = states[record["id"]]
        assert {k: v.shape for k, v in reading.items()} == dict.fromkeys(bench.READINGS, (2, 64))
        with torch.inference_mode():
            normed = model.model.norm(torch.from_numpy(reading["answer"][1])).numpy()
        np.testing.assert_allclose(normed, generation.answer_state, atol=1e-4)
        assert not np.allclose(reading["mean"][1], reading["answer"][1])
    with pytest.raises(SystemExit, match="no cached answer"):
        bench.collect(
            backend, records, data, [0, 1], OutputCache(tmp_path / "elsewhere", "tiny@t/none")
        )


def _synthetic(n: int, seed: int, split: str) -> tuple[list[dict], dict[str, dict]]:
    """Records whose token signals and recorded states are noise, and readings of two
    layers where only layer 1's ``mean`` says whether the edge (dimension 0) and the
    cloud (dimension 1) are right."""
    rng = random.Random(seed)
    records, readings = [], {}
    for i in range(n):
        edge_ok, cloud_ok = rng.random() < 0.35, rng.random() < 0.6
        lps = [-rng.random() * 2 for _ in range(4)]
        g = Generation("x", [1, 2, 3, 4], lps, [-x for x in lps], FinishReason.STOP, 3, "m")
        noise = [[rng.gauss(0, 1) for _ in range(6)] for _ in range(2)]
        records.append({"id": f"{split}{i}", "split": split, "features": features(g),
                        "prompt_state": noise[0], "answer_state": noise[1],
                        "edge_correct": edge_ok, "cloud_correct": cloud_ok})  # fmt: skip
        reading = {k: np.array([[rng.gauss(0, 1) for _ in range(6)] for _ in range(2)])
                   for k in ("prompt", "answer", "mean")}  # fmt: skip
        reading["mean"][1, 0] += 2.0 if edge_ok else -2.0
        reading["mean"][1, 1] += 2.0 if cloud_ok else -2.0
        readings[records[-1]["id"]] = reading
    return records, readings


def test_the_scan_finds_the_layer_that_knows(bench):
    fit, fit_states = _synthetic(300, 1, "fit")
    calib, calib_states = _synthetic(200, 2, "calib")
    test, test_states = _synthetic(200, 3, "test")
    rows = bench.scan(fit, calib + test, fit_states, calib_states | test_states, [7, 9])
    assert [r["input"] for r in rows][:2] == ["decode loop's states (shipped)", "layer  7 prompt"]
    assert len(rows) == 1 + 2 * 3
    by_input = {r["input"]: r for r in rows}
    knows = by_input.pop("layer  9 mean")
    assert knows["calib"] > 0.95 and knows["test"] > 0.95
    assert all(r["test"] < 0.7 for r in by_input.values())
    # gain routes on it: about a quarter escalated (the calib threshold), near the cloud's
    # accuracy (escalating what the cloud gets right and the edge wrong); on noise, not
    assert 0.15 < knows["escalated"] < 0.35 and knows["of_cloud"] > 0.85
    assert all(r["of_cloud"] < 0.75 for r in by_input.values())
    # an edge-only run has no routing to show
    no_cloud = [r | {"cloud_correct": None} for r in calib + test]
    row = bench.scan(fit, no_cloud, fit_states, calib_states | test_states, [7, 9])[-1]
    assert row["escalated"] is None and row["of_cloud"] is None and row["test"] > 0.95
