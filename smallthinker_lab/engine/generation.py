"""Generation on the engine: prompts to token ids, the token stream, and one generation at a time per engine (a
generation belongs to the thread that started it until it ends; another thread meanwhile gets EngineBusy).

Speculative decoding with the engine as target (``draft=`` an in-memory model of the same tokenizer): the rounds of
:func:`~smallthinker_lab.model.speculative.speculative_tokens`, each draft checked by one
``forward(all_logits=True)`` of k + 1 positions, rejected positions rolled back with :meth:`truncate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing

import torch

from ..model.generate import (
    GenerationResult,
    GenerationStats,
    Sampler,
    SamplingConfig,
    check_max_new_tokens,
    stream_tokens,
    token_ids,
)
from ..model.speculative import SpeculativeStats, check_draft, speculative_tokens


class EngineBusy(RuntimeError):
    """Another thread is generating (or running a forward) on this engine: one engine serves one generation at a
    time. Wait for it to finish, or open a second engine (each has its own cache and KV cache)."""

class _EngineTarget:
    """The engine as the target of speculative decoding (the members of model/speculative.py's ModelTarget) over
    its own KV cache: a prompt's prefill, a verification as one forward(all_logits=True), a rollback truncate()."""

    def __init__(self, engine, step) -> None:
        self.engine, self.step = engine, step

    @property
    def length(self) -> int:
        return self.engine.kv.seq_len

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids)[0, -1]  # (V,)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids, True)[0]  # (T, V)

    def truncate(self, length: int) -> None:
        self.engine.truncate(length)


class EngineGeneration:
    """``encode``, ``stream``, ``generate`` and ``truncate``; mixed into Engine."""

    def truncate(self, length: int) -> None:
        """Roll the KV cache back to its first ``length`` positions, as if the later ones had never been run
        (speculative decoding drops rejected draft tokens so). Any length down to the start of the last
        ``forward(all_logits=True)`` works: that forward kept the sliding-window entries it overwrote; further back
        only while no sliding-window layer has dropped a position it would need (else ValueError). The positions
        dropped count in ``stats()["rolled_back_tokens"]``; the expert cache keeps what it loaded."""
        self._check_open()
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"length must be an integer, got {length!r}")
        with self._lock:
            self._refuse_other_thread(threading.get_ident(), "truncate()")
        n = self.kv.seq_len
        if not 0 <= length <= n:
            raise ValueError(f"cannot truncate the KV cache of {n} positions to {length}: length must be in [0, {n}]")
        if length == n:
            return
        if self.decoder is not None:
            self.decoder.flush()  # a deferred kernel step is counted before the cache changes
        rb = self._rollback
        saved = rb[1] if rb is not None and rb[0] <= length else None
        if saved is None:
            full = sorted({layer.window for layer in self.kv.layers if layer.window is not None and n > layer.window})
            if full:
                since = f"the last forward(all_logits=True) started at {rb[0]}" if rb is not None else \
                    "no forward(all_logits=True) kept the entries it overwrote"
                raise ValueError(f"cannot truncate the KV cache of {n} positions to {length}: its sliding-window "
                                 f"layers (window {full[0]}) no longer hold positions the shorter sequence needs, "
                                 f"and {since}; truncate at most back to the start of the last "
                                 f"forward(all_logits=True)")
        self.kv.truncate(length, saved)
        self.state.counters.phases["rolled_back_tokens"] += n - length

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
               stats: GenerationStats | None = None, draft=None, draft_tokens: int = 4) -> Iterator[int]:
        """Yield generated token ids one at a time (batch 1). Checks the prompt before any work. ``draft``: an
        in-memory model of the same tokenizer proposing ``draft_tokens`` per round (speculative decoding; greedy
        tokens are the engine's own, sampled ones follow its distribution; ``stats.speculative`` counts)."""
        if draft is not None:
            draft_tokens = check_draft(self, draft, draft_tokens)
            if draft.device != self.device:
                raise ValueError(f"the draft is on {draft.device} and the engine on {self.device}: load the draft "
                                 f"on the engine's device")
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
        if sampling.temperature != 0 and self.state.lm_head_format == "screened":
            raise ValueError("lm_head_format='screened' computes only the rows that can be the argmax exactly: it "
                             "serves greedy decoding (temperature=0); open the engine with another lm_head_format "
                             "to sample")
        stop = self.config.eos_ids() if stop_tokens is None else stop_tokens
        return self._stream(ids, max_new_tokens, sampling, stop, stats, draft, draft_tokens)

    def _stream(self, ids, max_new_tokens, sampling, stop, stats, draft=None, draft_tokens=0) -> Iterator[int]:
        thread = threading.get_ident()
        with self._lock:
            self._refuse_other_thread(thread, "generate()/stream()")
            self._owner = thread
            self._generation += 1
            me = self._generation
        try:
            self.kv.reset()
            self._rollback = None
            self.cache.drain()

            def step(x: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
                if self._generation != me:
                    raise RuntimeError("this generation was superseded by a newer generate()/stream() on the engine")
                return self.forward(x, all_logits)

            if draft is not None:
                stats = stats if stats is not None else GenerationStats()
                stats.speculative = SpeculativeStats()
                it = speculative_tokens(_EngineTarget(self, step), draft, ids.to(self.device), max_new_tokens,
                                        draft_tokens, Sampler(sampling, self.device), stop, stats, stats.speculative)
            elif sampling.temperature == 0 and self.decoder is not None and self.decoder.pipelines():
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
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                 draft=None, draft_tokens: int = 4, stats: GenerationStats | None = None) -> GenerationResult:
        """Generate and return the tokens (prompt excluded), their text when a tokenizer exists, and timings;
        ``draft``/``draft_tokens`` as in :meth:`stream` (``result.stats.speculative``: acceptance and forwards)."""
        stats = stats if stats is not None else GenerationStats()
        tokens = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stats,
                                  draft, draft_tokens))
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, stats.prompt_tokens, stats)
