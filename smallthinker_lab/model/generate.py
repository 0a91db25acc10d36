"""Generation: prefill and decode as separate steps, greedy or sampled, streaming.

The loop works on any ``step(ids (B, T)) -> logits (B, T, V)`` that keeps its own KV cache, so the
in-memory model and the offloading engine share it.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache


def token_ids(ids, vocab_size: int | None = None) -> torch.Tensor:
    """``ids`` (a tensor, a numpy array or a possibly nested list of ints) as an int64 tensor of the same shape.

    Token ids must be integers: a float or bool tensor or array, or a list holding a float, a bool or a string,
    raises ValueError naming the value (a float would otherwise be truncated silently). With ``vocab_size``,
    an id < 0 or >= vocab_size raises ValueError naming the id and its position.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"token ids must be integers, got a tensor of dtype {ids.dtype} "
                             f"(it would be truncated: pass an integer tensor)")
        out = ids.detach().to(dtype=torch.long)
    elif type(ids).__module__ == "numpy" and hasattr(ids, "dtype"):  # an array or a numpy scalar
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got a numpy array of dtype {ids.dtype}")
        out = torch.as_tensor(ids).to(dtype=torch.long)
    else:
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"token ids must be integers, got the string {ids!r} (encode text with a tokenizer)")
        count = 0

        def check(v) -> None:  # every leaf a Python or numpy integer (bool is an int to Python: refused)
            nonlocal count
            if isinstance(v, (list, tuple)):
                for x in v:
                    check(x)
                return
            if isinstance(v, torch.Tensor) and v.dim() == 0 and not (
                    v.dtype == torch.bool or v.dtype.is_floating_point or v.dtype.is_complex):
                count += 1
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"token ids must be integers, got {v!r} ({type(v).__name__}) at position {count}")
            count += 1

        check(ids if isinstance(ids, (list, tuple)) else [ids])
        try:
            out = torch.as_tensor(ids, dtype=torch.long)
        except (ValueError, TypeError, OverflowError, RuntimeError) as e:
            raise ValueError(f"token ids must be a list (or rectangular nested list) of integers: {e}") from None
    if vocab_size is not None and out.numel():
        bad = (out < 0) | (out >= vocab_size)
        if bool(bad.any()):
            pos = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(f"token id {int(out.reshape(-1)[pos])} at position {pos} is outside the vocabulary "
                             f"[0, {vocab_size}); token ids must be in range (got [{int(out.min())}, "
                             f"{int(out.max())}])")
    return out


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as an int >= 1, else ValueError naming the value (the in-memory model and the engine
    both refuse 0 and negatives: a generation that generates nothing is a mistake, not an empty result)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return int(max_new_tokens)


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
    max_new_tokens = check_max_new_tokens(max_new_tokens)
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
    """Yield generated token ids one at a time (batch 1). The arguments are checked when called, before any
    work: non-integer or out-of-vocabulary ids, ``max_new_tokens`` < 1 and bad sampling values raise
    ValueError, as :meth:`Engine.stream` does."""
    ids = token_ids(input_ids, model.config.vocab_size)
    if ids.dim() > 1 and ids.shape[0] != 1:
        raise ValueError(f"streaming generation takes one sequence (batch size 1), got ids of shape "
                         f"{list(ids.shape)}")
    ids = ids.reshape(1, -1).to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    stop = model.config.eos_ids() if stop_tokens is None else stop_tokens
    return stream_tokens(model_step(model, model.new_cache()), ids, max_new_tokens, sampling, stop, stats)


def generate(model, input_ids, max_new_tokens: int = 32, **kwargs) -> list[int]:
    """The generated token ids (prompt excluded), batch 1."""
    return list(stream_generate(model, input_ids, max_new_tokens, **kwargs))
