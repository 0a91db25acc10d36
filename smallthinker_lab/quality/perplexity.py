"""Held-out perplexity per domain with sliding windows, against a unigram baseline of the domain's train text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .common import DOMAINS


# ============================================================================================ perplexity
def window_plan(n_tokens: int, window: int, stride: int) -> tuple[int, list[tuple[int, int]]]:
    """Sliding windows over a stream of ``n_tokens``: (W, [(begin, done)]).

    A window feeds tokens[begin : begin + W] and predicts tokens[begin + 1 : begin + W + 1]; it scores the targets
    with index in (done, begin + W], so that every target 1 .. n_tokens - 1 is scored exactly once. Windows start
    every ``stride`` tokens; the last one is moved back to end at the last token, so all have length W.
    """
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    W = min(window, n_targets)
    plan, done, k = [], 0, 0
    while done < n_targets:
        begin = min(k * stride, n_targets - W)
        plan.append((begin, done))
        done, k = begin + W, k + 1
    return W, plan


def perplexity(model, tokens: np.ndarray, window: int = 512, stride: int = 256, batch_size: int = 4,
               progress: bool = False, desc: str = "perplexity") -> dict[str, float]:
    """Token-level perplexity of ``model`` on the stream ``tokens`` with sliding windows (:func:`window_plan`).

    Returns {tokens (targets scored), nll (summed, nats), ce (mean), ppl = exp(ce), windows, window, stride}.
    Runs the model's own forward in its dtype; log-softmax in fp32.
    """
    import torch
    import torch.nn.functional as F

    tokens = np.asarray(tokens, dtype=np.int64)
    window = min(window, model.config.max_position_embeddings)
    W, plan = window_plan(len(tokens), window, min(stride, window))
    it = range(0, len(plan), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="batch", leave=False)
    nll, count = 0.0, 0
    device = model.device
    with torch.inference_mode():
        for i in it:
            chunk = plan[i: i + batch_size]
            x = torch.from_numpy(np.stack([tokens[b: b + W + 1] for b, _ in chunk])).to(device)  # (B, W + 1)
            logits = model(x[:, :-1]).logits  # (B, W, V)
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, W)
            first = torch.tensor([d - b for b, d in chunk], device=device)[:, None]  # first scored position
            mask = torch.arange(W, device=device)[None, :] >= first
            nll -= float(logp[mask].sum())
            count += int(mask.sum())
    ce = nll / count
    return {"tokens": count, "nll": nll, "ce": ce, "ppl": math.exp(ce), "windows": len(plan), "window": W,
            "stride": min(stride, window)}


def unigram_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token counts (V,) of a token file or array."""
    a = np.asarray(tokens)
    if a.size and int(a.max()) >= vocab_size:
        raise ValueError(f"token id {int(a.max())} is outside the vocabulary of {vocab_size}")
    return np.bincount(a.astype(np.int64, copy=False), minlength=vocab_size)


def unigram_perplexity(counts: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Perplexity of the add-one-smoothed unigram p(t) = (count(t) + 1) / (N + V) on targets tokens[1:]
    (the targets :func:`perplexity` scores). Returns {tokens, ce, ppl}."""
    counts = np.asarray(counts, dtype=np.float64)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))
    targets = np.asarray(tokens, dtype=np.int64)[1:]
    ce = float(-logp[targets].mean())
    return {"tokens": int(len(targets)), "ce": ce, "ppl": math.exp(ce)}


def _tokens(path: Path, cap: int | None) -> np.ndarray:
    a = np.memmap(path, dtype=np.uint16, mode="r")
    return np.asarray(a[:cap] if cap else a, dtype=np.int64)


def domain_perplexity(model, tokens_dir: str | Path, domains: Sequence[str] = DOMAINS, max_tokens: int | None = 50_000,
                      window: int = 512, stride: int = 256, batch_size: int = 4, progress: bool = False,
                      unigram: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per domain: the model's perplexity on ``{domain}.val.bin`` and the unigram baseline's (counts of
    ``{domain}.bin``, cached in ``unigram`` when a dict is given). Columns: domain, val_tokens (in the file),
    tokens (targets scored), window, stride, ce, ppl, unigram_ce, unigram_ppl."""
    tokens_dir = Path(tokens_dir)
    V = model.config.vocab_size
    rows = []
    for d in domains:
        val_path = tokens_dir / f"{d}.val.bin"
        if not val_path.exists():
            continue
        val = _tokens(val_path, max_tokens)
        n_file = len(np.memmap(val_path, dtype=np.uint16, mode="r"))
        if unigram is not None and d in unigram:
            counts = unigram[d]
        else:
            counts = unigram_counts(np.memmap(tokens_dir / f"{d}.bin", dtype=np.uint16, mode="r"), V)
            if unigram is not None:
                unigram[d] = counts
        m = perplexity(model, val, window, stride, batch_size, progress, desc=f"perplexity {d}")
        u = unigram_perplexity(counts, val)
        assert u["tokens"] == m["tokens"]
        rows.append({"domain": d, "val_tokens": n_file, "tokens": m["tokens"], "window": m["window"],
                     "stride": m["stride"], "ce": m["ce"], "ppl": m["ppl"], "unigram_ce": u["ce"],
                     "unigram_ppl": u["ppl"]})
    return pd.DataFrame(rows)
