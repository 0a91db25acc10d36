"""Speculative decoding: a small draft model proposes k tokens, the target checks all of them in one forward.

Greedy: draft tokens are kept while each equals the target's argmax at its position, then the target's own token
follows (the correction, or a bonus token when all k were kept), so the output is the target's greedy output token for
token. That holds in fp32; in bf16 a (k+1)-token forward rounds differently from a one-token forward, so where the
target's top two logits nearly tie the outputs can part (measured: benchmarks/results/speculative.md).
Sampling: a draft token d drawn from the draft's q is kept with probability min(1, p(d) / q(d)); the first one
rejected is replaced by a draw from max(0, p - q) renormalised (the standard speculative rejection rule), so every
output token is distributed as the target's p (after the same temperature, top_k and top_p).
Both KV caches are rolled back past rejected tokens (:meth:`KVCache.truncate`). Batch 1.
The target is an in-memory model (:class:`ModelTarget` wraps it) or anything with the same four members
(``prefill``, ``score``, ``truncate``, ``length``): the offloading engine is one (``Engine.generate(draft=...)``).
Shape letters: T tokens, V vocabulary, k draft tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SpeculativeStats:
    """Counters of one speculative generation. ``reached[j]``: rounds whose draft position j was checked (every
    earlier draft token kept); ``accepted[j]``: those where it was kept too."""

    draft_tokens: int = 0
    rounds: int = 0
    target_forwards: int = 0  # decode forwards of the target (prefill not counted)
    draft_forwards: int = 0
    decode_tokens: int = 0  # tokens produced by the decode rounds (the first token comes from the prefill)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens over checked draft tokens."""
        n = sum(self.reached)
        return sum(self.accepted) / n if n else float("nan")

    def acceptance_by_position(self) -> list[float]:
        """P(draft token j kept | every earlier one kept), per draft position j."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached)]

    @property
    def tokens_per_target_forward(self) -> float:
        return self.decode_tokens / self.target_forwards if self.target_forwards else float("nan")

    @property
    def target_forwards_saved(self) -> int:
        """Decode forwards the target alone would have run (one per token) minus those it ran."""
        return self.decode_tokens - self.target_forwards

    def to_dataframe(self):
        """One row per draft position: reached, accepted, acceptance (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame({"position": range(1, len(self.reached) + 1), "reached": self.reached,
                             "accepted": self.accepted, "acceptance": self.acceptance_by_position()})


def check_draft(target: Any, draft: Any, draft_tokens: int) -> int:
    """``draft_tokens`` as an int >= 1, after checking that ``draft`` can draft for ``target``: the same vocabulary
    size and, where both have a tokenizer, the same vocabulary (token -> id); else ValueError naming both."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    names = (str(getattr(target, "name_or_path", None) or getattr(target, "checkpoint_dir", None) or "the target"),
             getattr(draft, "name_or_path", None) or "the draft")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"the draft model cannot draft for the target: they do not share a tokenizer ({names[0]} has "
                         f"vocab_size {tv}, {names[1]} has {dv}); a draft must use the target's tokenizer")
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is not None and dt is not None and tt is not dt and tt.get_vocab() != dt.get_vocab():
        raise ValueError(f"the draft model cannot draft for the target: their tokenizers differ ({names[0]} and "
                         f"{names[1]} map tokens to different ids); a draft must use the target's tokenizer")
    for i, (m, name) in enumerate(zip((target, draft), names)):
        scores = i == 0 and callable(getattr(m, "truncate", None))  # the engine: forward(all_logits=True)
        if getattr(m, "new_cache", None) is None and not scores:
            raise ValueError(f"{name} is not an in-memory model (it has no new_cache()): a draft is a load_model() "
                             f"model; the target a load_model() model or an Engine")
        cfg = m.config
        if any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)) and draft_tokens + 1 > cfg.sliding_window_size:
            raise ValueError(f"draft_tokens={draft_tokens}: a round writes draft_tokens + 1 positions, more than the "
                             f"sliding window ({cfg.sliding_window_size}) of {name} can roll back")
    return draft_tokens


def _normalised(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum()


class ModelTarget:
    """An in-memory model as the target of speculative decoding, over a KV cache of its own: ``prefill`` (the
    logits (V,) of a prompt's last position), ``score`` (the logits (T, V) of every position of T new tokens,
    keeping what :meth:`truncate` needs to roll them back), ``truncate`` and ``length`` (positions cached)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache = model, model.new_cache()
        self._saved: list | None = None

    @property
    def length(self) -> int:
        return self.cache.seq_len

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._saved = None
        return self.model(input_ids, cache=self.cache).logits[0, -1]  # (V,)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._saved = self.cache.save_overwritable(input_ids.shape[1])
        return self.model(input_ids, cache=self.cache).logits[0]  # (T, V)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length, self._saved)


@torch.inference_mode()
def speculative_tokens(target: Any, draft: Any, input_ids: torch.Tensor, max_new_tokens: int, draft_tokens: int,
                       sampler: Any, stop_tokens: Sequence[int] = (), stats: Any = None,
                       spec: SpeculativeStats | None = None) -> Iterator[int]:
    """Yield the new token ids (batch 1) of ``target`` decoding ``input_ids`` (1, T) with ``draft`` proposing
    ``draft_tokens`` per round. ``target``: an in-memory model or an object with :class:`ModelTarget`'s members
    (it starts empty); ``sampler``: a :class:`~.generate.Sampler` (temperature 0: greedy); ``stats``: a
    GenerationStats filled with times; ``spec``: a SpeculativeStats filled with the counters."""
    k_max = draft_tokens
    spec = spec if spec is not None else SpeculativeStats()
    spec.draft_tokens, spec.reached, spec.accepted = k_max, [0] * k_max, [0] * k_max
    greedy = sampler.cfg.temperature == 0
    gen = sampler.generator
    stop = {int(t) for t in stop_tokens}
    dev = input_ids.device
    tgt = target if callable(getattr(target, "score", None)) else ModelTarget(target)
    dcache = draft.new_cache()

    def pick(logits: torch.Tensor) -> int:  # the target's own choice at one position: logits (V,)
        return int(torch.argmax(logits)) if greedy else int(torch.multinomial(sampler.probs(logits), 1, generator=gen))

    t0 = time.perf_counter()
    logits = tgt.prefill(input_ids)  # (V,)
    draft(input_ids, cache=dcache)
    seq = input_ids[0].tolist()
    tok = pick(logits)
    seq.append(tok)
    if stats is not None:
        stats.prompt_tokens = input_ids.shape[1]
        stats.prefill_seconds = time.perf_counter() - t0
        stats.new_tokens += 1
    yield tok
    new = 1
    while new < max_new_tokens and tok not in stop:
        t0 = time.perf_counter()
        k = min(k_max, max_new_tokens - new - 1)  # a round gives at most k + 1 tokens
        base = tgt.length  # == len(seq) - 1: the last token is not in the target's cache yet
        proposals: list[int] = []
        qs: list[torch.Tensor] = []
        if k:
            pending = seq[dcache.seq_len:]  # committed tokens the draft has not seen (1, or 2 after a full accept)
            dsaved = dcache.save_overwritable(len(pending) + k - 1)
            x = torch.tensor([pending], device=dev)
            for j in range(k):
                dl = draft(x, cache=dcache).logits[0, -1]  # (V,)
                if greedy:
                    d = int(torch.argmax(dl))
                else:
                    q = _normalised(sampler.probs(dl))
                    d = int(torch.multinomial(q, 1, generator=gen))
                    qs.append(q)
                proposals.append(d)
                if j < k - 1:
                    x = torch.tensor([[d]], device=dev)
            spec.draft_forwards += k
        tl = tgt.score(torch.tensor([[seq[-1], *proposals]], device=dev))  # (k+1, V)
        spec.target_forwards += 1
        n = 0
        nxt = None
        for j, d in enumerate(proposals):
            spec.reached[j] += 1
            if greedy:
                best = int(torch.argmax(tl[j]))
                ok = best == d
            else:
                p = _normalised(sampler.probs(tl[j]))
                ok = float(torch.rand((), generator=gen)) * float(qs[j][d]) < float(p[d])  # u < p(d) / q(d)
            if not ok:
                if greedy:
                    nxt = best
                else:
                    resid = torch.clamp(p - qs[j], min=0.0)
                    nxt = int(torch.multinomial(resid if float(resid.sum()) > 0 else p, 1, generator=gen))
                break
            spec.accepted[j] += 1
            n += 1
        if nxt is None:
            nxt = pick(tl[len(proposals)])  # every draft token kept: the target's bonus token
        out = [*proposals[:n], nxt]
        for i, t in enumerate(out):  # end at a stop token
            if t in stop:
                out = out[:i + 1]
                break
        tgt.truncate(base + len(out))  # keeps seq[-1] and the kept drafts; the last token is pending
        if k:
            dcache.truncate(min(dcache.seq_len, base + len(out)), dsaved)
        seq.extend(out)
        spec.rounds += 1
        spec.decode_tokens += len(out)
        dt = time.perf_counter() - t0
        for t in out:
            if stats is not None:
                stats.new_tokens += 1
                stats.decode_token_seconds.append(dt / len(out))
                stats.decode_seconds += dt / len(out)
            yield t
        new += len(out)
        tok = out[-1]


def layer_draft(model: Any, num_layers: int) -> Any:
    """A draft made of ``model``'s first ``num_layers`` layers, its final norm and its head (early exit), sharing
    the model's tensors (no memory of its own) and its tokenizer: a draft for any model, trained or not, whose
    acceptance says how much of the next-token choice the first layers already make."""
    cfg = model.config
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= cfg.num_hidden_layers:
        raise ValueError(f"num_layers must be an integer in [1, {cfg.num_hidden_layers}], got {num_layers!r}")
    per_layer = {key: getattr(cfg, key)[:num_layers] for key in ("rope_layout", "sliding_window_layout", "layer_types")
                 if key in cfg.__dataclass_fields__ and getattr(cfg, key) is not None}
    small = cfg.replace(num_hidden_layers=num_layers, **per_layer)
    with torch.device("meta"):
        draft = type(model)(small)
    keep = set(draft.state_dict())
    draft.load_state_dict({n: t for n, t in model.state_dict().items() if n in keep}, strict=True, assign=True)
    if small.tie_word_embeddings:
        draft.lm_head.weight = draft.model.embed_tokens.weight
    draft.model.rotary = model.model.rotary
    draft.name_or_path = f"{getattr(model, 'name_or_path', None) or 'model'} (first {num_layers} layers)"
    draft.tokenizer = getattr(model, "tokenizer", None)
    return draft.eval()
