"""Generation: prefill and decode as separate steps, greedy or sampled, streaming.

The loop works on any ``step(ids (B, T)) -> logits (B, T, V)`` that keeps its own KV cache, so the
in-memory model and the offloading engine share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache


@dataclass
class SamplingConfig:
    """temperature 0 (the default) is greedy decoding."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, cfg: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.generator = None
        if cfg.temperature > 0:
            self.generator = torch.Generator(device=device)
            if cfg.seed is not None:
                self.generator.manual_seed(cfg.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        cfg = self.cfg
        if cfg.temperature == 0:
            return torch.argmax(logits, dim=-1)
        logits = logits.float() / cfg.temperature
        if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p is not None and cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = cum - sorted_p > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_token_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tok_s(self) -> float:
        n = len(self.decode_token_seconds)
        return n / sum(self.decode_token_seconds) if n else float("nan")


def stream_tokens(step: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor, max_new_tokens: int,
                  sampling: SamplingConfig | None = None, stop_tokens: Sequence[int] = (),
                  stats: GenerationStats | None = None) -> Iterator[int]:
    """Prefill the prompt, then decode one token at a time; yields token ids (batch 1).

    Stops after ``max_new_tokens`` or after yielding a stop token.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError("streaming generation takes one sequence (batch size 1)")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    sampler = Sampler(sampling or SamplingConfig(), input_ids.device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = input_ids.shape[1]
    stop = set(int(t) for t in stop_tokens)
    t0 = time.perf_counter()
    logits = step(input_ids)[:, -1]  # prefill: (1, V)
    token = sampler(logits)
    tok = int(token.item())
    stats.prefill_seconds = time.perf_counter() - t0
    for i in range(max_new_tokens):
        stats.new_tokens += 1
        yield tok
        if tok in stop or i == max_new_tokens - 1:
            return
        t0 = time.perf_counter()
        logits = step(token.view(1, 1))[:, -1]  # decode one token
        token = sampler(logits)
        tok = int(token.item())  # the token on the host: a step's time includes the device finishing it
        dt = time.perf_counter() - t0
        stats.decode_token_seconds.append(dt)
        stats.decode_seconds += dt


def model_step(model, cache: KVCache) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.inference_mode()
    def step(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, cache=cache)

    return step


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling ``cache``; returns the last logits (B, V)."""
    return model(input_ids, cache=cache)[:, -1]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: token (B,) or (B, 1) -> logits (B, V)."""
    return model(token.view(-1, 1), cache=cache)[:, -1]


def stream_generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                    stats: GenerationStats | None = None) -> Iterator[int]:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device)
    cache = model.new_cache()
    stop = model.config.eos_ids() if stop_tokens is None else stop_tokens
    yield from stream_tokens(model_step(model, cache), ids, max_new_tokens,
                             SamplingConfig(temperature, top_k, top_p, seed), stop, stats)


def generate(model, input_ids, max_new_tokens: int = 32, **kwargs) -> list[int]:
    """The generated token ids (prompt excluded), batch 1."""
    return list(stream_generate(model, input_ids, max_new_tokens, **kwargs))
