"""How the router's prompt-token estimate compares with real tokenizers.

Budgets reserve ``ceil(estimate × budgets.prompt_token_factor) +
budgets.prompt_overhead_tokens + max_new_tokens`` before a cloud call; the
reservation is an upper bound only if that covers the real prompt count. This
prints, per bundled model tokenizer (converted under ~/.cache/tidegate/models
by a first `tidegate up` / `make demo`), the real count minus the estimate on
the devset questions (data/devset/devset.jsonl), and the ratio on two long
prompts.

    .venv/bin/python bench/prompt_estimate.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.policy import estimate_prompt_tokens  # noqa: E402
from tidegate.chat import ChatMessage  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer

    cache = Path.home() / ".cache" / "tidegate" / "models"
    models = sorted(p.parent for p in cache.glob("*/tokenizer.json"))
    if not models:
        sys.exit("no converted bundled models under ~/.cache/tidegate/models: run `make demo` once")
    questions = [
        json.loads(line)["question"]
        for line in (ROOT / "data" / "devset" / "devset.jsonl").read_text().splitlines()
    ]
    long_prompts = {
        "README (6000 chars)": (ROOT / "README.md").read_text()[:6000],
        "Python (6000 chars)": (ROOT / "router" / "pipeline.py").read_text()[:6000],
    }
    print("| tokenizer | questions | real − estimate: median | p95 | max |", end="")
    print(" long prompts: real / estimate |")
    print("|---|---|---|---|---|---|")
    for folder in models:
        tok = AutoTokenizer.from_pretrained(str(folder))

        def real(text: str, tok=tok) -> int:  # type: ignore[no-untyped-def]
            chat = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return len(tok(rendered, add_special_tokens=False)["input_ids"])

        def estimate(text: str) -> int:
            return estimate_prompt_tokens([ChatMessage("user", text)])

        diffs = sorted(real(q) - estimate(q) for q in questions)
        ratios = ", ".join(
            f"{name}: {real(text) / estimate(text):.2f}" for name, text in long_prompts.items()
        )
        n = len(diffs)
        print(
            f"| {folder.name} | {n} | {diffs[n // 2]} | {diffs[int(n * 0.95)]} | {diffs[-1]} "
            f"| {ratios} |"
        )


if __name__ == "__main__":
    main()
