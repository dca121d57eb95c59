"""`tidegate demo`: start the local stack and show each way a question is answered.

It asks a few questions chosen so that every path shows up: an edge answer,
an escalation on low confidence, a cache hit, an escalation over the edge's
token budget, the policy deciding on its own, and a rejected empty question
after which the router keeps answering.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass

import grpc

from tidegate.chat import SamplingParams
from tidegate.client import RouterClient, build_request, response_to_dict


@dataclass(frozen=True)
class DemoQuestion:
    shows: str
    question: str
    min_confidence: float | None = None
    max_new_tokens: int | None = None


QUESTIONS = (
    DemoQuestion("edge answer (min_confidence 0)", "What is the capital of France?", 0.0),
    DemoQuestion("escalation (min_confidence 1)", "What is the capital of Australia?", 1.0),
    DemoQuestion("cache hit (same question again)", "What is the capital of Australia?", 1.0),
    DemoQuestion(
        "over the edge budget", "Name the largest planet in our solar system.", max_new_tokens=1000
    ),
    DemoQuestion("the policy decides", "What is 17 multiplied by 23?"),
    DemoQuestion("bad input: empty question", ""),
)


def _row(cells: list[str], widths: list[int]) -> str:
    return " | ".join(c.ljust(w)[:w] for c, w in zip(cells, widths, strict=True))


async def ask_all(address: str) -> int:
    widths = [32, 6, 6, 8]
    print(_row(["shows", "tier", "conf", "ms"], widths))
    print("-+-".join("-" * w for w in widths))
    failures = 0
    async with RouterClient(address, timeout_s=600) as client:
        for q in QUESTIONS:
            request = build_request(
                q.question,
                min_confidence=q.min_confidence,
                sampling=SamplingParams(max_new_tokens=q.max_new_tokens),
            )
            try:
                data = response_to_dict(await client.generate(request))
            except grpc.aio.AioRpcError as exc:
                print(_row([q.shows, "error", "", ""], widths))
                print(f"    {exc.code().name}: {exc.details()}")
                continue
            answer = " ".join(data["text"].split())
            print(
                _row(
                    [
                        q.shows,
                        data["tier"],
                        f"{data['confidence']:.2f}",
                        f"{data['timings_ms']['total']:.0f}",
                    ],
                    widths,
                )
            )
            source = f" (answered earlier by {data['source_tier']})" if data["source_tier"] else ""
            notes = [
                f"Q: {q.question}",
                f"A: {answer}",
                f"why: {data['escalation_reason'] or 'kept: confidence meets the threshold'}"
                f"{source}",
            ]
            for note in notes:
                for line in textwrap.wrap(note, 96)[:3]:
                    print("    " + line)
        # The router survived the bad request: prove it with one more round trip.
        status = await client.status()
        print(
            f"\nrouter still serving: {len(status.nodes)} nodes, cache {status.cache_entries} "
            f"entries / {status.cache_hits} hits, policy {status.policy_version}"
        )
    return failures


async def run_demo(config_dir: str | None = None) -> int:
    from tidegate.cli import start_local_stack

    started = time.perf_counter()
    servers = await start_local_stack(config_dir, log=lambda m: print(m, flush=True))
    router = servers[-1]
    print(f"stack ready in {time.perf_counter() - started:.1f}s; router on {router.address}\n")
    try:
        return await ask_all(router.address)
    finally:
        for server in reversed(servers):
            await server.stop(1)
