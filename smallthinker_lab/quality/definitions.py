"""The card's pieces on the definitions behind two of the paper's figures: neuron sparsity read per routed pair,
per expert and per neuron (with the random initialisation as chance), and activation frequency under several
normalisations (with the cap that per-token frequencies put on the hot share)."""

from __future__ import annotations

import pandas as pd

from .common import (
    COLD,
    HOT,
    PAPER_21B,
    PAPER_HOT,
    PAPER_HOT_BAND,
    PAPER_SPARSITY_MEDIAN,
    _table,
    fmt_int,
    fmt_range,
    fmt_share,
    fmt_sparsity,
)

NORMALISATION_NAMES = {"per_token": "per token (the paper's definition as read here)",
                       "per_slot": "per routed slot (per token / k)",
                       "max_normalised": "relative to the layer's hottest expert",
                       "per_sequence": "per sequence (used at least once)"}
DEFINITION_NAMES = {"pair": "per pair", "expert": "per expert", "neuron": "per neuron"}


def hot_cap(top_k: int, num_experts: int, threshold: float = HOT) -> float:
    from ..instruments import hot_share_cap

    return hot_share_cap(top_k, num_experts, threshold)


def medians(defs: pd.DataFrame | None, definition: str, dataset: str = "all") -> pd.Series:
    """Per-layer medians of one definition (index: layer); empty when the table is missing."""
    if defs is None or not len(defs):
        return pd.Series(dtype=float)
    d = defs[(defs["dataset"] == dataset) & (defs["definition"] == definition)]
    return d.set_index("layer")["median"].sort_index()


def _dead(defs: pd.DataFrame) -> pd.DataFrame:
    d = defs[(defs["dataset"] == "all") & (defs["definition"] == "neuron")]
    return d.set_index("layer")[["dead", "neurons"]].sort_index()


def _span(s: pd.Series) -> str:
    return f"{fmt_sparsity(s.min())}-{fmt_sparsity(s.max())}"


def sparsity_finding(m, baseline: pd.DataFrame | None, baseline_label: str) -> str | None:
    """The per-neuron reading against the paper and against chance; None without the definitions table."""
    neuron = medians(m.sparsity_definitions, "neuron")
    if not len(neuron):
        return None
    n_at = int((neuron >= PAPER_SPARSITY_MEDIAN).sum())
    dead = _dead(m.sparsity_definitions)
    text = (f"Neuron sparsity, per-neuron reading (the paper's Figure 6): median per layer {_span(neuron)}, at or "
            f"above {PAPER_SPARSITY_MEDIAN} in {n_at} of {len(neuron)} layers (the paper: above it in every layer)")
    base = medians(baseline, "neuron")
    if len(base):
        gain = (neuron - base.reindex(neuron.index)).dropna()
        text += (f"; the {baseline_label} of the same config gives {_span(base)}, so training moves the medians by "
                 f"{gain.min():+.3f} to {gain.max():+.3f}")
    pair, expert = medians(m.sparsity_definitions, "pair"), medians(m.sparsity_definitions, "expert")
    text += (f". Per routed pair the medians are {_span(pair)}, per expert {_span(expert)}. "
             f"{fmt_int(dead['dead'].sum())} of {fmt_int(dead['neurons'].sum())} neurons of routed experts "
             f"({fmt_share(dead['dead'].sum() / max(1, dead['neurons'].sum()))}) were never active on the prompt "
             f"sets (dead; left out of the per-neuron boxes).")
    return text


def _band_means(m) -> pd.DataFrame:
    fs = m.frequency_shares
    return fs.groupby("normalisation", sort=False)[["cold_share", "hot_share", "band_share"]].agg(["mean", "min",
                                                                                                   "max"])


def frequency_finding(m, top_k: int, num_experts: int) -> str | None:
    """The hot-share cap and which normalisation reproduces the paper's 20-30% at 0.4-0.6; None without data."""
    if m.frequency_shares is None or not len(m.frequency_shares):
        return None
    cap, cap21 = hot_cap(top_k, num_experts), hot_cap(PAPER_21B["top_k"], PAPER_21B["num_experts"])
    bm = _band_means(m)
    lo, hi = PAPER_HOT_BAND
    parts = [f"{NORMALISATION_NAMES[n].split(' (')[0]} {fmt_share(bm.loc[n, ('band_share', 'mean')])}"
             for n in bm.index]
    inside = [n for n in bm.index if PAPER_HOT[0] <= bm.loc[n, ("band_share", "mean")] <= PAPER_HOT[1]]
    best = min(bm.index, key=lambda n: abs(bm.loc[n, ("band_share", "mean")] - sum(PAPER_HOT) / 2))
    verdict = (f"in the paper's {fmt_range(PAPER_HOT)}: "
               + ", ".join(NORMALISATION_NAMES[n].split(" (")[0] for n in inside) if inside else
               f"none is in the paper's {fmt_range(PAPER_HOT)}; the closest is "
               f"{NORMALISATION_NAMES[best].split(' (')[0]}")
    return (f"Activation frequency: per token, a layer's frequencies sum to k = {top_k}, so at most k / ({HOT} E) = "
            f"{fmt_share(cap)} of this model's experts can be at {HOT} or above ({fmt_share(cap21)} for the 21B, "
            f"E = {PAPER_21B['num_experts']}, k = {PAPER_21B['top_k']}). Share of (layer, expert) pairs at "
            f"{lo}-{hi}, mean of the sets, by normalisation: " + ", ".join(parts) + f"; {verdict}.")


