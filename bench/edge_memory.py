"""Where the edge node's memory goes: VmRSS after each stage of one start, in one process.

    python bench/edge_memory.py

Imports (torch, transformers' top level), the default edge model loaded from its
caches (int4 in our own Llama modules + the compiled step, as `tidegate edge serve`
loads it), a first generation and a 512-token one; the peak (VmHWM) beside each.
Last, whether transformers' modeling code or torch's compiler stack came in
(they cost ~100 MB; the warm path keeps them out: llama_modules.py).
Run it after one `tidegate edge serve` or `make demo`, so the caches exist.
"""

from __future__ import annotations

import asyncio
import re
import sys


def _mem(stage: str) -> None:
    status = open("/proc/self/status").read()
    rss, peak = (
        int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")
    )  # type: ignore[union-attr]
    print(f"{stage:36} RSS {rss:6.0f} MB   peak {peak:6.0f} MB")


def main() -> None:
    _mem("interpreter")
    import torch  # noqa: F401
    import transformers  # noqa: F401

    _mem("import torch, transformers")
    from edge_node.settings import EdgeSettings
    from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
    from tidegate.inference.prepare import load_backend

    backend = load_backend(EdgeSettings().model)
    backend.wait_compiled(600)
    _mem("+ default edge model loaded")

    async def generate() -> None:
        def ask(text: str, tokens: int) -> GenerationRequest:
            return GenerationRequest(
                (ChatMessage("user", text),), SamplingParams(max_new_tokens=tokens)
            )

        await backend.generate(ask("Hi", 4))
        _mem("+ first generation")
        await backend.generate(ask("Tell me about the sea. " * 80, 128))
        _mem("+ a long prompt and 128 tokens")
        await backend.close()

    asyncio.run(generate())
    heavy = ("transformers.models.llama.modeling_llama", "torch._dynamo", "sympy")
    print("imported:", ", ".join(name for name in heavy if name in sys.modules) or "none of", heavy)


if __name__ == "__main__":
    main()
