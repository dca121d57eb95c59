"""A ModelBackend over a local transformers causal LM, with its own decode loop.

Why not ``model.generate``: we want, per generated token, the log-probability
of the chosen token and the entropy of the full next-token distribution (what
the confidence estimators read), streaming with stop strings, and prompt
cancellation — all cheaper to get right in one small loop.

Two decode paths: the static decoder (static_decoder.py: static KV cache, a
compiled per-token step, log-prob and entropy computed inside the step) for
Llama/Qwen2 models when ``static_decoder`` asks for it, or always for a model built
from our own modules (llama_modules.py, which have no forward of their own), else
transformers' own forward with a DynamicCache. Both yield the same TokenStep per token.

Threading: every torch call runs on one dedicated worker thread (a
single-thread executor, ``torch_thread()``), so the asyncio loop (and
grpc.aio) never blocks; pass the executor the model was loaded on (``load_backend``
does), so that loading and serving share that one thread: libgomp keeps a
thread pool per thread that starts parallel work, and with more pool threads
than cores it stops spin-waiting, so every op pays a futex wake-up (measured
for the compiled SmolLM2 step on 2 cores: 4.9 ms per token from one thread,
16 ms once a second thread had run torch ops). An
asyncio.Lock admits one generation at a time per model. Deltas cross from the
worker to the loop with ``loop.call_soon_threadsafe`` into an asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tidegate.backend import BackendInfo, Generation
from tidegate.chat import ChatMessage, FinishReason, GenerationRequest
from tidegate.errors import InvalidArgument
from tidegate.inference import llama_modules
from tidegate.inference.detokenize import IncrementalDecoder, StopTextBuffer
from tidegate.inference.static_decoder import StaticDecoder, token_signals, unsupported_reason

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256


class _Cancelled(Exception):
    """The stream's consumer went away; the worker stops at the next token."""


@dataclass(frozen=True)
class TokenStep:
    """One decoding step: the chosen token and what the estimators read about it."""

    token_id: int
    logprob: float  # log p(token) under the model (temperature 1), nats
    entropy: float  # entropy of the model's next-token distribution, nats
    # The final hidden state this token was read from ([hidden] fp32). The combiner's
    # probes read two: the first step's (the prompt's last position: Kadavath et al. 2022,
    # "P(IK)") and the last step's (the answer's end, after the model has committed to it).
    state: torch.Tensor | None = None


def _as_list(state: torch.Tensor | None) -> list[float] | None:
    return None if state is None else state.tolist()


