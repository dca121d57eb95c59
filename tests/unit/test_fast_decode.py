"""The fast path (static KV cache + AOT-compiled step) against transformers' forward.

fp32 tiny models, so both paths should agree to float rounding: same greedy
tokens, log-probabilities and entropies. One compiled package is built per
module run (~10 s) and shared by the tests.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tidegate.config import ModelSettings
from tidegate.inference import compiled_step
from tidegate.inference.prepare import load_backend, wants_static_decoder
from tidegate.inference.quantize import quantize_model
from tidegate.inference.transformers_backend import TransformersBackend

PROMPTS = ["Hello!", "What is the capital of France?", "def add(a, b): " * 6]


def _backend(static: bool, quantization: str = "none") -> TransformersBackend:
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    return TransformersBackend(
        quantize_model(model, quantization),
        tokenizer,
        model_id="tiny@test",
        context_length=512,
        quantization=quantization,
        static_decoder=static,
    )


def _request(prompt: str, new_tokens: int = 24, **sampling) -> GenerationRequest:
    return GenerationRequest(
        (ChatMessage("user", prompt),), SamplingParams(max_new_tokens=new_tokens, **sampling)
    )


@pytest.fixture(scope="module")
def reference() -> TransformersBackend:
    return _backend(static=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> TransformersBackend:
    backend = _backend(static=True)
    assert backend.decoder is not None and not backend.decoder.compiled
    package = tmp_path_factory.mktemp("compiled") / "step.pt2"
    compiled_step.build_package(backend.decoder, package)
    backend.decoder.use_compiled(compiled_step.load_package(package, backend.decoder))
    return backend


async def _same_answers(backend, reference, request):
    got, expected = await backend.generate(request), await reference.generate(request)
    assert got.token_ids == expected.token_ids
    assert got.text == expected.text and got.finish_reason == expected.finish_reason
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.entropies, expected.entropies, atol=1e-4, rtol=1e-4)
    for state in ("prompt_state", "answer_state"):
        torch.testing.assert_close(
            getattr(got, state), getattr(expected, state), atol=1e-4, rtol=1e-4
        )
    return got


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_uncompiled_static_decoder_matches_transformers(reference, prompt):
    await _same_answers(_backend(static=True), reference, _request(prompt))


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_compiled_step_matches_transformers(compiled, reference, prompt):
    assert compiled.decoder.compiled
    got = await _same_answers(compiled, reference, _request(prompt))
    assert got.token_ids and all(lp <= 0 for lp in got.logprobs)


async def test_the_compiled_step_multiplies_by_the_decoders_own_weights(compiled):
    """No second copy of the weights: the package holds none of the model's, and the
    runtime is handed the eager modules' tensors, so changing one changes the step."""
    decoder = compiled.decoder
    weight = decoder.lm_head.weight
    request = _request(PROMPTS[1], new_tokens=4)
    before = await compiled.generate(request)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.zero_()  # every logit 0: a uniform distribution over the vocabulary
        zeroed = await compiled.generate(request)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    vocab = weight.shape[0]
    assert zeroed.logprobs == pytest.approx([-torch.log(torch.tensor(vocab)).item()] * 4)
    assert (await compiled.generate(request)).token_ids == before.token_ids


