"""Write the tiny test Llama (tests.support.tiny_models) as a real GGUF file.

Laid out the way llama.cpp's converter writes a Hugging Face Llama: tensor
names ``token_embd``/``blk.N.attn_q``/…, q and k rows permuted for its rotary
layout (transformers un-permutes them on load), F32 tensors, and the BPE
tokenizer (tokens, merges, special ids, chat template) in the metadata. A
model loaded back from it gives the same logits as the original, which is
what the loading tests check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(path: Path, model: Any, tokenizer: Any, name: str = "tiny-llama") -> Path:
    """``model``: a LlamaForCausalLM; ``tokenizer``: its fast BPE tokenizer."""
    import gguf

    config = model.config
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in spec["added_tokens"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's GGUF says
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        block = f"blk.{i}."
        q = weights[layer + "self_attn.q_proj.weight"]
        k = weights[layer + "self_attn.k_proj.weight"]
        writer.add_tensor(block + "attn_norm.weight", weights[layer + "input_layernorm.weight"])
        writer.add_tensor(block + "attn_q.weight", _permute(q, heads, heads))
        writer.add_tensor(block + "attn_k.weight", _permute(k, heads, kv_heads))
        writer.add_tensor(block + "attn_v.weight", weights[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(block + "attn_output.weight", weights[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(
            block + "ffn_norm.weight", weights[layer + "post_attention_layernorm.weight"]
        )
        writer.add_tensor(block + "ffn_gate.weight", weights[layer + "mlp.gate_proj.weight"])
        writer.add_tensor(block + "ffn_up.weight", weights[layer + "mlp.up_proj.weight"])
        writer.add_tensor(block + "ffn_down.weight", weights[layer + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
