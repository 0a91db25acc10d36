"""Generation: prefill and decode as separate steps, greedy or sampled, streaming.

The loop works on any ``step(ids (B, T)) -> logits (B, T, V)`` that keeps its own KV cache, so the
in-memory model and the offloading engine share it, and both return a :class:`GenerationResult`.
A prompt is a string (encoded with the model's tokenizer), a list of token ids or a tensor.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_cache import KVCache
from .speculative import SpeculativeStats, check_draft, speculative_tokens


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
        if self.cfg.temperature == 0:
            return torch.argmax(logits, dim=-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(-1)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a sample is drawn from: logits (..., V) -> probabilities (..., V), after temperature,
        top_k and top_p (speculative decoding compares the target's and the draft's)."""
        cfg = self.cfg
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
        return probs


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_token_seconds: list[float] = field(default_factory=list)
    speculative: SpeculativeStats | None = None  # with a draft model: acceptance and forwards

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tok_s(self) -> float:
        n = len(self.decode_token_seconds)
        return n / sum(self.decode_token_seconds) if n else float("nan")


class GenerationResult(list):
    """The generated token ids (prompt excluded), with ``text`` (None without a tokenizer), ``prompt_tokens``
    and ``stats`` (:class:`GenerationStats`: prefill and per-token decode times).

    It is the list of token ids itself (so ``tok.decode(result)``, ``result[-1]`` and ``result == [..]`` work
    as they did when generate returned a list); ``.tokens`` is a plain list copy.
    """

    def __init__(self, tokens: Sequence[int], text: str | None = None, prompt_tokens: int = 0,
                 stats: GenerationStats | None = None) -> None:
        super().__init__(int(t) for t in tokens)
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.stats = stats if stats is not None else GenerationStats(prompt_tokens, len(self))

    @property
    def tokens(self) -> list[int]:
        return list(self)

    def __repr__(self) -> str:
        head = ", ".join(map(str, self[:6])) + (", ..." if len(self) > 6 else "")
        text = "" if self.text is None else f", text={_shorten(self.text)!r}"
        st = self.stats
        times = f", prefill {st.prefill_seconds * 1e3:.1f} ms" if st.prefill_seconds else ""
        if st.decode_token_seconds:
            times += f", decode {st.decode_tok_s:.1f} tok/s"
        return f"GenerationResult({len(self)} tokens [{head}]{text}, prompt {self.prompt_tokens} tokens{times})"


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def prompt_ids(prompt: str | Sequence[int] | torch.Tensor, tokenizer: Any, device: torch.device | str = "cpu",
               owner: str = "the model") -> torch.Tensor:
    """Token ids (1, T) of a prompt: a string (encoded with ``tokenizer``), a list of ids or a tensor."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"a text prompt needs a tokenizer, and {owner} has none: pass tokenizer=..., or "
                             f"token ids instead of text")
        prompt = tokenizer(prompt)["input_ids"]
    ids = token_ids(prompt).to(device)  # integers, else ValueError (floats are not truncated)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"a prompt tensor must be (T,) or (1, T) token ids, got shape {list(ids.shape)}")
    return ids


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
        return model(ids, cache=cache).logits

    return step


def _is_engine(model) -> bool:
    """The offloading engine (not a torch module, and it streams and rolls back its own KV cache)."""
    return not isinstance(model, torch.nn.Module) and callable(getattr(model, "stream", None)) and \
        callable(getattr(model, "truncate", None))


def _tokenizer_of(model, tokenizer: Any) -> Any:
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def stream_generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                    stats: GenerationStats | None = None, tokenizer: Any = None, draft: Any = None,
                    draft_tokens: int = 4) -> Iterator[int]:
    """Yield the new token ids one by one; ``prompt`` and the keywords as in :func:`generate`. The arguments are
    checked when called, before any work: non-integer or out-of-vocabulary ids, ``max_new_tokens`` < 1 and bad
    sampling values raise ValueError, as :meth:`Engine.stream` does; a draft of another tokenizer too. An
    offloading engine as ``model`` runs its own :meth:`Engine.stream` (draft included)."""
    if _is_engine(model):
        if tokenizer is not None:
            raise ValueError("an engine encodes text with its checkpoint's tokenizer: leave tokenizer=None")
        return model.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stats, draft,
                            draft_tokens)
    if draft is not None:
        draft_tokens = check_draft(model, draft, draft_tokens)
    name = getattr(model, "name_or_path", None) or "the model"
    if isinstance(prompt, str):
        prompt = prompt_ids(prompt, _tokenizer_of(model, tokenizer), "cpu", name)
    ids = token_ids(prompt, model.config.vocab_size)
    if ids.dim() > 2:
        raise ValueError(f"a prompt tensor must be (T,) or (1, T) token ids, got shape {list(ids.shape)}")
    if ids.dim() > 1 and ids.shape[0] != 1:
        raise ValueError(f"streaming generation takes one sequence (batch size 1), got ids of shape "
                         f"{list(ids.shape)}")
    ids = ids.reshape(1, -1).to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    stop = model.config.eos_ids() if stop_tokens is None else stop_tokens
    if draft is not None:
        stats = stats if stats is not None else GenerationStats()
        stats.speculative = SpeculativeStats()
        return speculative_tokens(model, draft, ids, max_new_tokens, draft_tokens, Sampler(sampling, ids.device),
                                  stop, stats, stats.speculative)
    return stream_tokens(model_step(model, model.new_cache()), ids, max_new_tokens, sampling, stop, stats)


def generate(model, prompt, max_new_tokens: int = 32, *, tokenizer: Any = None, stats: GenerationStats | None = None,
             **sampling) -> GenerationResult:
    """Generate from ``prompt`` (a string, a list of token ids or a tensor) on the in-memory model or an
    :class:`~smallthinker_lab.Engine`; batch 1.

    Greedy by default; ``temperature``, ``top_k``, ``top_p``, ``seed`` sample, ``stop_tokens`` (default the
    config's end-of-text ids) end early. ``draft=`` a smaller model of the same tokenizer decodes speculatively
    (:mod:`.speculative`): ``draft_tokens`` proposals per round checked by one target forward; greedy tokens are the
    target's own, sampled ones follow its distribution; ``result.stats.speculative`` holds the acceptance counters.
    Text prompts are encoded, and the result decoded, with ``tokenizer``
    or the model's own (``model.tokenizer``: the one in its checkpoint folder).
    Returns a :class:`GenerationResult`: the new token ids (prompt excluded), their text and timings.
    """
    stats = stats if stats is not None else GenerationStats()
    tokens = list(stream_generate(model, prompt, max_new_tokens, stats=stats, tokenizer=tokenizer, **sampling))
    tok = _tokenizer_of(model, tokenizer)
    text = tok.decode(tokens) if tok is not None else None
    return GenerationResult(tokens, text, stats.prompt_tokens, stats)