async def test_the_compiled_graph_serves_a_grown_cache(compiled, reference):
    """The package was traced at capacity 256; a 300-token prompt needs 512."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 30
    request = _request(long_prompt, new_tokens=40)
    assert len(compiled.encode_prompt(request)) > 256
    await _same_answers(compiled, reference, request)
    assert compiled.decoder.capacity == 512
    await _same_answers(compiled, reference, _request("Hello!"))  # and short prompts after it
    # ... with the cache shrunk back: a step attends over the whole capacity
    assert compiled.decoder.capacity == 256


@pytest.mark.parametrize("chunk", ["7", "all but the last token"])
async def test_a_long_prompt_prefills_in_chunks_with_the_same_result(
    compiled, reference, monkeypatch, chunk
):
    """Each chunk attends to the cached prompt before it and to itself causally; the
    last chunk may be a single token (not a decode step: no compiled step for it)."""
    from tidegate.inference import static_decoder

    request = _request("The quick brown fox jumps over the lazy dog. " * 12, new_tokens=12)
    prompt_tokens = len(compiled.encode_prompt(request))
    size = 7 if chunk == "7" else prompt_tokens - 1
    assert prompt_tokens > size and prompt_tokens % size != 0  # a short last chunk
    monkeypatch.setattr(static_decoder, "PREFILL_CHUNK", size)
    await _same_answers(compiled, reference, request)
    await _same_answers(_backend(static=True), reference, request)


async def test_streaming_and_stop_strings_on_the_compiled_path(compiled, reference):
    full = await reference.generate(_request(PROMPTS[1]))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), full.text
    request = _request(PROMPTS[1], stop=(stop,))
    deltas, final = [], None
    async for item in compiled.stream(request):
        if isinstance(item, str):
            deltas.append(item)
        else:
            final = item
    assert final is not None and final.finish_reason == FinishReason.STOP_SEQUENCE
    assert "".join(deltas) == final.text == full.text[: full.text.index(stop)]
    assert len(deltas) > 1
    expected = await reference.generate(request)
    assert final.token_ids == expected.token_ids


async def test_sampling_on_the_compiled_path_is_the_same_draw(compiled, reference):
    request = _request(PROMPTS[0], temperature=0.9, top_p=0.95, seed=7)
    got = await compiled.generate(request)
    expected = await reference.generate(request)
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-4, rtol=1e-4)


async def test_a_cancelled_stream_stops_the_compiled_decoder(compiled):
    stream = compiled.stream(_request(PROMPTS[0], new_tokens=400))
    async for _ in stream:
        break
    await stream.aclose()
    answer = await asyncio.wait_for(compiled.generate(_request(PROMPTS[0], new_tokens=4)), 30)
    assert len(answer.token_ids) == 4


async def test_the_prompt_state_is_the_models_final_hidden_state(reference):
    """What the combiner's probe reads: the normed last-layer state at the prompt's end."""
    request = _request(PROMPTS[1])
    ids = reference.encode_prompt(request)
    with torch.inference_mode():
        out = reference.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        expected = out.hidden_states[-1][0, -1]  # [hidden]
        # it is the state the first token's logits are read from
        torch.testing.assert_close(reference.model.lm_head(expected), out.logits[0, -1])
    for backend in (reference, _backend(static=True)):
        got = await backend.generate(request)
        assert got.prompt_state is not None and len(got.prompt_state) == expected.numel()
        torch.testing.assert_close(torch.tensor(got.prompt_state), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("new_tokens", [1, 5, 24])
async def test_the_answer_state_is_the_state_the_last_token_was_read_from(
    reference, compiled, new_tokens
):
    """What the combiner's second probe reads: the normed last-layer state at the last
    position fed to the model, the prompt and every answer token but the last; the
    last token (eos, or the limit's) was read from it. One new token: the prompt's."""
    request = _request(PROMPTS[1], new_tokens=new_tokens)
    for backend in (reference, _backend(static=True), compiled):
        got = await backend.generate(request)
        fed = backend.encode_prompt(request) + got.token_ids[:-1]
        with torch.inference_mode():
            out = reference.model(input_ids=torch.tensor([fed]), output_hidden_states=True)
        expected = out.hidden_states[-1][0, -1]  # [hidden]
        assert got.answer_state is not None
        torch.testing.assert_close(torch.tensor(got.answer_state), expected, atol=1e-4, rtol=1e-4)
        last_logprobs = torch.log_softmax(out.logits[0, -1], dim=-1)
        assert float(last_logprobs[got.token_ids[-1]]) == pytest.approx(got.logprobs[-1], abs=1e-4)
        if new_tokens == 1:
            assert got.answer_state == got.prompt_state


def test_int4_static_decoder_tracks_int4_transformers():
    """bf16 activations: the two paths round differently (ours attends in fp32), so
    compare them teacher-forced along one token sequence, position by position."""
    fast, slow = _backend(True, "int4"), _backend(False, "int4")
    assert fast.decoder is not None
    agree = total = 0
    for prompt in PROMPTS:
        ids = fast.encode_prompt(_request(prompt))
        continuation = list(range(40, 72))  # any tokens will do
        sequence = ids + continuation
        with torch.inference_mode():
            logits = slow.model(input_ids=torch.tensor([sequence])).logits[0].float()
        expected = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)  # [32, vocab]
        fast.decoder.reserve(len(sequence))
        got = [fast.decoder.prefill(ids)[0]]
        for position, token in enumerate(continuation[:-1], start=len(ids)):
            got.append(fast.decoder.step(token, position)[0])
        got_logprobs = torch.stack(got)  # [32, vocab]
        agree += int((got_logprobs.argmax(-1) == expected.argmax(-1)).sum())
        total += len(continuation)
        torch.testing.assert_close(got_logprobs, expected, atol=0.1, rtol=0.05)
    assert agree / total >= 0.9


def test_compile_auto_skips_toy_models():
    model, _ = tiny_model_and_tokenizer(seed=0)
    assert not wants_static_decoder(ModelSettings(compile="auto"), model)
    assert wants_static_decoder(ModelSettings(compile="on"), model)
    assert not wants_static_decoder(ModelSettings(compile="off"), model)


async def test_load_backend_compiles_in_the_background_then_reuses_the_package(tmp_path, reference):
    folder = tmp_path / "tiny"
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = ModelSettings(
        source=str(folder), quantization="none", compile="on", cache_dir=str(tmp_path / "c")
    )
    backend = load_backend(settings)
    try:
        assert backend.decoder is not None
        # serves at once (uncompiled) while a child process builds the package
        await _same_answers(backend, reference, _request(PROMPTS[0], new_tokens=8))
        assert await asyncio.to_thread(backend.wait_compiled, 600), backend.decoder.compile_error
        await _same_answers(backend, reference, _request(PROMPTS[1]))
        assert backend.decoder.compiled  # loaded by that generation, on the torch thread
    finally:
        await backend.close()
    packages = list((tmp_path / "c" / "compiled").rglob("*.pt2"))
    assert len(packages) == 1
    again = load_backend(settings)  # a warm start loads the package before serving
    try:
        assert again.decoder is not None and again.decoder.compiled
        await _same_answers(again, reference, _request(PROMPTS[2]))
    finally:
        await again.close()


async def test_static_decoder_matches_transformers_on_qwen2():
    """Qwen2 differs from Llama in the q/k/v biases (and the cloud stand-in is one)."""
    from tests.support.tiny_models import tiny_qwen2_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_qwen2_model(len(tokenizer), eos_token_id=tokenizer.eos_token_id)

    def backend(static: bool) -> TransformersBackend:
        return TransformersBackend(
            model,
            tokenizer,
            model_id="qwen@t",
            context_length=512,
            quantization="none",
            static_decoder=static,
        )

    fast = backend(True)
    assert fast.decoder is not None
    for prompt in PROMPTS:
        await _same_answers(fast, backend(False), _request(prompt))


async def test_a_cache_that_cannot_hold_the_compiled_step_serves_uncompiled(tmp_path, reference):
    folder = tmp_path / "tiny"
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "compiled").write_text("not a folder")  # as a read-only cache: no place to build
    settings = ModelSettings(
        source=str(folder), quantization="none", compile="on", cache_dir=str(cache)
    )
    backend = load_backend(settings)
    try:
        assert backend.decoder is not None and not backend.decoder.compiled
        assert "compiled" in (backend.decoder.compile_error or "")
        await _same_answers(backend, reference, _request(PROMPTS[0], new_tokens=8))
    finally:
        await backend.close()
