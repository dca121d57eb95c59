"""Decoding through a static KV cache, with a per-token step that compiles ahead of time.

Why our own forward instead of ``model(...)`` with a transformers cache: one
decode step of a 135M model is ~300 small ops; in eager mode the Python
around them costs more than the arithmetic. ``step_function`` — all layers,
the lm_head, and the signals the estimators read (log-softmax, entropy,
greedy choice) — is written so that it compiles to one graph
(compiled_step.py: torch.export + AOTInductor), called once per token with
the token and its position as tensors, so nothing recompiles per token or
per prompt length:

- the KV cache is preallocated ([1, kv_heads, capacity, head_dim] per layer),
  written in place at ``pos`` and read through a mask ``arange(capacity) <= pos``;
- ``capacity`` is sized per request in powers of two (≥ 256, ≤ the context):
  grown for a long one, shrunk again after it; it is a dynamic dimension of the
  compiled graph;
- the prompt (prefill) runs eagerly: its few large matmuls dominate, not Python.
  A long prompt runs in chunks of PREFILL_CHUNK tokens, each attending to the
  cache up to itself: one pass over 7,600 tokens held ~250 MB of activations at
  once (peak RSS 869 → 651 MB; llama.cpp 568 MB: bench/edge_long_prompt.py).

Until a compiled step is attached (``use_compiled``), ``step`` runs
``step_function`` eagerly: same results, slower.

The layers' own modules (linears of any kind — fp32, int8, int4 — norms,
MLPs, rotary tables) are reused as they are, so this file only re-states
attention. Supported: Llama and Qwen2 style models with full attention
(``unsupported_reason`` says why not otherwise; the backend then decodes
with transformers' own forward).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CAPACITY = 256
PREFILL_CHUNK = 512  # prompt tokens per prefill pass (the bench's long prompt is one)
SUPPORTED_TYPES = ("llama", "qwen2")


def unsupported_config_reason(config: Any) -> str | None:
    """Why a model with ``config`` cannot use the static decoder, or None if it can."""
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "use_sliding_window", False)  # Qwen2's, without layer_types
    if sliding or any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot use the static decoder, or None if it can."""
    reason = unsupported_config_reason(model.config)
    if reason is not None:
        return reason
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    return None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def token_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-probabilities [vocab] and the distribution's entropy (scalar, nats)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    entropy = torch.special.entr(logprobs.exp()).sum()  # -Σ p log p, 0·log 0 = 0
    return logprobs, entropy