def frequency_section(models, top_k: int, num_experts: int) -> list[str]:
    """The card's paragraph and table on the normalisations (empty without data)."""
    have = [m for m in models if m.frequency_shares is not None and len(m.frequency_shares)]
    if not have:
        return []
    cap, cap21 = hot_cap(top_k, num_experts), hot_cap(PAPER_21B["top_k"], PAPER_21B["num_experts"])
    lo, hi = PAPER_HOT_BAND
    L = [f"**Which frequency?** Per token (the share of a set's tokens routed to the expert), the {num_experts} "
         f"frequencies of a layer sum to k = {top_k}, so at most k / ({HOT} E) = {fmt_share(cap)} of the experts can "
         f"reach {HOT} ({fmt_share(cap21)} for the paper's 21B with E = {PAPER_21B['num_experts']}, k = "
         f"{PAPER_21B['top_k']}: its \"20-30% at 0.4-0.6\" would be at or above the ceiling). The same routing "
         f"under other normalisations: per routed slot (per token / k, so a layer sums to 1), relative to the "
         f"layer's hottest expert (the hottest is 1), and per sequence (the share of prompts in which at least one "
         f"token used the expert). Shares of (layer, expert) pairs, mean over the sets (min-max over sets), "
         f"`quality_frequency_shares.csv`:", ""]
    rows = []
    for m in have:
        bm = _band_means(m)
        for n in bm.index:
            def cell(col, bm=bm, n=n):
                return (f"{fmt_share(bm.loc[n, (col, 'mean')])} ({fmt_share(bm.loc[n, (col, 'min')])}-"
                        f"{fmt_share(bm.loc[n, (col, 'max')])})")
            rows.append({"model": m.label, "normalisation": NORMALISATION_NAMES[n], f"under {COLD}": cell("cold_share"),
                         f"{HOT} or above": cell("hot_share"), f"{lo}-{hi}": cell("band_share")})
    rows.append({"model": "paper (21B)", "normalisation": "not stated", f"under {COLD}": "70-80%",
                 f"{HOT} or above": "20-30%", f"{lo}-{hi}": "20-30%"})
    return L + _table(pd.DataFrame(rows)) + [""]


def sparsity_section(models, baseline: pd.DataFrame | None, baseline_label: str, ffn: int) -> list[str]:
    """The card's paragraph and table on the three definitions (empty without data)."""
    main = models[0]
    if main.sparsity_definitions is None or not len(main.sparsity_definitions):
        return []
    L = ["Three readings of the same measurement, the 0/1 matrix of routed (token, expert) pairs x the "
         f"expert's {ffn} neurons (1 where relu(gate) = 0): **per pair** (a row: the share of the expert's neurons "
         "off for one token), **per expert** (the mean of that over the expert's routed tokens) and **per neuron** "
         "(a column: the share of its expert's routed tokens for which the neuron is off; the reading that fits the "
         "paper's Figure 6 caption, \"most neurons ... exhibit sparsity levels exceeding 0.6\"). Weighted by tokens "
         "the three have the same mean; their medians differ because a row averages an expert's always-on and "
         "rarely-on neurons into one share near that mean, while the columns keep them apart. Dead neurons (never "
         "active on any routed token of the prompt sets) have per-neuron sparsity 1 by construction; they are "
         "counted apart and left out of the per-neuron figures. Chance: the "
         f"{baseline_label} of the same config (`init_weights`, as the trainer starts), on the same prompts. "
         "Medians per layer over all four sets (`quality_sparsity_definitions.csv`, "
         "`quality_baseline_sparsity.csv`):", ""]
    missing = [m.label for m in models if m.sparsity_definitions is None or not len(m.sparsity_definitions)]
    models = [m for m in models if m.label not in missing]
    d0 = main.sparsity_definitions
    layers = sorted(d0[d0["dataset"] == "all"]["layer"].unique())
    dead = _dead(d0)
    rows = []
    for layer in layers:
        row = {"layer": int(layer)}
        for m in models:
            for name in ("pair", "expert", "neuron") if m is main else ("neuron",):
                s = medians(m.sparsity_definitions, name)
                row[f"{m.label} {DEFINITION_NAMES[name]}"] = fmt_sparsity(s.get(layer, float("nan")))
        row[f"{main.label} dead neurons"] = f"{int(dead.loc[layer, 'dead'])} of {int(dead.loc[layer, 'neurons'])}"
        for name in ("pair", "neuron"):
            s = medians(baseline, name)
            if len(s):
                row[f"{baseline_label} {DEFINITION_NAMES[name]}"] = fmt_sparsity(s.get(layer, float("nan")))
        rows.append(row)
    n = d0[(d0["dataset"] == "all")].groupby("definition")["samples"].sum()
    note = (f" Not measured under these definitions: {', '.join(missing)} (its weights were not here when the "
            f"prompt sets were measured again; its per-pair figures are below)." if missing else "")
    return L + _table(pd.DataFrame(rows)) + [
        "", f"Samples of {main.label}, all layers: {fmt_int(n.get('pair', 0))} routed pairs, "
        f"{fmt_int(n.get('expert', 0))} (layer, expert) pairs reached, {fmt_int(n.get('neuron', 0))} live neurons."
        + note, ""]
