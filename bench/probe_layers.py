"""Which layer's hidden state should the combiner's probes read? A scan, side by side.

    python bench/probe_layers.py --fit /tmp/tidegate-fit/items.jsonl \\
        --dev /tmp/tidegate-devset/items.jsonl [--layers 4,8,12,16,20,24,29]

Both files come from ``tidegate eval`` (README, Confidence: "Re-running it"). The decode
loop hands the probes the *last* layer's state (after the final norm) where the prompt
ends and where the answer ends; probing work often finds middle layers better (Azaria
& Mitchell 2023, "The Internal State of an LLM Knows When It's Lying"). This re-reads
each item's prompt and the edge's own answer — its token ids from the eval's generation
cache, so exactly what it decoded — in one prefill through the edge's static decoder,
catches the residual stream after each layer with forward hooks, and fits the combiner
(the token features + one probe) per layer on three readings of it:

- ``prompt``: the prompt's last position (where the answer's first token is read from);
- ``answer``: the answer's last fed token (where its end is read from);
- ``mean``: the mean over those two and every position between.

Each fit is read on ``--dev``'s ``calib`` and ``test`` (AUROC), and routed as gain
routes: a cloud head fitted on ``calib`` on the same inputs, the threshold ``tidegate
calibrate`` picks on ``calib`` for at most 25% escalated (its own code), and what that
threshold does on ``test`` (escalated, routed accuracy as a fraction of cloud-only).
The first row reads the states the decode loop recorded (the shipped inputs: both
probes) the same way. Penalties are fixed (``--l2``, ``--cloud-l2``: what
cross-validation chose for the shipped heads), so the rows differ only in their
inputs. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tidegate.evaluation.heldout import cloud_head, evaluate, print_table, usable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "devset"
READINGS = ("prompt", "answer", "mean")


def residual_stream(decoder: Any, ids: Sequence[int]) -> Any:
    """The residual stream after every layer, [layers, len(ids), hidden] float32, from
    one prefill of ``ids`` through the static decoder. The decoder restates attention
    and never calls a layer module whole, so each layer's output is caught as its parts:
    the input of ``post_attention_layernorm`` (after attention) + the MLP's output."""
    import torch

    mid: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    out: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    hooks = []
    for i, layer in enumerate(decoder.layers):
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args, i=i: mid[i].append(args[0][0].float())
            )
        )
        hooks.append(
            layer.mlp.register_forward_hook(lambda _m, _a, y, i=i: out[i].append(y[0].float()))
        )
    try:
        decoder.reserve(len(ids))
        decoder.prefill(list(ids))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([torch.cat(m) + torch.cat(o) for m, o in zip(mid, out, strict=True)])


def readings(stream: Any, prompt_len: int, layers: Sequence[int]) -> dict[str, Any]:
    """``READINGS`` of ``stream`` ([layers, T, hidden]) at ``layers``: [len(layers), hidden]
    each. The answer's positions start at the prompt's last one (the first answer token
    is read from it) and end at the last fed token."""
    picked = stream[list(layers)]  # [k, T, hidden]
    return {
        "prompt": picked[:, prompt_len - 1].numpy(),
        "answer": picked[:, -1].numpy(),
        "mean": picked[:, prompt_len - 1 :].mean(dim=1).numpy(),
    }


