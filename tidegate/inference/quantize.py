"""Post-load quantization of a causal LM for CPU decoding.

- ``none``: fp32 as loaded.
- ``bf16``: every weight in bfloat16.
- ``int8``: weight-only int8 linears (per-output-channel symmetric scales) with
  bf16 activations, through ``torch.ops.aten._weight_int8pack_mm``; the rest of
  the model (embeddings, norms, rotary tables) in bf16. Next-token agreement
  with fp32 is ~0.98 (see bench/edge_quant.py), unlike torch.ao dynamic int8,
  which changes answers and so skews confidence.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "bf16", "int8")


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ w_int8 * scales[:, None]."""
    w = weight.detach().float()  # [out, in]
    max_abs = w.abs().amax(dim=1).clamp(min=1e-8)  # [out]
    scales = max_abs / 127.0  # [out]
    w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
    return w_int8.contiguous(), scales.to(torch.bfloat16)


class Int8Linear(nn.Module):
    """y = x @ dequant(w_int8).T + b, computed by the int8 weight-only kernel in bf16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w_int8, scales = quantize_int8_weight(linear.weight)
        self.register_buffer("weight_int8", w_int8)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bf16
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)  # [out] bf16 or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]  # [..., in]
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [n, in]
        y = torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.scales)  # [n, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # [..., out] bf16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def replace_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Swap every nn.Linear under ``module`` (except names in ``skip``) for Int8Linear."""
    replaced = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            replaced += 1
        else:
            replaced += replace_linears(child, skip)
    return replaced


def quantize_model(
    model: nn.Module, quantization: str, *, quantize_lm_head: bool = True
) -> nn.Module:
    """Quantize ``model`` in place (and return it) as ``none`` | ``bf16`` | ``int8``.

    With tied input/output embeddings, int8 keeps the input embedding in bf16 and
    gives the lm_head its own int8 copy (the tie is dropped; both stay usable).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    if quantization == "none":
        return model.float()
    model = model.to(torch.bfloat16)
    if quantization == "int8":
        skip = () if quantize_lm_head else ("lm_head",)
        replace_linears(model, skip=skip)
    return model
