"""Int4 weight-only linears for CPU: ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

Asymmetric, per group of ``group_size`` input columns:
``w ≈ (q - 8) * scale + zero`` with ``q`` in 0..15 (the kernel's convention).

Why asymmetric groups of 32 by default: the bundled GGUF files store their
linears as Q4_1, which is exactly this scheme (``w = d * q + m`` per 32
weights, with the group's min at q = 0 and its max at q = 15). Re-quantizing
the dequantized fp32 weights with min/max per group of 32 finds the same
``q``, ``d`` and ``m`` again, so int4-g32 is the GGUF model itself up to the
bf16 rounding of the scales; coarser groups (64, 128) would lose accuracy
the GGUF file never lost.

The kernel needs ``out_features % 16 == 0`` and ``in_features % group == 0``;
linears that do not fit are left to the caller (see ``int4_fits``).

Long prompts: the kernel is ~3× slower than a bf16 matmul at 512 rows, so
``Int4Linear`` can unpack its weight to bf16 (``dequantize``) for prefill.
The unpacking reads the kernel's private packed layout, which depends on the
CPU (blocks of 64 output rows with AVX-512, of 32 with AVX2), so the block is
found once per process by packing a known matrix (``packing_block``), and
unpacking is disabled if neither layout inverts it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

DEFAULT_GROUP = 32
_INNER_K_TILES = 2  # any of 2/4/8 works on CPU
_BLOCKS_N = (64, 32)  # the kernel's blocks of output rows: 64 with AVX-512, 32 with AVX2


def int4_fits(linear: nn.Linear, group_size: int) -> bool:
    """Whether the int4 kernel takes this linear's shape."""
    return linear.out_features % 16 == 0 and linear.in_features % group_size == 0


def quantize_int4_weight(
    weight: torch.Tensor, group_size: int = DEFAULT_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max asymmetric int4 per group → (q int32 [out, in] in 0..15, scales_and_zeros).

    ``scales_and_zeros``: [in / group, out, 2] bf16, the kernel's layout, such
    that ``w ≈ (q - 8) * scale + zero``.
    """
    w = weight.detach().float()  # [out, in]
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)  # [out, g, gs]
    low = groups.amin(dim=-1, keepdim=True)  # [out, g, 1]
    high = groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-8)  # [out, g, 1]
    q = torch.round((groups - low) / scale).clamp(0, 15)  # [out, g, gs]
    # (q - 8) * scale + zero == q * scale + low. Rounding scale and zero to bf16
    # first and re-picking q against them measured worse (0.48% vs 0.27% error).
    zero = low + 8.0 * scale
    scales_and_zeros = torch.stack([scale[..., 0], zero[..., 0]], dim=-1)  # [out, g, 2]
    return (
        q.reshape(out_features, in_features).to(torch.int32),
        scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16),  # [g, out, 2]
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int32 [out, in] in 0..15 → the kernel's packed uint8 [out, in / 2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)


def _unpack(packed: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    """The CPU layout, per block of ``block`` output rows: byte [col, r] holds row r
    (low nibble) and row r + block / 2 (high nibble) of that column."""
    blocks = packed.view(out_features // block, in_features, block // 2)  # [nb, in, block/2]
    rows = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [nb, in, block]
    return rows.transpose(1, 2).reshape(out_features, in_features)


@functools.cache
def packing_block() -> int | None:
    """The kernel's block of output rows on this CPU, found by packing a known matrix
    (once per process); None if no known layout inverts this torch build's packing."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (2 * max(_BLOCKS_N), 64), dtype=torch.int32, generator=generator)
    packed = pack_int4(q)
    for block in _BLOCKS_N:
        try:
            if torch.equal(_unpack(packed, q.shape[0], q.shape[1], block).to(torch.int32), q):
                return block
        except RuntimeError:
            continue
    return None


def unpack_supported() -> bool:
    """Whether ``unpack_int4`` can invert this torch build's packing on this CPU."""
    return packing_block() is not None


def unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of ``pack_int4`` (uint8 [out, in]), for ``out_features`` a multiple
    of ``packing_block()``."""
    block = packing_block()
    if block is None:
        raise RuntimeError("this torch build packs int4 weights in a layout tidegate cannot read")
    return _unpack(packed, out_features, in_features, block)


class Int4Linear(nn.Module):
    """y = x @ dequant(w_int4).T + b in bf16, by the int4 weight-only kernel.

    Built empty (``from_shape``) when its weights come from the quantized-weight
    cache; ``from_linear`` quantizes an ``nn.Linear``.
    """

    weight_int4: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer(
            "weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        )  # [out, in / 2] kernel-packed
        self.register_buffer(
            "scales_and_zeros",
            torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16),
        )  # [in / group, out, 2]
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.bfloat16) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None)
        q, scales_and_zeros = quantize_int4_weight(linear.weight, group_size)
        module.weight_int4 = pack_int4(q)
        module.scales_and_zeros = scales_and_zeros
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(torch.bfloat16)
        return module

    @property
    def can_dequantize(self) -> bool:
        block = packing_block()
        return block is not None and self.out_features % block == 0

    def dequantize(self) -> torch.Tensor:
        """The bf16 weight [out, in] this module multiplies by (exactly, up to bf16)."""
        q = unpack_int4(self.weight_int4, self.out_features, self.in_features)  # [out, in]
        groups = self.in_features // self.group_size
        q = q.view(self.out_features, groups, self.group_size)
        scale = self.scales_and_zeros[..., 0].t().unsqueeze(-1)  # [out, g, 1]
        zero = self.scales_and_zeros[..., 1].t().unsqueeze(-1)
        weight = (q.float() - 8.0) * scale.float() + zero.float()  # one rounding, like the kernel
        return weight.to(torch.bfloat16).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]  # [..., in]
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [n, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d, self.weight_int4, self.group_size, self.scales_and_zeros
        )  # [n, out] bf16
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 weight-only, group {self.group_size}"
        )