def _summary(logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """[greedy id, its log-probability, entropy] as one float32 tensor: one read per token.

    Ids are exact in float32 up to 2^24 (vocabularies are far smaller).
    """
    best_logprob, best = logprobs.max(dim=-1)
    return torch.stack([best.to(torch.float32), best_logprob, entropy])  # [3]


class StaticDecoder:
    """Prefill + one-token steps of a Llama/Qwen2 ``model`` through its own KV cache.

    Not thread-safe: the backend calls it from its single torch worker thread.
    """

    def __init__(self, model: nn.Module, *, max_context: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the static decoder does not support {reason}")
        config: Any = model.config
        inner: Any = model.model
        self.model = model
        self.layers = list(inner.layers)
        self.embed: Any = inner.embed_tokens
        self.norm: Any = inner.norm
        self.lm_head: Any = model.lm_head
        self.rotary: Any = inner.rotary_emb
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.max_context = int(max_context)
        self.dtype = inner.norm.weight.dtype  # activations: fp32 or bf16
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        with torch.inference_mode():  # step inputs, refilled per token
            self._token = torch.zeros(1, 1, dtype=torch.long)  # [1, 1]
            self._pos = torch.zeros(1, dtype=torch.long)  # [1]
        self._compiled: Any = None  # the compiled step, once attached (compiled_step.py)
        self.compile_done = threading.Event()  # set when attached, or when that failed
        self.compile_error: str | None = None
        self.build_process: Any = None  # the child process compiling the step, if any
        self._pending: Any = None  # loads the compiled step, run by the next reserve()

    # ---- cache ----------------------------------------------------------------------

    def rotary_tables(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin [capacity, head_dim] from the model's own rotary module."""
        positions = torch.arange(capacity).unsqueeze(0)  # [1, capacity]
        probe = torch.empty(1, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions)  # [1, capacity, head_dim] each
        return cos[0].contiguous(), sin[0].contiguous()

    def allocate_cache(self, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (1, self.kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        return keys, values

    @torch.inference_mode()
    def reserve(self, tokens: int) -> None:
        """Size the cache for a request of ``tokens`` positions (prompt + new tokens).

        It shrinks as well as grows: a step attends over the whole capacity (masked),
        so a cache left at 1024 by one long prompt made every later short answer pay
        4× the attention (the bench's decode, measured after its 512-token prompt:
        70 vs 98 tok/s). Re-allocating costs ~1 ms; an unchanged size reuses it.
        """
        if self._pending is not None:  # on the serving thread, like every torch call
            loader, self._pending = self._pending, None
            try:
                self._compiled = loader()
            except Exception as exc:  # noqa: BLE001 - the uncompiled step keeps serving
                self.compile_error = f"{type(exc).__name__}: {exc}"
                log.warning("could not load the compiled step; decoding uncompiled: %s", exc)
        capacity = MIN_CAPACITY
        while capacity < tokens:
            capacity *= 2
        capacity = max(min(capacity, self.max_context), tokens)
        if capacity == self.capacity:
            return
        self.k_cache, self.v_cache = [], []  # the old cache goes before the new one comes
        self.k_cache, self.v_cache = self.allocate_cache(capacity)
        self.cos, self.sin = self.rotary_tables(capacity)
        self.capacity = capacity

    # ---- the model, restated ----------------------------------------------------------

    def _attention(
        self,
        layer: Any,
        x: torch.Tensor,  # [1, T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [1, kv_heads, capacity, head_dim]
        v_cache: torch.Tensor,
        positions: torch.Tensor,  # [T] where the new keys go
        mask: torch.Tensor | None,  # [1, 1, T, keys] bool: which keys each query sees
        step: bool,
    ) -> torch.Tensor:
        """``mask`` None: a prompt's first chunk, attending to itself causally; [1, 1, 1,
        capacity]: one decode step; [1, 1, T, end]: a later chunk of a long prompt,
        attending to the cache up to itself."""
        attn = layer.self_attn
        tokens = x.shape[1]
        q = attn.q_proj(x).view(1, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # [1, heads, T, head_dim]
        k = k * cos + rotate_half(k) * sin  # [1, kv_heads, T, head_dim]
        k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
        v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
        if mask is None:  # the prompt('s first chunk) attends to itself, causally
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        elif step:  # one token: attends to every cached position up to its own
            out = self._attend_one(q, k_cache, v_cache, mask)
        else:  # a later chunk: the cached prompt before it, and itself causally
            end = mask.shape[-1]
            out = nn.functional.scaled_dot_product_attention(
                q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(1, tokens, self.heads * self.head_dim)
        return attn.o_proj(out)

    def _attend_one(
        self,
        q: torch.Tensor,  # [1, heads, 1, head_dim]
        k_cache: torch.Tensor,  # [1, kv_heads, capacity, head_dim]
        v_cache: torch.Tensor,
        mask: torch.Tensor,  # [1, 1, 1, capacity] bool
    ) -> torch.Tensor:
        """Single-query attention as sums of products, which inductor fuses into a few
        loops: SDPA's CPU kernel is built for long queries (280 µs per layer here) and
        two bmm calls still cost ~50 µs per layer in call overhead."""
        group = self.heads // self.kv_heads
        q = q.view(1, self.kv_heads, group, 1, self.head_dim).float()  # heads sharing a kv head
        keys = k_cache.unsqueeze(2).float()  # [1, kv, 1, capacity, head_dim]
        scores = (q * keys).sum(-1) * self.head_dim**-0.5  # [1, kv, group, capacity]
        scores = scores.masked_fill(~mask.view(1, 1, 1, -1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # [1, kv, group, capacity]
        values = v_cache.unsqueeze(2).float()  # [1, kv, 1, capacity, head_dim]
        out = (weights.unsqueeze(-1) * values).sum(-2).to(v_cache.dtype)  # [1, kv, group, hd]
        return out.view(1, self.heads, 1, self.head_dim)

    def _forward(
        self,
        tokens: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [T]
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        cos_table: torch.Tensor,  # [capacity, head_dim]
        sin_table: torch.Tensor,
        step: bool,
    ) -> torch.Tensor:
        """Hidden state of the last position [1, hidden]."""
        x = self.embed(tokens).to(self.dtype)  # [1, T, hidden]
        cos, sin = cos_table[positions], sin_table[positions]  # [T, head_dim]
        mask = None
        if step:
            capacity = k_caches[0].shape[2]
            mask = (torch.arange(capacity) <= positions).view(1, 1, 1, capacity)
        elif int(positions[0]) > 0:  # a later chunk of a prompt: keys up to its last position
            end = int(positions[-1]) + 1
            mask = (torch.arange(end) <= positions.unsqueeze(-1)).view(1, 1, -1, end)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer, h, cos, sin, k_cache, v_cache, positions, mask, step)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x[:, -1])  # [1, hidden]

    def step_function(
        self,
        token: torch.Tensor,  # [1, 1]
        pos: torch.Tensor,  # [1]
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        cos_table: torch.Tensor,
        sin_table: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token → (log-probabilities [vocab] fp32, [greedy id, its logprob, entropy],
        the final hidden state the next token is read from [hidden] fp32: the probe's input
        once it is the answer's last)."""
        hidden = self._forward(token, pos, k_caches, v_caches, cos_table, sin_table, step=True)
        logprobs, entropy = token_signals(self.lm_head(hidden)[0])  # [vocab], []
        return logprobs, _summary(logprobs, entropy), hidden[0].float()

    # ---- public -----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompt; returns what ``step`` returns, for the first new token, and the
        final hidden state at the prompt's last position ([hidden] fp32: the probe's input)."""
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            chunk = prompt_ids[start : start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], dtype=torch.long)  # [1, C]
            positions = torch.arange(start, start + len(chunk))  # [C]
            hidden = self._forward(
                tokens, positions, self.k_cache, self.v_cache, self.cos, self.sin, step=False
            )
        logprobs, entropy = token_signals(self.lm_head(hidden)[0])
        return logprobs, _summary(logprobs, entropy), hidden[0].float()

    @torch.inference_mode()
    def step(self, token_id: int, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed ``token_id`` at ``position`` (< capacity); the next token's signals and
        the hidden state they were read from (as ``prefill``)."""
        self._token.fill_(token_id)
        self._pos.fill_(position)
        fn = self._compiled or self.step_function
        return fn(self._token, self._pos, self.k_cache, self.v_cache, self.cos, self.sin)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def use_compiled(self, step: Any) -> None:
        """Serve ``step`` (same signature and results as ``step_function``) from now on.

        One attribute assignment: safe while another thread is decoding, which
        switches at its next token (both read and write the same cache).
        """
        self._compiled = step
        self.compile_done.set()

    def stop_build(self) -> None:
        """Stop a compile still running in a child process (the server is closing)."""
        process = self.build_process
        if process is not None and process.poll() is None:
            process.terminate()

    def offer_compiled(self, loader: Any) -> None:
        """A compiled step is ready (built by another process): ``loader()`` loads it, on
        the serving thread at the start of the next generation (see ``reserve``)."""
        self._pending = loader
        self.compile_done.set()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for a compiled step to be attached or offered (or given up on)."""
        self.compile_done.wait(timeout)
        return self.compiled or self._pending is not None
