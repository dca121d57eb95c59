"""Llama and Qwen2 as plain modules: the weights' containers the static decoder reads.

Why not transformers' own classes: importing their modeling code imports
torch's compiler stack with it (transformers.masking_utils → torch._dynamo →
inductor, sympy): ~100 MB of resident memory and ~0.5 s of start-up in every
edge node, for forwards the static decoder never calls (static_decoder.py
restates attention and the decode loop; it needs only each layer's
projections, norms and MLP, the embedding, the rotary tables and the lm_head).

The modules here carry exactly the attribute names, parameters, buffers and
arithmetic of transformers' (5.x) Llama/Qwen2 modules, so the quantized-weight
cache fills them by the same names, quantize.py swaps their linears the same
way, and a compiled step built from either kind of model binds to the other.
They have no forward over a whole sequence: only a backend decoding with the
static decoder can serve them (``TransformersBackend`` makes one for them).

Supported (``supports``): the architectures and options below with the
default RoPE; anything else loads through transformers as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tidegate.inference.static_decoder import unsupported_config_reason

# What config.json must state: transformers' config classes would fill gaps with
# their defaults, and importing them imports the compiler stack (see above).
REQUIRED_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)


def read_config(folder: Path) -> SimpleNamespace | None:
    """``folder``'s config.json as attributes, if it states everything these modules
    need and they support it; else None (load through transformers)."""
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or any(key not in values for key in REQUIRED_KEYS):
        return None
    config = SimpleNamespace(**values)
    return config if supports(config) else None


def _rope_theta(config: Any) -> float | None:
    """The RoPE base for the default (unscaled) RoPE, else None."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        return None
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta else None


def supports(config: Any) -> bool:
    """Whether ``config`` can be built from these modules (else: transformers' classes):
    what the static decoder serves, with the default RoPE and no MLP biases."""
    if unsupported_config_reason(config) is not None or _rope_theta(config) is None:
        return False
    return not getattr(config, "mlp_bias", False)


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


class Linear(nn.Linear):
    """nn.Linear without random initialisation: the weights come from the cache, and
    initialising on the meta device runs torch's Python reference kernels, which
    import the compiler stack."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without random initialisation (see Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """x / rms(x) · weight, the mean taken in float32 (as LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) · up(x))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, inner, bias=False)
        self.up_proj = Linear(hidden, inner, bias=False)
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """The four projections; the arithmetic is StaticDecoder._attention's."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, _head_dim(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        # Qwen2 has biases on q, k and v only; Llama on all four when attention_bias is set.
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(heads * head_dim, hidden, bias=o_bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the default RoPE (as LlamaRotaryEmbedding with rope_type default)."""

    inv_freq: torch.Tensor

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim, theta = _head_dim(config), _rope_theta(config)
        assert theta is not None, "supports() rules this out"
        # computed on the CPU even inside a meta-device skeleton (see Linear)
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim
        inv_freq = 1.0 / (theta**exponents)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[batch, T] positions → cos, sin [batch, T, head_dim] in ``x``'s dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [batch, T, dim/2]
        table = torch.cat((freqs, freqs), dim=-1)
        return table.cos().to(x.dtype), table.sin().to(x.dtype)


class Decoder(nn.Module):
    embed_tokens: nn.Module  # quantize.py may swap in an Int8Embedding

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """``model`` (the decoder) and ``lm_head``, tied when the config says so."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not supports(config):
            raise ValueError(f"{config.model_type} with these options needs transformers' classes")
        self.config = config
        self.generation_config: Any = None
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            embedding = self.model.embed_tokens
            assert isinstance(embedding, Embedding)
            self.lm_head.weight = embedding.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, embedding: nn.Module) -> None:
        self.model.embed_tokens = embedding
