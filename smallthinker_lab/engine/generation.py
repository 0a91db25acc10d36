"""Generation on the engine: prompts to token ids, the token stream, and one generation at a time per engine (a
generation belongs to the thread that started it until it ends; another thread meanwhile gets EngineBusy)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing

import torch

from ..model.generate import (
    GenerationResult,
    GenerationStats,
    SamplingConfig,
    check_max_new_tokens,
    stream_tokens,
    token_ids,
)


class EngineBusy(RuntimeError):
    """Another thread is generating (or running a forward) on this engine: one engine serves one generation at a
    time. Wait for it to finish, or open a second engine (each has its own cache and KV cache)."""

class EngineGeneration:
    """``encode``, ``stream`` and ``generate``; mixed into Engine."""

    def encode(self, prompt) -> torch.Tensor:
        """Token ids (1, T) of a str (needs a tokenizer), a list of ids or a tensor."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"a text prompt needs a tokenizer, and {self.checkpoint_dir} has none "
                                 f"(tokenizer.json or vocab.json + merges.txt): pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = prompt
        return token_ids(ids, self.config.vocab_size).reshape(1, -1)  # integers in the vocabulary, else ValueError

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
               stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time (batch 1). Checks the prompt before any work."""
        ids = self.encode(prompt)
        self._check_open()
        n = ids.shape[1]
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        max_new_tokens = check_max_new_tokens(max_new_tokens)  # an int >= 1, as the in-memory generate
        if n + max_new_tokens - 1 > self.max_context:
            raise ValueError(f"prompt too long: {n} prompt tokens + {max_new_tokens} new tokens need "
                             f"{n + max_new_tokens - 1} positions, more than max_context={self.max_context} "
                             f"(open the engine with a larger max_context, or shorten the prompt)")
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        stop = self.config.eos_ids() if stop_tokens is None else stop_tokens
        return self._stream(ids, max_new_tokens, sampling, stop, stats)

    def _stream(self, ids, max_new_tokens, sampling, stop, stats) -> Iterator[int]:
        thread = threading.get_ident()
        with self._lock:
            self._refuse_other_thread(thread, "generate()/stream()")
            self._owner = thread
            self._generation += 1
            me = self._generation
        try:
            self.kv.reset()
            self.cache.drain()

            def step(x: torch.Tensor) -> torch.Tensor:
                if self._generation != me:
                    raise RuntimeError("this generation was superseded by a newer generate()/stream() on the engine")
                return self.forward(x)

            if sampling.temperature == 0 and self.decoder is not None and self.decoder.pipelines():
                it = self._stream_ahead(ids.to(self.device), max_new_tokens, stop, stats, me)
            else:
                it = stream_tokens(step, ids.to(self.device), max_new_tokens, sampling, stop, stats)
            try:
                yield from it
            finally:
                it.close()
                if self._generation == me and not self._closed:
                    self.cache.drain()
                    if self.decoder is not None:
                        self.decoder.flush()
        finally:
            with self._lock:
                if self._generation == me:
                    self._owner = None

    def _stream_ahead(self, ids, max_new_tokens: int, stop, stats, me: int) -> Iterator[int]:
        """Greedy generation through the decode kernels, the device one step ahead of the host
        (``KernelDecoder.decode_ahead``); the same tokens and the same counters as ``stream_tokens`` over
        ``forward``, with the same timing of each step (from resuming to its token on the host)."""
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = ids.shape[1]
        stop = {int(t) for t in stop}
        t0 = time.perf_counter()
        token = torch.argmax(self.forward(ids)[:, -1], dim=-1)  # the prefill, as stream_tokens
        tok = int(token.item())
        stats.prefill_seconds = time.perf_counter() - t0
        stats.new_tokens += 1
        yield tok
        if tok in stop or max_new_tokens == 1:
            return

        def check():
            if self._generation != me:
                raise RuntimeError("this generation was superseded by a newer generate()/stream() on the engine")

        with closing(self.decoder.decode_ahead(token, max_new_tokens - 1, stop, check)) as steps:
            for tok, dt in steps:
                stats.new_tokens += 1
                stats.decode_token_seconds.append(dt)
                stats.decode_seconds += dt
                yield tok

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None) -> GenerationResult:
        """Generate and return the tokens (prompt excluded), their text when a tokenizer exists, and timings."""
        stats = GenerationStats()
        tokens = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stats))
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, stats.prompt_tokens, stats)
