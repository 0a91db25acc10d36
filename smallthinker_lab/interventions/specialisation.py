"""Causal specialisation: ablate a domain's hottest experts and measure perplexity on every domain's held-out text.

For each domain d: per layer, the ``m`` experts with the highest activation frequency on d's *profile* texts (the
routing of a prefill of each text, :func:`~smallthinker_lab.expert_frequency`) are ablated (``intervene(...,
ablate=...)``, route mode: the next-best experts take their tokens), and the perplexity of every domain's *held-out*
texts is measured. A diagonal (d's experts on d's text) that rises more than the off-diagonal is causal evidence of
specialisation; the control ablates ``m`` random experts per layer (uniform without replacement, one set per seed),
as many as each domain set. Profile and held-out texts are disjoint.

    result = causal_specialisation(model, m=4, seeds=(0, 1, 2))
    result.table        # ablated, domain, ppl, ratio (= ppl / unablated ppl), tokens
    result.summary()    # diagonal / off-diagonal / random ratios
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .intervene import intervene


@dataclass
class SpecialisationResult:
    """What :func:`causal_specialisation` measured; ``table`` is tidy, one row per (ablated set, evaluated domain)."""

    table: pd.DataFrame
    hot: dict[str, dict[int, list[int]]]  # domain -> layer -> the ablated experts (hottest first)
    random_sets: dict[int, dict[int, list[int]]]  # seed -> layer -> experts
    frequency: pd.DataFrame  # expert_frequency of the profile texts, per dataset (= domain)
    settings: dict = field(default_factory=dict)

    def matrix(self, value: str = "ratio") -> pd.DataFrame:
        """Rows ablated set, columns evaluated domain."""
        t = self.table
        grid = t.pivot(index="ablated", columns="domain", values=value)
        return grid.loc[list(dict.fromkeys(t["ablated"])), list(dict.fromkeys(t["domain"]))]

    def summary(self) -> pd.DataFrame:
        """Per evaluated domain: the ratio when its own hottest experts are ablated (diagonal), the mean ratio when
        another domain's are (off-diagonal), the mean and range over the random sets, and own / random."""
        t, domains = self.table, list(self.hot)
        rows = []
        for d in dict.fromkeys(t["domain"]):
            col = t[t["domain"] == d].set_index("ablated")["ratio"]
            rnd = col[[f"random (seed {s})" for s in self.random_sets]]
            own = col.get(d, float("nan"))
            others = col[[o for o in domains if o != d]]
            rows.append({"domain": d, "own_experts": own, "other_domains_mean": others.mean(),
                         "random_mean": rnd.mean(), "random_min": rnd.min(), "random_max": rnd.max(),
                         "own_over_random": own / rnd.mean()})
        return pd.DataFrame(rows)


def _encode(tokenizer, texts: Sequence[str], max_tokens: int, vocab: int) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
        ids = [int(i) for i in ids][:max_tokens]
        if len(ids) >= 2:
            if max(ids) >= vocab:
                raise ValueError(f"the tokenizer gives id {max(ids)}, outside the model's vocabulary of {vocab}")
            out.append(torch.tensor(ids))
    return out


