"""The cloud tier: a larger model behind the ModelNode service.

Backends: the in-process transformers backend (shared with the edge node) or
any OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp server) via
``OpenAIBackend``. Importing this package does not import torch.
"""
