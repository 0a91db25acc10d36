"""The paper's routing phenomena on the prompt sets (expert frequency, divergence, skew, neuron sparsity) and
greedy continuations of fixed prompts."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..prompt_sets import PROMPT_SETS, domain_of, read_prompts  # noqa: F401  (read_prompts: re-exported)
from .common import COLD, CONTINUATION_PROMPTS, HOT, PAPER_HOT_BAND


# ============================================================================================ prompt sets
def profile_prompt_sets(model, tokenizer, prompts_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                        new_tokens: int = 8, limit: int | None = None, progress: bool = False):
    """One Recording (kinds experts + neurons) of every prompt of each set: prefill + ``new_tokens`` greedy tokens."""
    from ..instruments import Recording, profile

    recs = []
    for s in sets:
        texts = [r["text"] for r in read_prompts(Path(prompts_dir) / f"{s}.jsonl", limit)]
        recs.append(profile(model, texts, dataset=s, max_new_tokens=new_tokens, kinds=("experts", "neurons"),
                            tokenizer=tokenizer, progress=progress))
    return Recording.concat(recs)


def _usage_entropy(freq: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, layer): entropy of the layer's usage (frequencies normalised) / log E; 1 = uniform."""
    def h(f):
        p = f.to_numpy(dtype=float)
        p = p / p.sum() if p.sum() > 0 else p
        nz = p[p > 0]
        return float(-(nz * np.log(nz)).sum() / math.log(len(p))) if len(p) > 1 else 1.0

    return freq.groupby(["dataset", "layer"])["frequency"].apply(h).rename("entropy").reset_index()


def phenomena(rec, sets: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """The paper's figures from a Recording of the prompt sets.

    frequency: dataset, layer, expert, tokens, total_tokens, frequency (expert_frequency);
    divergence: layer, dataset_a, dataset_b, js_divergence (between sets);
    split_half: dataset, layer, js_divergence between the even and the odd prompts of one set (noise floor);
    skew: dataset, experts, cold_share (< 0.14), hot_share (>= 0.4), max_frequency, entropy (mean over layers);
    sparsity: dataset (and "all"), layer, pairs, mean, min, q1, median, q3, max (neuron_sparsity_by_layer);
    sparsity_definitions: dataset (and "all"), layer, definition (pair, expert, neuron), samples, mean, min, q1,
    median, q3, max, dead, neurons (neuron_sparsity_definitions);
    frequency_shares: dataset, normalisation (per_token, per_slot, max_normalised, per_sequence), experts,
    cold_share (< 0.14), hot_share (>= 0.4), band_share (0.4-0.6) (frequency_shares).
    """
    from ..instruments import (
        cold_expert_share,
        expert_frequency,
        expert_usage_divergence,
        frequency_normalisations,
        frequency_shares,
        hot_expert_share,
        neuron_sparsity_by_layer,
        neuron_sparsity_definitions,
    )

    experts = rec.to_dataframe("experts")
    E = experts.attrs.get("num_experts")
    freq = expert_frequency(experts, E)
    order = list(sets) if sets is not None else list(pd.unique(freq["dataset"]))
    freq = freq.assign(dataset=pd.Categorical(freq["dataset"], order)).sort_values(["dataset", "layer", "expert"])
    freq = freq.assign(dataset=freq["dataset"].astype(str)).reset_index(drop=True)
    div = expert_usage_divergence(freq)

    halves = experts.assign(dataset=experts["dataset"].astype(str) + "#" + (experts["sequence"] % 2).astype(str))
    halves.attrs.update(experts.attrs)
    hf = expert_frequency(halves, E)
    split = []
    for ds in order:
        pair = hf[hf["dataset"].isin([f"{ds}#0", f"{ds}#1"])]
        if pair["dataset"].nunique() == 2:
            d = expert_usage_divergence(pair)
            split.append(pd.DataFrame({"dataset": ds, "layer": d["layer"], "js_divergence": d["js_divergence"]}))
    split_df = (pd.concat(split, ignore_index=True) if split
                else pd.DataFrame(columns=["dataset", "layer", "js_divergence"]))

    cold = cold_expert_share(freq, COLD).set_index("dataset")
    hot = hot_expert_share(freq, HOT).set_index("dataset")
    ent = _usage_entropy(freq).groupby("dataset")["entropy"].mean()
    skew = pd.DataFrame({"experts": cold["experts"], "cold_share": cold["share"], "hot_share": hot["share"],
                         "max_frequency": freq.groupby("dataset")["frequency"].max(), "entropy": ent})
    skew = skew.reindex(order).reset_index()

    shares = frequency_shares(frequency_normalisations(experts, E), COLD, (HOT, PAPER_HOT_BAND[1]))
    shares = shares.assign(dataset=pd.Categorical(shares["dataset"], order)).sort_values("dataset", kind="stable")
    shares = shares.assign(dataset=shares["dataset"].astype(str)).reset_index(drop=True)

    neurons, counts = rec.to_dataframe("neurons"), rec.to_dataframe("neuron_counts")
    per_set = neuron_sparsity_by_layer(neurons)
    pooled = neuron_sparsity_by_layer(neurons.assign(dataset="all"))
    sparsity = pd.concat([pooled, per_set], ignore_index=True)
    definitions = pd.concat([neuron_sparsity_definitions(neurons.assign(dataset="all"), counts.assign(dataset="all")),
                             neuron_sparsity_definitions(neurons, counts)], ignore_index=True)
    return {"frequency": freq, "divergence": div, "split_half": split_df, "skew": skew, "sparsity": sparsity,
            "sparsity_definitions": definitions, "frequency_shares": shares}


# ============================================================================================ continuations
def prompt_prefix(text: str, prompt_set: str) -> str:
    """The prompt given for a continuation: code and math problems whole; a prose paragraph up to the end of its
    first sentence (at least 20 characters for Chinese, 60 for English, at most 160 / 320)."""
    domain = domain_of(prompt_set)
    if domain in ("code", "math"):
        return text
    zh = domain == "zh" or (domain is None and prompt_set.startswith("zh"))
    lo, hi = (20, 160) if zh else (60, 320)
    pattern = r"[。！？]" if zh else r"[.!?](?=\s)"
    for m in re.finditer(pattern, text):
        if lo <= m.end() <= hi:
            return text[: m.end()]
    return text[:hi]


def continuations(model, tokenizer, prompts_dir: str | Path, which: Sequence[tuple[str, int]] = CONTINUATION_PROMPTS,
                  max_new_tokens: int = 64) -> list[dict]:
    """Greedy continuations (stopping at an end-of-text token) of fixed prompts: set, id, prompt, continuation,
    new_tokens, stopped_at_eos."""
    from ..model.generate import generate

    out = []
    for s, i in which:
        recs = read_prompts(Path(prompts_dir) / f"{s}.jsonl", i + 1)
        if len(recs) <= i:
            continue
        prompt = prompt_prefix(recs[i]["text"], s)
        ids = tokenizer.encode(prompt)
        new = generate(model, ids, max_new_tokens=max_new_tokens)
        eos = set(model.config.eos_ids())
        stopped = bool(new) and new[-1] in eos
        text = tokenizer.decode(new[:-1] if stopped else new)
        out.append({"set": s, "id": recs[i].get("id", f"{s}-{i}"), "prompt": prompt, "continuation": text,
                    "new_tokens": len(new), "stopped_at_eos": stopped})
    return out
