"""Int4 weight-only: the kernel path against a dense reference, Q4_1 recovery, model wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.inference.int4 import (
    Int4Linear,
    pack_int4,
    quantize_int4_weight,
    unpack_int4,
    unpack_supported,
)
from tidegate.inference.quantize import Int8Embedding, Int8Linear, quantize_model, replace_linears


def _dense(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The reference dequantization, in float64: (q - 8) * scale + zero per group."""
    out_features, in_features = q.shape
    scale = scales_and_zeros[..., 0].t().double().repeat_interleave(group, dim=1)  # [out, in]
    zero = scales_and_zeros[..., 1].t().double().repeat_interleave(group, dim=1)
    assert scale.shape == (out_features, in_features)
    return (q.double() - 8) * scale + zero


def test_quantize_error_is_within_half_a_step():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, scales_and_zeros = quantize_int4_weight(weight, 32)
    assert q.dtype is torch.int32 and q.min() >= 0 and q.max() <= 15
    assert scales_and_zeros.shape == (128 // 32, 64, 2)
    restored = _dense(q, scales_and_zeros, 32)
    step = scales_and_zeros[..., 0].t().double().repeat_interleave(32, dim=1)
    # half a step, plus the bf16 rounding of scale and zero (2^-8 relative, ≤ 8 steps)
    bound = 0.5 * step + 8 * step * 2**-8 + weight.double().abs() * 2**-8
    assert ((restored - weight.double()).abs() <= bound).all()


def test_q4_1_weights_come_back_as_they_were():
    """A GGUF Q4_1 tensor (w = d * q + m per 32, q spanning 0..15) is recovered up to the
    bf16 rounding of d and m: why the bundled GGUF models lose nothing more as int4-g32."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 96), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15  # each group spans the full range, as Q4_1 makes it
    d = torch.rand(64, 3, 1, generator=generator) * 0.02 + 0.001
    m = -torch.rand(64, 3, 1, generator=generator) * 0.1
    weight = (q.view(64, 3, 32) * d + m).view(64, 96)
    restored = Int4Linear.from_linear(_linear(weight), 32).dequantize().double()
    error = (restored - weight.double()).abs().max().item()
    coarse = Int4Linear.from_linear(_linear(weight), 96).dequantize().double()
    coarse_error = (coarse - weight.double()).abs().max().item()
    # bf16 rounding of zero (|m + 8d| ≤ 0.27: ≤ 5e-4), of 8 scales (≤ 3e-4), of the output
    assert error < 1.5e-3
    assert coarse_error > 5 * error  # groups that do not match the file's lose more


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int4_linear_matches_the_dense_reference(rows):
    generator = torch.Generator().manual_seed(2)
    linear = _linear(
        torch.randn(128, 96, generator=generator), torch.randn(128, generator=generator)
    )
    module = Int4Linear.from_linear(linear, 32)
    x = torch.randn(2, rows, 96, generator=generator).bfloat16()
    y = module(x)
    assert y.shape == (2, rows, 128) and y.dtype is torch.bfloat16
    dense = _dense(pack_roundtrip(module), module.scales_and_zeros, 32)  # [out, in]
    expected = x.double() @ dense.t() + linear.bias.bfloat16().double()
    torch.testing.assert_close(y.double(), expected, atol=0.05, rtol=0.02)
    # and close to the float layer it replaces (int4 error: a few % of the output scale)
    error = (y.float() - linear(x.float())).norm() / linear(x.float()).norm()
    assert error < 0.1


def pack_roundtrip(module: Int4Linear) -> torch.Tensor:
    return unpack_int4(module.weight_int4, module.out_features, module.in_features)


def test_unpack_inverts_the_kernel_packing():
    assert unpack_supported()
    q = torch.randint(0, 16, (192, 64), generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_int4(pack_int4(q.int()), 192, 64).long(), q)
    module = Int4Linear.from_linear(_linear(torch.randn(128, 64)), 32)
    x = torch.eye(64, dtype=torch.bfloat16)  # x @ W.T with x = I reads W back through the kernel
    torch.testing.assert_close(module(x).t(), module.dequantize(), atol=0, rtol=2**-7)


def test_int4_model_uses_the_int4_kernel_for_every_fitting_linear():
    model, _ = tiny_model_and_tokenizer(seed=0)
    quantized = quantize_model(model, "int4")
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    int4 = [m for m in quantized.modules() if isinstance(m, Int4Linear)]
    int8 = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    # q, o, gate, up, down fit (out % 16, in % 32); k and v (out 32) fit too: 7 per layer
    assert len(int4) == 2 * 7 and int8 == [quantized.lm_head]
    ids = torch.tensor([[1, 2, 3]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.inference_mode():
            quantized(input_ids=ids)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::_weight_int4pack_mm_for_cpu") == len(int4)
    assert calls.get("aten::_weight_int8pack_mm") == 1


def test_linears_the_kernel_cannot_take_fall_back_to_int8():
    parent = nn.Sequential(nn.Linear(64, 24), nn.Linear(64, 32))  # out 24: not a multiple of 16
    assert replace_linears(parent, scheme="int4") == 2
    assert isinstance(parent[0], Int8Linear) and isinstance(parent[1], Int4Linear)


@pytest.mark.parametrize("tied", [False, True])
def test_int4_agrees_with_fp32_argmax(tied):
    model, _ = tiny_model_and_tokenizer(seed=0, tied=tied)
    quantized = quantize_model(copy.deepcopy(model), "int4")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=generator)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.argmax(-1)
        got = quantized(input_ids=ids).logits.float().argmax(-1)
    # random (not Q4_1-shaped) weights lose more to 4 bits than to 8 (int8: ≥ 0.9)
    assert (expected == got).float().mean().item() >= 0.8
    embedding = quantized.get_input_embeddings()
    if tied:  # one int8 matrix serves the lm_head and the input embedding
        assert isinstance(embedding, Int8Embedding)
        assert embedding.weight_int8.data_ptr() == quantized.lm_head.weight_int8.data_ptr()
    else:
        assert isinstance(embedding, nn.Embedding)
        assert embedding.weight.dtype is torch.bfloat16
