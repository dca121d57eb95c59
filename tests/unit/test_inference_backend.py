"""TransformersBackend on a tiny random Llama: decoding, signals, streaming, concurrency."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from tests.support.tiny_models import tiny_backend
from tidegate.backend import Generation, ModelBackend
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.errors import InvalidArgument


def ask(text: str = "Hello!", **sampling) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 24)
    return GenerationRequest((ChatMessage("user", text),), SamplingParams(**sampling))


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


async def collect(backend, request) -> tuple[list[str], Generation]:
    items = [item async for item in backend.stream(request)]
    *deltas, final = items
    assert isinstance(final, Generation)
    assert all(isinstance(d, str) and d for d in deltas)
    return deltas, final


def test_is_a_model_backend(backend):
    assert isinstance(backend, ModelBackend)
    info = backend.info
    assert (info.model, info.context_length) == ("tiny-llama-s0@tiny/none", 512)
    assert (info.quantization, info.backend) == ("none", "transformers")


async def test_generate_and_stream_agree(backend):
    request = ask()
    generation = await backend.generate(request)
    deltas, streamed = await collect(backend, request)
    assert "".join(deltas) == streamed.text == generation.text
    assert streamed.token_ids == generation.token_ids
    assert generation.finish_reason is FinishReason.LENGTH
    assert generation.completion_tokens == 24
    assert len(generation.logprobs) == len(generation.entropies) == len(generation.token_texts)
    assert generation.model == backend.info.model
    assert generation.generation_ms > 0 and generation.queue_ms >= 0


async def test_logprobs_and_entropies_match_a_full_forward_pass(backend):
    request = ask(max_new_tokens=16)
    generation = await backend.generate(request)
    prompt = backend.encode_prompt(request)
    ids = torch.tensor([prompt + generation.token_ids])
    with torch.inference_mode():
        logits = backend.model(input_ids=ids).logits[0].float()  # [seq, vocab]
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]  # [new, vocab]
    chosen = logprobs.gather(1, torch.tensor(generation.token_ids)[:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert generation.logprobs == pytest.approx(chosen.tolist(), abs=1e-4)
    assert generation.entropies == pytest.approx(entropy.tolist(), abs=1e-4)
    assert all(h >= 0.0 for h in generation.entropies)
    assert all(lp <= 0.0 for lp in generation.logprobs)
    # greedy: every chosen token is the argmax
    assert generation.token_ids == logprobs.argmax(-1).tolist()


async def test_max_new_tokens_gives_length(backend):
    generation = await backend.generate(ask(max_new_tokens=3))
    assert generation.completion_tokens == 3
    assert generation.finish_reason is FinishReason.LENGTH
    assert not generation.finish_reason.is_complete


async def test_stop_string_cuts_before_it(backend):
    full = await backend.generate(ask(max_new_tokens=40))
    # a stop string from the middle of the greedy answer (clean characters only)
    start = next(i for i in range(4, len(full.text) - 3) if "\ufffd" not in full.text[i : i + 3])
    stop = full.text[start : start + 3]
    expected = full.text[: full.text.find(stop)]
    deltas, generation = await collect(backend, ask(max_new_tokens=40, stop=(stop, "never!")))
    assert generation.finish_reason is FinishReason.STOP_SEQUENCE
    assert generation.text == expected == "".join(deltas)
    assert stop not in "".join(deltas)
    assert generation.completion_tokens < full.completion_tokens


async def test_eos_token_gives_stop_and_no_text():
    backend = tiny_backend()
    first = (await backend.generate(ask(max_new_tokens=1))).token_ids[0]
    backend.eos_ids = frozenset({first})  # the first greedy token now ends the turn
    generation = await backend.generate(ask())
    assert generation.finish_reason is FinishReason.STOP
    assert generation.token_ids == [first]  # the eos token is counted and scored …
    assert generation.text == ""  # … but is not part of the text


async def test_sampling_is_reproducible_with_a_seed(backend):
    a = await backend.generate(ask(temperature=1.0, seed=42))
    b = await backend.generate(ask(temperature=1.0, seed=42))
    c = await backend.generate(ask(temperature=1.0, seed=43))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


async def test_tiny_top_p_is_greedy(backend):
    greedy = await backend.generate(ask())
    nucleus = await backend.generate(ask(temperature=1.5, top_p=1e-6, seed=1))
    assert nucleus.token_ids == greedy.token_ids
    # reported log-probs are the model's own (temperature 1), whatever the sampling
    assert nucleus.logprobs == pytest.approx(greedy.logprobs, abs=1e-5)


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1e-40, 1.0), (1e-45, 0.5), (1.0, 1e-46), (1.0, 1e-300)]
)
async def test_an_allowed_but_vanishing_temperature_or_top_p_is_greedy(backend, temperature, top_p):
    # float32 turns these into inf or 0: sampling must still pick the top token
    greedy = await backend.generate(ask())
    sampled = await backend.generate(ask(temperature=temperature, top_p=top_p, seed=1))
    assert sampled.token_ids == greedy.token_ids


async def test_context_overflow_is_invalid_argument(backend):
    with pytest.raises(InvalidArgument, match=r"context of 512 tokens.*at most \d+ new tokens"):
        await backend.generate(ask(max_new_tokens=500))
    with pytest.raises(InvalidArgument, match="shorten the conversation"):
        await backend.generate(ask("word " * 600))
    with pytest.raises(InvalidArgument):  # streaming raises the same
        async for _ in backend.stream(ask(max_new_tokens=500)):
            pass


async def test_concurrent_generations_equal_sequential(backend):
    prompts = ["Hello!", "What is 2 + 2?", "Write a poem about the sea.", "Paris?"]
    sequential = [(await backend.generate(ask(p))).token_ids for p in prompts]
    concurrent = await asyncio.gather(*(backend.generate(ask(p)) for p in prompts))
    assert [g.token_ids for g in concurrent] == sequential
    assert max(g.queue_ms for g in concurrent) > 0.0


def _count_forwards(model) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


async def test_cancelled_stream_stops_the_worker():
    backend = tiny_backend()
    calls = _count_forwards(backend.model)
    got_some = asyncio.Event()

    async def consume() -> None:
        async for item in backend.stream(ask(max_new_tokens=480, text="Hi")):
            if isinstance(item, str):
                got_some.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_some.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await backend.generate(ask(max_new_tokens=2))  # the lock is free again
    assert after.completion_tokens == 2
    assert calls[0] < 100  # far fewer than the 480 + 2 a finished stream would take


async def test_closed_stream_stops_the_worker():
    backend = tiny_backend()
    calls = _count_forwards(backend.model)
    stream = backend.stream(ask(max_new_tokens=480, text="Hi"))
    async for item in stream:
        if isinstance(item, str):
            break
    await stream.aclose()
    await backend.generate(ask(max_new_tokens=2))
    assert calls[0] < 100


async def test_int8_backend_answers():
    generation = await tiny_backend("int8").generate(ask(max_new_tokens=8))
    assert generation.completion_tokens == 8
    assert generation.model.endswith("/int8")
    assert all(math.isfinite(lp) and lp <= 0 for lp in generation.logprobs)


async def test_an_output_layer_that_needs_2d_input_answers():
    """torch.ao's dynamically quantized Linear (the bench's "int8 dynamic" variant)
    rejects a 1-D input: the decode loop hands the output layer [1, hidden]."""
    from tests.support.tiny_models import TINY_CONTEXT_LENGTH, tiny_model_and_tokenizer
    from tidegate.inference.transformers_backend import TransformersBackend

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    backend = TransformersBackend(
        model,
        tokenizer,
        model_id="tiny@dyn",
        context_length=TINY_CONTEXT_LENGTH,
        quantization="int8-dynamic",
    )
    generation = await backend.generate(ask(max_new_tokens=4))
    assert (
        generation.completion_tokens == 4
        and len(generation.prompt_state) == model.config.hidden_size
    )
    assert all(math.isfinite(lp) and lp <= 0 for lp in generation.logprobs)
