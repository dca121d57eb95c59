"""Quantization on tiny random models: agreement with fp32 and the int8 kernel path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.inference.quantize import Int8Linear, quantize_int8_weight, quantize_model


def _argmax_agreement(reference: nn.Module, candidate: nn.Module, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, reference.config.vocab_size, (4, 48), generator=generator)
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits.argmax(-1)  # [4, 48]
        got = candidate(input_ids=ids).logits.float().argmax(-1)
    return (expected == got).float().mean().item()


def test_int8_weight_roundtrip_error_is_small():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    w_int8, scales = quantize_int8_weight(weight)
    assert w_int8.dtype is torch.int8 and w_int8.shape == (32, 64)
    assert scales.dtype is torch.bfloat16 and scales.shape == (32,)
    restored = w_int8.float() * scales.float()[:, None]
    # half a quantization step, plus the bf16 rounding of the scale (2^-8 relative)
    bound = 0.5 * scales.float()[:, None] + weight.abs() * 2**-8
    assert ((restored - weight).abs() <= bound + 1e-6).all()


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 5, 64)
    y = Int8Linear(linear)(x.bfloat16())
    assert y.shape == (2, 5, 48) and y.dtype is torch.bfloat16
    torch.testing.assert_close(y.float(), linear(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_agrees_with_fp32_argmax(tied):
    model, _ = tiny_model_and_tokenizer(seed=0, tied=tied)
    quantized = quantize_model(copy.deepcopy(model), "int8")
    assert _argmax_agreement(model, quantized) >= 0.9
    assert isinstance(quantized.lm_head, Int8Linear)
    # the input embedding stays a (bf16) embedding, usable after the tie is dropped
    assert quantized.model.embed_tokens.weight.dtype is torch.bfloat16


def test_bf16_agrees_with_fp32_argmax():
    model, _ = tiny_model_and_tokenizer(seed=0)
    quantized = quantize_model(copy.deepcopy(model), "bf16")
    assert next(quantized.parameters()).dtype is torch.bfloat16
    assert _argmax_agreement(model, quantized) >= 0.9


def test_int8_uses_the_weight_only_kernel():
    model, _ = tiny_model_and_tokenizer(seed=0)
    quantized = quantize_model(model, "int8")
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    linears = sum(isinstance(m, Int8Linear) for m in quantized.modules())
    assert linears == 2 * 7 + 1  # q k v o gate up down per layer + lm_head
    ids = torch.tensor([[1, 2, 3]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.inference_mode():
            quantized(input_ids=ids)
    calls = [e.count for e in prof.key_averages() if e.key == "aten::_weight_int8pack_mm"]
    assert calls == [linears]


def test_lm_head_can_stay_in_bf16():
    model, _ = tiny_model_and_tokenizer(seed=0)
    quantized = quantize_model(model, "int8", quantize_lm_head=False)
    assert type(quantized.lm_head) is nn.Linear
    assert quantized.lm_head.weight.dtype is torch.bfloat16


def test_none_is_fp32_and_unknown_is_rejected():
    model, _ = tiny_model_and_tokenizer(seed=0)
    assert next(quantize_model(model, "none").parameters()).dtype is torch.float32
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model, "int3")
