"""The evaluation's output cache: keyed by model identity + conversation + sampling, resumable."""

from __future__ import annotations

import json

import pytest

from tests.support.tiny_models import tiny_backend
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.evaluation.gencache import CachedBackend, OutputCache, model_slug, request_key


def request(text: str = "What is 2 + 2?", **sampling) -> GenerationRequest:
    return GenerationRequest(
        (ChatMessage("user", text),), SamplingParams(max_new_tokens=5, **sampling), "id-1"
    )


def test_keys_cover_model_conversation_and_sampling_but_not_the_request_id():
    base = request_key("m/int8", "generate", request())
    assert base == request_key(
        "m/int8", "generate", GenerationRequest(request().messages, request().sampling, "other")
    )
    assert base != request_key("m/int4", "generate", request())
    assert base != request_key("m/int8", "generate", request("What is 3 + 3?"))
    assert base != request_key("m/int8", "generate", request(temperature=0.7, seed=1))
    assert base != request_key("m/int8", "next_token_logprobs", request())


def test_model_slug_is_file_name_safe():
    assert model_slug("smollm2-135m@b179c9523d0e/int8") == "smollm2-135m@b179c9523d0e-int8"
    assert "/" not in model_slug("org/model name@rev/bf16")


async def test_a_cached_generation_comes_back_identical_without_the_model(tmp_path):
    backend = tiny_backend()
    try:
        cached = CachedBackend(backend, tmp_path)
        first = await cached.generate(request())
        again = await cached.generate(request())
        assert (cached.cache.misses, cached.cache.hits) == (1, 1)
        assert again == first
        # A new process (a resumed run) reads it from disk.
        reopened = CachedBackend(backend, tmp_path)
        assert await reopened.generate(request()) == first
        assert reopened.cache.hits == 1 and reopened.cache.misses == 0
        scores = await reopened.next_token_logprobs(request().messages, ["Yes", "No"])
        assert await reopened.next_token_logprobs(request().messages, ["Yes", "No"]) == scores
        assert len(reopened.cache) == 2
    finally:
        await backend.close()


async def test_an_entry_from_before_the_answer_state_is_answered_again(tmp_path):
    backend = tiny_backend()
    try:
        cached = CachedBackend(backend, tmp_path)
        first = await cached.generate(request())
        assert first.answer_state is not None
        lines = cached.cache.path.read_text().splitlines()
        old = json.loads(lines[0])
        del old["value"]["answer_state"]  # as an older tidegate wrote it
        cached.cache.path.write_text(json.dumps(old) + "\n")
        reopened = CachedBackend(backend, tmp_path)
        again = await reopened.generate(request())
        assert again.answer_state == first.answer_state and again.text == first.text
        # answered by the model (not read with a missing state), and cached anew
        assert len(reopened.cache.path.read_text().splitlines()) == 2
        assert await CachedBackend(backend, tmp_path).generate(request()) == again
    finally:
        await backend.close()


def test_a_torn_last_line_is_skipped(tmp_path, caplog):
    cache = OutputCache(tmp_path, "m")
    cache.put("k1", {"text": "a"})
    with cache.path.open("a") as f:
        f.write('{"key": "k2", "value": {"te')  # killed mid-write
    reopened = OutputCache(tmp_path, "m")
    assert reopened.get("k1") == {"text": "a"} and reopened.get("k2") is None
    assert "unreadable cache line" in caplog.text
    reopened.put("k3", [1, 2])
    lines = cache.path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"key": "k3", "value": [1, 2]}


@pytest.mark.parametrize("model", ["a/int8", "b/int8"])
def test_each_model_has_its_own_file(tmp_path, model):
    OutputCache(tmp_path, model).put("k", 1)
    assert (tmp_path / f"{model_slug(model)}.jsonl").exists()