def sample_token(
    logprobs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0.0:
        return int(torch.argmax(logprobs))
    # Shifted so the best token's logit is 0: a tiny temperature (1e-40, which the API
    # allows) then divides into -inf for the rest, not inf - inf = nan for all.
    probs = torch.softmax((logprobs - logprobs.max()) / temperature, dim=-1)  # [vocab]
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [vocab]
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [vocab]
        drop = mass_before >= top_p  # [vocab]
        drop[0] = False  # the top token always stays (a top_p that rounds to 0 in fp32)
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's eos and the generation config's."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    candidates.append(getattr(model.config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value if v is not None)
    return frozenset(ids)


def torch_thread() -> ThreadPoolExecutor:
    """The single worker thread a backend runs all its torch work on (see the module doc)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-torch")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a worker's exception as seen (it is re-raised to a consumer that is still there)."""
    if not future.cancelled():
        future.exception()


class TransformersBackend:
    """Serves one loaded (model, tokenizer); see the module docstring for threading."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        context_length: int,
        quantization: str,
        threads: int | None = None,
        static_decoder: bool = False,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        # Our own modules (llama_modules.py) have no forward of their own: the static
        # decoder serves them, uncompiled unless the caller attaches a compiled step.
        own_modules = isinstance(model, llama_modules.CausalLM)
        self.decoder = (
            self._static_decoder(context_length) if static_decoder or own_modules else None
        )
        self._info = BackendInfo(
            model=f"{model_id}/{quantization}",
            context_length=context_length,
            quantization=quantization,
            backend="transformers",
        )
        self._executor = executor or torch_thread()
        self._lock = asyncio.Lock()

    def _static_decoder(self, context_length: int) -> StaticDecoder | None:
        """The static decoder (uncompiled until compiled_step.attach), if the model fits it."""
        reason = unsupported_reason(self.model)
        if reason is not None:
            log.info("decoding with transformers' forward: the static decoder lacks %s", reason)
            return None
        return StaticDecoder(self.model, max_context=context_length)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until a compiled step is attached (bench, tests); True if it is."""
        if self.decoder is None:
            return False
        return self.decoder.wait_compiled(timeout)

    @property
    def info(self) -> BackendInfo:
        return self._info

    # ---- asyncio side -------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole answer: drains ``stream()`` (one decode loop for both paths).

        Draining to the end (not returning at the final item) closes the stream
        at once, which releases the model lock without waiting for GC.
        """
        final: str | Generation | None = None
        async for item in self.stream(request):
            final = item
        if not isinstance(final, Generation):  # pragma: no cover - stream() always ends so
            raise RuntimeError("the decode loop ended without a result")
        return final

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Generation]:
        """Text deltas as they are decoded, then the final Generation.

        If the consumer stops iterating (or its task is cancelled), the worker
        stops at the next token.
        """
        arrived = time.perf_counter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def emit(delta: str) -> None:  # runs on the worker thread
            if cancel.is_set():
                raise _Cancelled
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError as exc:  # the loop is closed: nobody is listening
                raise _Cancelled from exc

        async with self._lock:
            future = loop.run_in_executor(
                self._executor, self._generate_sync, request, arrived, emit, cancel
            )

            def finished(f: asyncio.Future[Generation]) -> None:
                _retrieve(f)
                queue.put_nowait(done)

            future.add_done_callback(finished)
            try:
                while (item := await queue.get()) is not done:
                    yield item
                final = future.result()
            finally:
                cancel.set()
        # Yielded after the lock is released: the consumer scores the answer while
        # this generator is paused, and estimators that run the model again
        # (consistency, self_verify) need the lock themselves.
        yield final

    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], candidates: Sequence[str]
    ) -> dict[str, float]:
        """log p(each candidate's first token) as the assistant's next token after
        ``messages``: one forward pass over the prompt, no decoding. Used by the
        self-verification estimator to read P(yes) against P(no)."""
        request = GenerationRequest(messages=tuple(messages))
        loop = asyncio.get_running_loop()
        async with self._lock:
            return await loop.run_in_executor(
                self._executor, self._next_token_logprobs_sync, request, tuple(candidates)
            )

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.decoder is not None:
            self.decoder.stop_build()

    @torch.inference_mode()
    def _next_token_logprobs_sync(
        self, request: GenerationRequest, candidates: tuple[str, ...]
    ) -> dict[str, float]:
        prompt_ids = self.encode_prompt(request)
        self._check_context(len(prompt_ids), 1)
        if self.decoder is not None:
            self.decoder.reserve(len(prompt_ids) + 1)
            logprobs = self.decoder.prefill(prompt_ids)[0]  # [vocab]
        else:
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            logprobs, _ = token_signals(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1])
        result: dict[str, float] = {}
        for candidate in candidates:
            ids = self.tokenizer(candidate, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InvalidArgument(f"candidate {candidate!r} encodes to no tokens")
            result[candidate] = float(logprobs[ids[0]])
        return result

    # ---- worker thread --------------------------------------------------------------

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self._info.context_length
        if prompt_tokens + max_new_tokens <= context:
            return
        room = context - prompt_tokens
        advice = (
            f"ask for at most {room} new tokens or shorten the conversation"
            if room > 0
            else "shorten the conversation (drop earlier turns or the system prompt)"
        )
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, "
            f"but {self._info.model} has a context of {context} tokens; {advice}"
        )

    def _generate_sync(
        self,
        request: GenerationRequest,
        arrived: float,
        emit: Callable[[str], None],
        cancel: threading.Event,
    ) -> Generation:
        started = time.perf_counter()
        sampling = request.sampling
        max_new_tokens = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        prompt_ids = self.encode_prompt(request)
        self._check_context(len(prompt_ids), max_new_tokens)

        generator = None
        if sampling.is_sampled:
            generator = torch.Generator()
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()

        decoder = IncrementalDecoder(self.tokenizer)
        text = StopTextBuffer(sampling.stop)
        steps: list[TokenStep] = []
        finish = FinishReason.LENGTH
        try:
            for step in self._decode(prompt_ids, max_new_tokens, sampling, generator, cancel):
                steps.append(step)
                if step.token_id in self.eos_ids:
                    finish = FinishReason.STOP
                    break
                if delta := text.push(decoder.push(step.token_id)):
                    emit(delta)
                if text.stopped:
                    finish = FinishReason.STOP_SEQUENCE
                    break
            if not text.stopped:
                # The end of generation releases held-back text (and may reveal a stop
                # string that ended in a byte sequence only complete now).
                tail = text.push(decoder.flush())
                if text.stopped:
                    finish = FinishReason.STOP_SEQUENCE
                if tail := tail + text.finish():
                    emit(tail)
        except _Cancelled:
            log.info("generation %s cancelled after %d tokens", request.request_id, len(steps))
            raise
        ended = time.perf_counter()
        token_ids = [s.token_id for s in steps]
        return Generation(
            text=text.text,
            token_ids=token_ids,
            logprobs=[s.logprob for s in steps],
            entropies=[s.entropy for s in steps],
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            model=self._info.model,
            generation_ms=(ended - started) * 1000.0,
            queue_ms=(started - arrived) * 1000.0,
            token_texts=[self.tokenizer.decode([t]) for t in token_ids],
            prompt_state=_as_list(steps[0].state) if steps else None,
            answer_state=_as_list(steps[-1].state) if steps else None,
        )

    @torch.inference_mode()
    def _decode(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Any,
        generator: torch.Generator | None,
        cancel: threading.Event,
    ) -> Iterable[TokenStep]:
        """Prefill, then one token at a time through the KV cache."""
        if self.decoder is not None:
            yield from self._decode_static(
                self.decoder, prompt_ids, max_new_tokens, sampling, generator, cancel
            )
            return
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # The decoder and the output layer separately (what the model's forward does with
        # logits_to_keep=1): the last position's final hidden state comes for free, where
        # output_hidden_states would keep every layer's states for the whole prompt.
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)  # [1, prompt]
        for _ in range(max_new_tokens):
            if cancel.is_set():
                raise _Cancelled
            out = decoder(input_ids=input_ids, cache=cache, use_cache=True)
            # [1, hidden], after the final norm: kept 2-D, as some output layers require
            # (torch.ao's dynamically quantized Linear rejects a 1-D input)
            hidden = out.last_hidden_state[:, -1]
            logprobs, entropy = token_signals(head(hidden)[0])  # [vocab]
            token_id = sample_token(logprobs, sampling.temperature, sampling.top_p, generator)
            yield TokenStep(token_id, float(logprobs[token_id]), float(entropy), hidden[0].float())
            input_ids = torch.tensor([[token_id]], dtype=torch.long)  # [1, 1]

    def _decode_static(
        self,
        decoder: StaticDecoder,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Any,
        generator: torch.Generator | None,
        cancel: threading.Event,
    ) -> Iterable[TokenStep]:
        """The static decoder's loop: one step and one read of 3 numbers per token.

        A token is yielded before the next step runs, so the step after the
        last token (eos, stop string, cancel) is never computed.
        """
        decoder.reserve(len(prompt_ids) + max_new_tokens)
        # [vocab], [greedy id, logprob, entropy], [hidden]
        logprobs, summary, state = decoder.prefill(prompt_ids)
        position = len(prompt_ids)
        for produced in range(1, max_new_tokens + 1):
            if cancel.is_set():
                raise _Cancelled
            best, best_logprob, entropy = summary.tolist()
            if sampling.temperature > 0.0:
                token_id = sample_token(logprobs, sampling.temperature, sampling.top_p, generator)
                logprob = float(logprobs[token_id])
            else:
                token_id, logprob = int(best), best_logprob
            yield TokenStep(token_id, logprob, entropy, state)
            if produced < max_new_tokens:
                logprobs, summary, state = decoder.step(token_id, position)
                position += 1