@torch.inference_mode()
def _nll(model, seqs: list[torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL (nats, fp32 log-softmax) over every target of every sequence, and the target count."""
    total, count = 0.0, 0
    for ids in seqs:
        ids = ids.to(model.device)[None]
        logp = F.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)  # (1, T-1, V)
        total -= float(logp.gather(-1, ids[:, 1:, None]).sum())
        count += ids.shape[1] - 1
    return total, count


def causal_specialisation(model, texts: Mapping[str, Sequence[str]] | None = None, m: int = 4,
                          seeds: Sequence[int] = (0, 1, 2), n_profile: int = 50, n_eval: int = 50,
                          max_tokens: int = 256, tokenizer=None, progress: bool = True) -> SpecialisationResult:
    """The causal specialisation table of ``model`` (a SmallThinkerForCausalLM); see the module docstring.

    ``texts``: {domain: [text, ...]} (default: the four shipped prompt sets gsm8k, humaneval, wiki-en, zh-news:
    math, code, English and Chinese, :func:`~smallthinker_lab.prompt_sets.load_prompt_sets`); per domain the first
    ``n_profile`` texts choose the hottest experts and the next ``n_eval`` are the held-out texts scored (each
    truncated to ``max_tokens`` tokens, every next-token target scored). ``m``: experts ablated per layer;
    ``seeds``: one random control set per seed. Perplexity = exp(summed NLL / targets) over a domain's held-out
    texts.
    """
    from tqdm.auto import tqdm

    from ..instruments import expert_frequency, record

    cfg = model.config
    E, K, L = cfg.num_experts, cfg.top_k, cfg.num_hidden_layers
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= E - K:
        raise ValueError(f"m must be an integer in [1, {E - K}] (top_k={K} of {E} experts must remain), got {m!r}")
    for name, v in (("n_profile", n_profile), ("n_eval", n_eval), ("max_tokens", max_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "max_tokens" else 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    from ..prompt_sets import load_prompt_sets

    texts = dict(texts) if texts is not None else load_prompt_sets()
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("causal_specialisation needs a tokenizer: the model has none; pass tokenizer=")
    profile, held = {}, {}
    for d, ts in texts.items():
        ts = list(ts)
        if len(ts) < n_profile + 1:
            raise ValueError(f"domain {d!r} has {len(ts)} texts: need more than n_profile={n_profile} (the rest "
                             f"are held out)")
        profile[d] = _encode(tok, ts[:n_profile], max_tokens, cfg.vocab_size)
        held[d] = _encode(tok, ts[n_profile:n_profile + n_eval], max_tokens, cfg.vocab_size)

    # 1. the hottest experts of each domain, from the routing of its profile texts
    recs = []
    for d in tqdm(profile, desc="profile domains", disable=not progress):
        with record(model, kinds="experts", dataset=d) as rec, torch.inference_mode():
            for ids in profile[d]:
                model(ids.to(model.device)[None])
        recs.append(rec)
    from ..instruments import Recording

    freq = expert_frequency(Recording.concat(recs).to_dataframe("experts"))
    hot = {d: {i: (g.sort_values(["frequency", "expert"], ascending=[False, True])["expert"].head(m)
                   .astype(int).tolist())
               for i, g in freq[freq["dataset"] == d].groupby("layer")} for d in profile}
    random_sets = {s: {i: sorted(np.random.default_rng([s, i]).choice(E, size=m, replace=False).tolist())
                       for i in range(L)} for s in seeds}

    # 2. perplexity of every domain's held-out texts under each ablation
    conditions = [("none", None)] + [(d, hot[d]) for d in hot] + [(f"random (seed {s})", random_sets[s])
                                                                  for s in seeds]
    rows = []
    bar = tqdm(total=len(conditions) * len(held), desc="perplexity under ablations", disable=not progress)
    for label, ablate in conditions:
        for d, seqs in held.items():
            if ablate is None:
                nll, n = _nll(model, seqs)
            else:
                with intervene(model, ablate=ablate):
                    nll, n = _nll(model, seqs)
            rows.append({"ablated": label, "domain": d, "tokens": n, "nll": nll, "ppl": math.exp(nll / n)})
            bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    base = table[table["ablated"] == "none"].set_index("domain")["ppl"]
    table["ratio"] = table["ppl"] / table["domain"].map(base)
    settings = {"m": m, "seeds": list(seeds), "n_profile": n_profile, "n_eval": n_eval, "max_tokens": max_tokens,
                "ablate_mode": "route", "experts_per_layer": E, "top_k": K}
    return SpecialisationResult(table, hot, random_sets, freq, settings)
