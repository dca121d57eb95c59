"""Post-load quantization of a causal LM for CPU decoding.

- ``none``: fp32 as loaded.
- ``bf16``: every weight in bfloat16.
- ``int8``: weight-only int8 linears (per-output-channel symmetric scales) with
  bf16 activations, through ``torch.ops.aten._weight_int8pack_mm``; the rest of
  the model (embeddings, norms, rotary tables) in bf16. Next-token agreement
  with fp32 is ~0.98 (see bench/edge_quant.py), unlike torch.ao dynamic int8,
  which changes answers and so skews confidence.
- ``int4``: weight-only int4 linears (asymmetric, groups of 32, see int4.py)
  with bf16 activations, through ``torch.ops.aten._weight_int4pack_mm_for_cpu``;
  the lm_head stays int8 (its log-probabilities are what the estimators read),
  and a tied input embedding reads the lm_head's int8 rows instead of keeping
  its own bf16 copy. Linears the int4 kernel cannot take fall back to int8.

Modules are built either from a float module (``from_linear``) or empty at
the right shape (``empty``), so that quantized weights can be loaded from the
cache (quantized_cache.py) without quantizing again.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from tidegate.inference.int4 import DEFAULT_GROUP, Int4Linear, int4_fits

QUANTIZATIONS = ("none", "bf16", "int8", "int4")
LmHead = Literal["int8", "int4", "bf16"]


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ w_int8 * scales[:, None]."""
    w = weight.detach().float()  # [out, in]
    max_abs = w.abs().amax(dim=1).clamp(min=1e-8)  # [out]
    scales = max_abs / 127.0  # [out]
    w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
    return w_int8.contiguous(), scales.to(torch.bfloat16)


class Int8Linear(nn.Module):
    """y = x @ dequant(w_int8).T + b, computed by the int8 weight-only kernel in bf16."""

    weight_int8: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, linear: nn.Linear | None = None, *, shape: tuple[int, int, bool] = (0, 0, False)
    ) -> None:
        super().__init__()
        if linear is not None:
            shape = (linear.in_features, linear.out_features, linear.bias is not None)
        self.in_features, self.out_features, has_bias = shape
        self.register_buffer(
            "weight_int8", torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        )  # [out, in] int8
        self.register_buffer("scales", torch.empty(self.out_features, dtype=torch.bfloat16))
        self.register_buffer(
            "bias", torch.empty(self.out_features, dtype=torch.bfloat16) if has_bias else None
        )  # [out] bf16 or None
        if linear is not None:
            self.weight_int8, self.scales = quantize_int8_weight(linear.weight)
            if linear.bias is not None:
                self.bias = linear.bias.detach().to(torch.bfloat16)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8Linear:
        return cls(shape=(in_features, out_features, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]  # [..., in]
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [n, in]
        y = torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.scales)  # [n, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # [..., out] bf16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int8Embedding(nn.Module):
    """An input embedding that reads rows of a tied int8 lm_head: row * scale, in bf16.

    It registers the lm_head's own tensors (no copy), so a tied model keeps one
    int8 matrix instead of an int8 lm_head plus a bf16 embedding.
    """

    weight_int8: torch.Tensor
    scales: torch.Tensor

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("weight_int8", head.weight_int8)  # [vocab, hidden] shared
        self.register_buffer("scales", head.scales)  # [vocab] shared

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight_int8)  # [..., hidden] int8
        return rows.to(torch.bfloat16) * self.scales[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows of the tied lm_head"


def _quantized_linear(linear: nn.Linear, scheme: str, empty: bool) -> nn.Module:
    """``linear`` as ``scheme`` ("int8" | "int4"; int4 falls back to int8 if it does not fit)."""
    bias = linear.bias is not None
    if scheme == "int4" and int4_fits(linear, DEFAULT_GROUP):
        if empty:
            return Int4Linear(linear.in_features, linear.out_features, DEFAULT_GROUP, bias)
        return Int4Linear.from_linear(linear, DEFAULT_GROUP)
    if empty:
        return Int8Linear.empty(linear.in_features, linear.out_features, bias)
    return Int8Linear(linear)


def replace_linears(
    module: nn.Module, skip: tuple[str, ...] = (), scheme: str = "int8", empty: bool = False
) -> int:
    """Swap every nn.Linear under ``module`` (except names in ``skip``) for a quantized one."""
    replaced = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, _quantized_linear(child, scheme, empty))
            replaced += 1
        else:
            replaced += replace_linears(child, skip, scheme, empty)
    return replaced


def _is_tied(model: Any) -> bool:
    head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    return isinstance(head, nn.Linear) and weight is not None and head.weight is weight


def quantize_model(
    model: Any,
    quantization: str,
    *,
    quantize_lm_head: bool = True,
    lm_head: LmHead | None = None,
    empty: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place (and return it) as ``none`` | ``bf16`` | ``int8`` | ``int4``.

    ``lm_head``: how the output layer is stored (default int8 for int8/int4;
    ``quantize_lm_head=False`` is the older spelling of ``lm_head="bf16"``).
    With tied embeddings and an int8 lm_head, the input embedding reads the
    lm_head's int8 rows (int4 only; int8 keeps a bf16 embedding, as measured
    in bench/edge_quant.py). ``empty``: build the quantized modules without
    quantizing (on a meta-device model whose weights come from the cache).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    if quantization == "none":
        return model.float()
    model = model.to(torch.bfloat16)
    if quantization == "bf16":
        return model
    head_scheme: LmHead = lm_head or ("int8" if quantize_lm_head else "bf16")
    tied = _is_tied(model)
    replace_linears(model, skip=("lm_head",), scheme=quantization, empty=empty)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head_scheme != "bf16":
        model.lm_head = _quantized_linear(head, head_scheme, empty)
        if tied and quantization == "int4" and isinstance(model.lm_head, Int8Linear):
            model.set_input_embeddings(Int8Embedding(model.lm_head))
    return model
