"""Neuron sparsity of the routed ReGLU experts under three definitions, with the dead neurons apart.

What a recording holds is, per layer, one 0/1 matrix: a row per routed (token, expert) pair, a column per neuron of
the expert, 1 where relu(gate) = 0 (the neuron's up and down rows do not contribute). The three readings of
"neuron sparsity" summarise that matrix along different axes:

- per pair: one row's share of inactive neurons (the share of the expert's neurons that are off for one token);
- per expert: the mean of that over the expert's routed tokens;
- per neuron: one column's share, i.e. for one neuron the share of its expert's routed tokens for which it is
  inactive. The reading that fits the paper's Figure 6 caption ("most neurons ... exhibit sparsity levels
  exceeding 0.6").

Weighted by routed tokens the three have the same mean (the share of zeros in the matrix); their spread differs,
and so do their medians: a row mixes the expert's always-on and rarely-on neurons into one share near the mean,
while the columns keep them apart, so the per-neuron distribution is as wide as the neurons' behaviours are.

A dead neuron is a neuron of an expert that some token reached but that was active for none of them: its
per-neuron sparsity is 1 by construction. The per-neuron rows say ``dead``; the summaries leave dead neurons out
of the per-neuron distribution and count them in a column of their own.

Inputs are the tidy frames of a Recording with kind "neurons": ``rec.to_dataframe("neurons")`` (one row per
routed pair: dataset, layer, expert, inactive, ffn, sparsity, ...) and ``rec.to_dataframe("neuron_counts")`` (one
row per (dataset, layer, expert, neuron): active, tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFINITIONS = ("pair", "expert", "neuron")
SUMMARY_COLUMNS = ("definition", "samples", "mean", "min", "q1", "median", "q3", "max", "dead", "neurons")


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what} needs the columns {list(columns)}; missing {missing} (columns: {list(df.columns)})")


def neuron_sparsity_by_layer(neurons_df: pd.DataFrame) -> pd.DataFrame:
    """Distribution of neuron sparsity (share of a routed expert's neurons with relu(gate) <= 0) per (dataset, layer).

    Columns: dataset, layer, pairs (routed token-expert pairs), mean, min, q1, median, q3, max.
    The paper: median above 0.6 in every layer, 0.9-1.0 in the first layers.
    """
    g = neurons_df.groupby(["dataset", "layer"])["sparsity"]
    out = pd.DataFrame({"pairs": g.size(), "mean": g.mean(), "min": g.min(), "q1": g.quantile(0.25),
                        "median": g.median(), "q3": g.quantile(0.75), "max": g.max()})
    return out.reset_index()


def neuron_sparsity_by_expert(neurons_df: pd.DataFrame) -> pd.DataFrame:
    """Mean sparsity per (dataset, layer, expert) over its routed tokens: dataset, layer, expert, tokens, sparsity."""
    g = neurons_df.groupby(["dataset", "layer", "expert"])["sparsity"]
    return pd.DataFrame({"tokens": g.size(), "sparsity": g.mean()}).reset_index()


def neuron_sparsity_by_neuron(counts_df: pd.DataFrame) -> pd.DataFrame:
    """Per-neuron sparsity: for each neuron, the share of its expert's routed tokens for which relu(gate) = 0.

    ``counts_df``: ``rec.to_dataframe("neuron_counts")`` (or any frame with dataset, layer, expert, neuron,
    active, tokens; rows with the same key are summed, so ``counts_df.assign(dataset="all")`` pools datasets).
    Experts that no token reached have no defined sparsity and are left out. One row per (dataset, layer,
    expert, neuron): tokens (routed to the expert), active (of those, tokens with gate > 0), sparsity = 1 -
    active / tokens, dead (active for none of them).
    """
    keys = ["dataset", "layer", "expert", "neuron"]
    _require(counts_df, keys + ["active", "tokens"], "neuron_sparsity_by_neuron")
    df = counts_df.groupby(keys, sort=True)[["active", "tokens"]].sum().reset_index()
    if (df["active"] > df["tokens"]).any() or (df["active"] < 0).any():
        raise ValueError("neuron counts are inconsistent: a neuron is active for more tokens than its expert got")
    df = df[df["tokens"] > 0].reset_index(drop=True)
    out = df[keys + ["tokens", "active"]].copy()
    out["sparsity"] = 1.0 - df["active"] / df["tokens"]
    out["dead"] = df["active"] == 0
    return out


def neuron_sparsity_by_pair(neurons_df: pd.DataFrame) -> pd.DataFrame:
    """Per-pair sparsity: for each routed (token, expert) pair, the share of the expert's neurons with
    relu(gate) = 0. ``neurons_df``: ``rec.to_dataframe("neurons")``; returned as it is with the columns dataset,
    sequence, step, position, layer, expert, inactive, ffn, sparsity (checked, not recomputed)."""
    _require(neurons_df, ["dataset", "layer", "expert", "inactive", "ffn", "sparsity"], "neuron_sparsity_by_pair")
    return neurons_df


def _stats(values: pd.Series) -> dict[str, float]:
    if len(values) == 0:
        return {"samples": 0, "mean": np.nan, "min": np.nan, "q1": np.nan, "median": np.nan, "q3": np.nan,
                "max": np.nan}
    return {"samples": int(len(values)), "mean": float(values.mean()), "min": float(values.min()),
            "q1": float(values.quantile(0.25)), "median": float(values.median()), "q3": float(values.quantile(0.75)),
            "max": float(values.max())}


def neuron_sparsity_definitions(neurons_df: pd.DataFrame, counts_df: pd.DataFrame,
                                by: Sequence[str] = ("dataset", "layer")) -> pd.DataFrame:
    """The three definitions side by side: one row per (*by, definition), definition in ("pair", "expert",
    "neuron").

    Columns: *by, definition, samples (routed pairs / experts reached by a token / live neurons of those
    experts), mean, min, q1, median, q3, max (of the definition's values), dead (neurons of reached experts
    never active; left out of the "neuron" values), neurons (all neurons of reached experts). Pass frames with
    ``dataset="all"`` assigned to pool the datasets (the per-neuron counts are then summed before dividing).
    """
    by = [by] if isinstance(by, str) else list(by)
    bad = [c for c in by if c not in ("dataset", "layer", "expert")]
    if bad:
        raise ValueError(f"by= takes dataset, layer and expert, got {bad}")
    pairs = neuron_sparsity_by_pair(neurons_df)
    experts = neuron_sparsity_by_expert(pairs)
    neurons = neuron_sparsity_by_neuron(counts_df)
    groups: dict[tuple, dict[str, pd.Series]] = {}
    for name, df in (("pair", pairs), ("expert", experts), ("neuron", neurons)):
        if name == "neuron":
            for key, g in df.groupby(by, sort=True):
                key = key if isinstance(key, tuple) else (key,)
                slot = groups.setdefault(key, {})
                slot["neuron"] = g.loc[~g["dead"], "sparsity"]
                slot["_dead"], slot["_neurons"] = int(g["dead"].sum()), len(g)
        else:
            for key, g in df.groupby(by, sort=True):
                groups.setdefault(key if isinstance(key, tuple) else (key,), {})[name] = g["sparsity"]
    rows = []
    for key in sorted(groups):
        slot = groups[key]
        for name in DEFINITIONS:
            rows.append({**dict(zip(by, key)), "definition": name,
                         **_stats(slot.get(name, pd.Series(dtype=float))),
                         "dead": slot.get("_dead", 0), "neurons": slot.get("_neurons", 0)})
    return pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])


def dead_neurons(counts_df: pd.DataFrame, by: Sequence[str] = ("dataset", "layer")) -> pd.DataFrame:
    """Dead neurons (in an expert that some token reached, active for none of its tokens) per ``by``.

    Columns: *by, neurons (of reached experts), dead, share = dead / neurons, unreached_experts (experts no token
    reached: their neurons are neither dead nor alive here).
    """
    by = [by] if isinstance(by, str) else list(by)
    per = neuron_sparsity_by_neuron(counts_df)
    g = per.groupby(by, sort=True)
    out = pd.DataFrame({"neurons": g.size(), "dead": g["dead"].sum().astype(int)})
    out["share"] = out["dead"] / out["neurons"]
    ex = counts_df.groupby([*by, "expert"])["tokens"].max().groupby(by).apply(lambda s: int((s == 0).sum()))
    out["unreached_experts"] = ex.reindex(out.index).fillna(0).astype(int)
    return out.reset_index()


def chance_recording(config, prompts: dict[str, Sequence], seed: int = 0, max_new_tokens: int = 8, tokenizer=None,
                     progress: bool = False):
    """A Recording (kind "neurons") of the random initialisation of ``config`` (``init_weights(seed)``, as the
    trainer starts) over ``prompts`` ({dataset: prompts, as :func:`~smallthinker_lab.instruments.profile` takes
    them}): the sparsity that chance gives, to draw beside a trained model's."""
    from ..model import SmallThinkerForCausalLM
    from .profile import profile
    from .recording import Recording

    model = SmallThinkerForCausalLM(config).init_weights(seed=seed).eval()
    return Recording.concat([profile(model, ps, dataset=name, max_new_tokens=max_new_tokens, kinds=("neurons",),
                                     tokenizer=tokenizer, progress=progress) for name, ps in prompts.items()])
