"""Our own Llama/Qwen2 modules (llama_modules.py): the same model as transformers' classes,
read from the same quantized cache, without transformers' modeling code in memory."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.tiny_models import (
    TINY_CONTEXT_LENGTH,
    tiny_model_and_tokenizer,
    tiny_qwen2_model,
    tiny_tokenizer,
)
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.config import ModelSettings
from tidegate.inference import llama_modules
from tidegate.inference.prepare import load_backend, prepare_model
from tidegate.inference.static_decoder import StaticDecoder
from tidegate.inference.transformers_backend import TransformersBackend


def _qwen2_folder(root):
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2_model(len(tokenizer), seed=3, eos_token_id=tokenizer.eos_token_id)
    folder = root / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _llama_folder(root, tied: bool = False):
    model, tokenizer = tiny_model_and_tokenizer(seed=2, tied=tied)
    folder = root / f"tiny-llama-{'tied' if tied else 'untied'}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _settings(folder, cache, quantization):
    return ModelSettings(
        source=str(folder), quantization=quantization, cache_dir=str(cache), compile="off"
    )


def _decode(model, prompt=(5, 6, 7, 8, 9), steps=6):
    """The static decoder's prefill and greedy steps: every log-probability it reads."""
    decoder = StaticDecoder(model, max_context=TINY_CONTEXT_LENGTH)
    decoder.reserve(len(prompt) + steps)
    logprobs, summary, state = decoder.prefill(list(prompt))
    outputs = [logprobs, summary, state]
    for position in range(len(prompt), len(prompt) + steps):
        logprobs, summary, state = decoder.step(int(summary[0]), position)
        outputs += [logprobs, summary, state]
    return outputs


@pytest.mark.parametrize(
    ("kind", "quantization"),
    [("llama", "int4"), ("llama-tied", "int4"), ("llama", "int8"), ("qwen2", "int8")],
)
def test_our_modules_decode_exactly_as_transformers_classes(tmp_path, kind, quantization):
    folder = _qwen2_folder(tmp_path) if kind == "qwen2" else _llama_folder(tmp_path, "tied" in kind)
    settings = _settings(folder, tmp_path / "cache", quantization)
    prepare_model(settings)  # the first start quantizes and fills the cache
    theirs = prepare_model(settings)
    ours = prepare_model(settings, own_modules=True)
    assert theirs.from_quantized_cache and ours.from_quantized_cache
    assert isinstance(ours.model, llama_modules.CausalLM)
    assert not isinstance(theirs.model, llama_modules.CausalLM)
    # the same tensors under the same names, so the cache and a compiled step bind to either
    assert ours.model.state_dict().keys() == theirs.model.state_dict().keys()
    assert ours.context_length == theirs.context_length
    for mine, reference in zip(_decode(ours.model), _decode(theirs.model), strict=True):
        torch.testing.assert_close(mine, reference, atol=0, rtol=0)


def test_a_backend_serves_our_modules_through_the_static_decoder(tmp_path):
    folder = _llama_folder(tmp_path)
    settings = _settings(folder, tmp_path / "cache", "int4")
    prepare_model(settings)

    def backend(prepared, static):
        return TransformersBackend(
            prepared.model,
            prepared.tokenizer,
            model_id=prepared.model_id,
            context_length=prepared.context_length,
            quantization="int4",
            static_decoder=static,
        )

    ours = backend(prepare_model(settings, own_modules=True), static=False)
    assert ours.decoder is not None and not ours.decoder.compiled  # eager: asked not to compile
    assert backend(prepare_model(settings), static=False).decoder is None  # their forward
    theirs = backend(prepare_model(settings), static=True)

    async def answers(node):
        messages = (ChatMessage("user", "hello there"),)
        generation = await node.generate(
            GenerationRequest(messages, SamplingParams(max_new_tokens=8))
        )
        verdict = await node.next_token_logprobs(messages, ["a", "b"])
        await node.close()
        return generation, verdict

    (mine, my_verdict), (reference, verdict) = (asyncio.run(answers(n)) for n in (ours, theirs))
    assert mine.token_ids == reference.token_ids and mine.text == reference.text
    assert mine.logprobs == reference.logprobs and mine.entropies == reference.entropies
    assert my_verdict == verdict


def test_a_warm_start_leaves_transformers_modeling_code_out(tmp_path):
    """The point of the modules: a warm edge start imports neither transformers'
    modeling code nor torch's compiler stack (~100 MB resident)."""
    folder = _llama_folder(tmp_path)
    # auto: a toy model is not compiled, but still served by the static decoder
    settings = _settings(folder, tmp_path / "cache", "int4").model_copy(update={"compile": "auto"})
    prepare_model(settings)
    script = textwrap.dedent(
        f"""
        import json, sys
        from tidegate.config import ModelSettings
        from tidegate.inference.prepare import load_backend
        backend = load_backend(ModelSettings.model_validate_json({settings.model_dump_json()!r}))
        heavy = ("torch._dynamo", "sympy", "transformers.models.llama.modeling_llama")
        print(json.dumps({{
            "model": type(backend.model).__name__,
            "decoder": backend.decoder is not None,
            "loaded": [name for name in heavy if name in sys.modules],
        }}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"model": "CausalLM", "decoder": True, "loaded": []}

    # compile: off keeps its documented meaning: transformers' forward, so their classes
    off = load_backend(settings.model_copy(update={"compile": "off"}))
    assert type(off.model).__name__ == "LlamaForCausalLM" and off.decoder is None
    asyncio.run(off.close())


def test_configs_our_modules_do_not_cover_load_through_transformers(tmp_path):
    folder = _llama_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert llama_modules.read_config(folder) is not None

    def variant(**changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return llama_modules.read_config(folder)

    assert variant(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}) is None
    assert variant(hidden_act="gelu") is None
    assert variant(mlp_bias=True) is None
    assert variant(model_type="mistral") is None
    assert variant(layer_types=["sliding_attention", "full_attention"]) is None
    assert variant(use_sliding_window=True) is None
    del config["rms_norm_eps"]  # not stated: transformers' default would apply
    assert variant() is None
    (folder / "config.json").write_text("{not json")
    assert llama_modules.read_config(folder) is None

    # such a model loads through transformers' classes, from the same cache, and serves
    (folder / "config.json").write_text(json.dumps(config))  # no rms_norm_eps
    settings = _settings(folder, tmp_path / "cache", "int4")
    prepare_model(settings)
    fallback = prepare_model(settings, own_modules=True)
    assert fallback.from_quantized_cache
    assert not isinstance(fallback.model, llama_modules.CausalLM)