def collect(
    backend: Any,
    records: Sequence[dict[str, Any]],
    data: Path,
    layers: Sequence[int],
    answers: Any,
) -> dict[str, dict[str, Any]]:
    """Readings per item id, of each answer in ``answers`` (the backend's eval generation
    cache, a ``gencache.OutputCache``)."""
    import torch

    from tidegate.evaluation.dataset import load_items
    from tidegate.evaluation.gencache import request_key
    from tidegate.evaluation.runner import DEFAULT_MAX_NEW_TOKENS, item_request

    model = backend.info.model
    items = {item.id: item for item in load_items(data)}
    states = {}
    with torch.inference_mode():
        for record in records:
            request = item_request(items[record["id"]], DEFAULT_MAX_NEW_TOKENS)
            answer = answers.get(request_key(model, "generate", request))
            if not answer or not answer["token_ids"]:
                raise SystemExit(f"{record['id']}: no cached answer of {model}; run tidegate eval")
            prompt = backend.encode_prompt(request)
            # the last token (eos, or the one the budget cut off) is read, never fed
            stream = residual_stream(backend.decoder, prompt + answer["token_ids"][:-1])
            states[record["id"]] = readings(stream, len(prompt), layers)
    return states


def scan(
    fit: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    fit_states: Mapping[str, Mapping[str, Any]],
    dev_states: Mapping[str, Mapping[str, Any]],
    layers: Sequence[int],
    l2: float = 100.0,
    cloud_l2: float = 1000.0,
) -> list[dict[str, Any]]:
    """One row per input: the recorded states (both probes), then each layer × reading.
    A reading goes into the combiner's ``prompt_state`` probe: one probe, any vector."""
    recorded = ("prompt_state", "answer_state")

    def row(name: str, fit_inputs: list[Any], dev_inputs: list[Any]) -> dict[str, Any]:
        cloud = cloud_head(dev, dev_inputs, cloud_l2)  # gain's cloud head reads them too
        return {"input": name} | evaluate(fit, fit_inputs, dev, dev_inputs, l2, cloud)

    rows = [
        row(
            "decode loop's states (shipped)",
            [{n: r[n] for n in recorded} for r in fit],
            [{n: r[n] for n in recorded} for r in dev],
        )
    ]
    for k, layer in enumerate(layers):
        for reading in READINGS:
            fit_inputs = [{"prompt_state": fit_states[r["id"]][reading][k]} for r in fit]
            dev_inputs = [{"prompt_state": dev_states[r["id"]][reading][k]} for r in dev]
            rows.append(row(f"layer {layer:2d} {reading}", fit_inputs, dev_inputs))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", required=True, type=Path, help="items.jsonl the heads learn from")
    parser.add_argument("--dev", required=True, type=Path, help="items.jsonl they are read on")
    parser.add_argument("--fit-data", type=Path, default=DATA / "fitset.jsonl")
    parser.add_argument("--dev-data", type=Path, default=DATA / "devset.jsonl")
    parser.add_argument("--layers", default="4,8,12,16,20,24,29", help="0-based, comma-separated")
    parser.add_argument("--edge-config", type=Path, help="edge YAML (default: built-in edge)")
    parser.add_argument("--cache-dir", type=Path, help="the eval's generation cache (its default)")
    parser.add_argument("--l2", type=float, default=100.0, help="the edge head's penalty")
    parser.add_argument("--cloud-l2", type=float, default=1000.0, help="the cloud head's penalty")
    args = parser.parse_args(argv)

    from edge_node.settings import EdgeSettings
    from tidegate.config import load_config
    from tidegate.evaluation.gencache import OutputCache
    from tidegate.evaluation.runner import default_cache_dir, read_items
    from tidegate.inference import load_backend

    layers = [int(v) for v in args.layers.split(",")]
    fit = usable(read_items(args.fit))
    dev = usable(read_items(args.dev))
    backend = load_backend(
        load_config(EdgeSettings, args.edge_config, env_prefix="TIDEGATE_EDGE").model
    )
    if backend.decoder is None:
        raise SystemExit("the edge model does not decode through the static decoder")
    answers = OutputCache(default_cache_dir(args.cache_dir), backend.info.model)
    fit_states = collect(backend, fit, args.fit_data, layers, answers)
    dev_states = collect(backend, dev, args.dev_data, layers, answers)
    rows = scan(fit, dev, fit_states, dev_states, layers, args.l2, args.cloud_l2)
    print_table(rows, "input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
