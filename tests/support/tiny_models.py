"""Tiny random models for unit tests: a 2-layer Llama and a BPE tokenizer built in code.

Everything here is deterministic for a given seed and builds in milliseconds, so
router and cloud tests can start real ModelNode servers without real weights.
"""

from __future__ import annotations

import functools

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CONTEXT_LENGTH = 512

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Café, naïve, 東京, 🙂.",
]


@functools.cache
def _tokenizer_json() -> str:
    """Train a small byte-level BPE once per process; the JSON is immutable and reusable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer():
    """A fast tokenizer with ChatML-style special tokens, an eos token and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TINY_CONTEXT_LENGTH,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


# The shape every tiny test model shares (Llama or Qwen2): hidden 64, 2 layers, GQA.
_TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=TINY_CONTEXT_LENGTH,
)


def _seeded(model_class, config, seed: int, sharpen: bool, then=None):
    """``model_class(config)`` drawn from ``seed`` (without touching the global RNG),
    its logits sharpened (``sharpen``), ``then(model)`` applied under the same seed."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            if sharpen:
                # Random init gives near-uniform logits; sharpen them so greedy decoding
                # and confidence signals look more like a trained model's.
                model.lm_head.weight.mul_(8.0)
            if then is not None:
                then(model)
    return model.eval()


def tiny_model(vocab_size: int, seed: int = 0, eos_token_id: int | None = None, tied: bool = False):
    """A random LlamaForCausalLM (hidden 64, 2 layers), fp32, eval mode.

    Untied by default: a random tied model greedily repeats one token forever.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        **_TINY_SHAPE,
        tie_word_embeddings=tied,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    return _seeded(LlamaForCausalLM, config, seed, sharpen=not tied)


def tiny_qwen2_model(vocab_size: int, seed: int = 0, eos_token_id: int | None = None):
    """A random Qwen2ForCausalLM (hidden 64, 2 layers), fp32, eval mode, untied.

    Qwen2 differs from Llama in its q/k/v biases, which random init leaves at zero:
    they are drawn here so that they matter.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, **_TINY_SHAPE, eos_token_id=eos_token_id, tie_word_embeddings=False
    )

    def draw_biases(model) -> None:
        for layer in model.model.layers:
            attention = layer.self_attn
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
                proj.bias.normal_(0, 0.5)

    return _seeded(Qwen2ForCausalLM, config, seed, sharpen=True, then=draw_biases)


def tiny_model_and_tokenizer(seed: int = 0, tied: bool = False):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id, tied=tied)
    return model, tokenizer


def tiny_backend(quantization: str = "none", seed: int = 0):
    """A ready TransformersBackend over a random tiny Llama (milliseconds after imports).

    ``quantization`` is "none", "bf16" or "int8"; the model identity is
    ``tiny-llama-s<seed>@tiny/<quantization>``.
    """
    from tidegate.inference.quantize import quantize_model
    from tidegate.inference.transformers_backend import TransformersBackend

    model, tokenizer = tiny_model_and_tokenizer(seed)
    model = quantize_model(model, quantization)
    return TransformersBackend(
        model,
        tokenizer,
        model_id=f"tiny-llama-s{seed}@tiny",
        context_length=TINY_CONTEXT_LENGTH,
        quantization=quantization,
    )


async def start_tiny_node(
    role: str = "edge",
    *,
    seed: int = 0,
    quantization: str = "none",
    estimator: str | None = "seq_prob",
    default_max_new_tokens: int = 16,
    max_new_tokens_limit: int = 256,
    address: str = "127.0.0.1:0",
):
    """Start a real ModelNode gRPC server over ``tiny_backend``; returns (server, backend).

    Edge nodes get ``estimator`` (None: no confidence); stop with
    ``await server.stop(0); await backend.close()``.
    """
    from tidegate.node_servicer import ModelNodeServicer, NodeLimits
    from tidegate.server import start_server, wait_for_health

    backend = tiny_backend(quantization, seed)
    scorer = None
    if estimator is not None:
        from edge_node.estimators import build_estimator

        scorer = build_estimator(estimator)
    servicer = ModelNodeServicer(
        backend,
        role=role,
        estimator=scorer,
        limits=NodeLimits(default_max_new_tokens, max_new_tokens_limit),
    )
    server = await start_server([servicer.service()], address)
    await wait_for_health(server.address, timeout=10)
    return server, backend
