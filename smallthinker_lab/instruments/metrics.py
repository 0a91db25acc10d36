"""Derived metrics: pure functions of the tidy DataFrames a ``Recording`` gives (``rec.to_dataframe(kind)``).

The paper's numbers to compare with (../shared/reference/smallthinker.md section 7): 70-80% of experts have an
activation frequency under 0.14, the rest 0.4-0.6; neuron sparsity within routed experts has a median above 0.6
in every layer and 0.9-1.0 in the first layers; on the 21B model the sliding-window layers cut the KV cache from
1.63 GiB (all global) to about 728 MiB at 16K tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd


def expert_frequency(experts_df: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """Share of tokens routed to each expert, per (dataset, layer, expert), the paper's activation frequency.

    One row per expert, also experts that no token reached (E from ``num_experts`` or the frame's
    ``attrs["num_experts"]``). Columns: dataset, layer, expert, tokens (routed to it), total_tokens (the tokens
    the layer processed), frequency = tokens / total_tokens. Summed over the experts of a layer: top_k.
    """
    E = num_experts or experts_df.attrs.get("num_experts")
    if E is None:
        E = int(experts_df["expert"].max()) + 1 if len(experts_df) else 0
    df = experts_df[experts_df["expert"] >= 0]
    K = experts_df.attrs.get("top_k") or (int(df["slot"].max()) + 1 if len(df) else 1)
    totals = (df[df["slot"] == 0] if "slot" in df else df).groupby(["dataset", "layer"]).size()
    if "slot" not in df:
        totals = totals // K
    routed = df.groupby(["dataset", "layer", "expert"]).size()
    rows = []
    for (ds, layer), total in totals.items():
        counts = np.zeros(E, dtype=np.int64)
        r = routed.loc[(ds, layer)]
        counts[r.index.to_numpy()] = r.to_numpy()
        rows.append(pd.DataFrame({"dataset": ds, "layer": layer, "expert": np.arange(E), "tokens": counts,
                                  "total_tokens": int(total), "frequency": counts / total}))
    cols = ["dataset", "layer", "expert", "tokens", "total_tokens", "frequency"]
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    out.attrs.update(experts_df.attrs)
    return out


def _share(freq_df: pd.DataFrame, mask: pd.Series, by, name: str) -> pd.DataFrame:
    by = [by] if isinstance(by, str) else list(by)
    g = freq_df.assign(_hit=mask.to_numpy()).groupby(by)["_hit"]
    return pd.DataFrame({"experts": g.size(), name: g.sum(), "share": g.mean()}).reset_index()


def cold_expert_share(freq_df: pd.DataFrame, threshold: float = 0.14, by=("dataset",)) -> pd.DataFrame:
    """Share of (layer, expert) pairs with frequency < threshold, per ``by`` (the paper: 70-80% under 0.14).

    Columns: *by, experts, cold, share.
    """
    return _share(freq_df, freq_df["frequency"] < threshold, by, "cold")


def hot_expert_share(freq_df: pd.DataFrame, threshold: float = 0.4, by=("dataset",)) -> pd.DataFrame:
    """Share of (layer, expert) pairs with frequency >= threshold, per ``by`` (the paper: 20-30% at 0.4-0.6).

    Columns: *by, experts, hot, share.
    """
    return _share(freq_df, freq_df["frequency"] >= threshold, by, "hot")


FREQUENCY_NORMALISATIONS = ("per_token", "per_slot", "max_normalised", "per_sequence")


def hot_share_cap(top_k: int, num_experts: int, threshold: float = 0.4) -> float:
    """The largest possible share of a layer's experts with per-token frequency >= ``threshold``.

    Per-token frequencies of a layer sum to ``top_k``, so at most top_k / threshold experts reach it:
    min(1, top_k / (threshold * num_experts)). The paper's 21B (E=64, k=6) at 0.4: 23.4%.
    """
    if top_k <= 0 or num_experts <= 0 or not 0 < threshold:
        raise ValueError(f"hot_share_cap needs top_k > 0, num_experts > 0 and threshold > 0, got {top_k}, "
                         f"{num_experts}, {threshold}")
    return min(1.0, top_k / (threshold * num_experts))


def frequency_normalisations(experts_df: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """Activation frequency of every (dataset, layer, expert) under four normalisations, long format.

    per_token: share of the layer's tokens routed to the expert (:func:`expert_frequency`; the E values of a layer
    sum to k); per_slot: per_token / k (share of the routed slots; sums to 1); max_normalised: per_token / the
    layer's largest per_token (the hottest expert is 1); per_sequence: share of the sequences (prompts) in which
    at least one token was routed to the expert. ``experts_df``: ``rec.to_dataframe("experts")`` (needs the
    sequence column). Columns: dataset, layer, expert, normalisation, frequency.
    """
    if "sequence" not in experts_df.columns:
        raise KeyError("frequency_normalisations needs the experts frame's sequence column "
                       f"(columns: {list(experts_df.columns)})")
    freq = expert_frequency(experts_df, num_experts)
    E = int(freq["expert"].max()) + 1 if len(freq) else 0
    K = experts_df.attrs.get("top_k") or (int(experts_df["slot"].max()) + 1 if len(experts_df) else 1)
    keys = ["dataset", "layer", "expert"]
    base = freq[keys].reset_index(drop=True)
    per_token = freq["frequency"].to_numpy(dtype=float)
    layer_max = freq.groupby(["dataset", "layer"])["frequency"].transform("max").to_numpy(dtype=float)
    df = experts_df[experts_df["expert"] >= 0]
    seqs = df.groupby("dataset")["sequence"].nunique()
    used = df.drop_duplicates(["dataset", "layer", "expert", "sequence"]).groupby(keys).size()
    used = used.reindex(pd.MultiIndex.from_frame(base), fill_value=0).to_numpy()
    per_seq = used / seqs.reindex(base["dataset"]).to_numpy(dtype=float)
    values = {"per_token": per_token, "per_slot": per_token / K,
              "max_normalised": np.divide(per_token, layer_max, out=np.zeros_like(per_token), where=layer_max > 0),
              "per_sequence": per_seq}
    out = pd.concat([base.assign(normalisation=n, frequency=v) for n, v in values.items()], ignore_index=True)
    out.attrs.update({"num_experts": E, "top_k": K})
    return out


def frequency_shares(norm_df: pd.DataFrame, cold: float = 0.14, hot: tuple[float, float] = (0.4, 0.6),
                     by: Sequence[str] = ("dataset",)) -> pd.DataFrame:
    """Per (*by, normalisation): the share of (layer, expert) pairs under ``cold``, at ``hot[0]`` or above, and in
    [hot[0], hot[1]] (the paper: 70-80% under 0.14, 20-30% at 0.4-0.6), from :func:`frequency_normalisations`.

    Columns: *by, normalisation, experts, cold_share, hot_share, band_share.
    """
    by = [by] if isinstance(by, str) else list(by)
    lo, hi = hot
    if cold < 0 or lo > hi:
        raise ValueError(f"frequency_shares needs cold >= 0 and hot[0] <= hot[1], got {cold}, {hot}")
    f = norm_df["frequency"]
    df = norm_df.assign(_cold=f < cold, _hot=f >= lo, _band=(f >= lo) & (f <= hi))
    g = df.groupby([*by, "normalisation"], sort=False)
    out = pd.DataFrame({"experts": g.size(), "cold_share": g["_cold"].mean(), "hot_share": g["_hot"].mean(),
                        "band_share": g["_band"].mean()}).reset_index()
    order = {n: i for i, n in enumerate(FREQUENCY_NORMALISATIONS)}
    out = out.assign(_o=out["normalisation"].map(order)).sort_values([*by, "_o"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2, in [0, 1]) of two non-negative vectors, normalised first."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return min(1.0, max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m)))


def expert_usage_divergence(freq_df: pd.DataFrame) -> pd.DataFrame:
    """Jensen-Shannon divergence (bits, in [0, 1]) of expert usage between every pair of datasets, per layer.

    Usage = the layer's frequencies normalised to sum 1. 0: same usage; 1: disjoint experts.
    Columns: layer, dataset_a, dataset_b, js_divergence.
    """
    datasets = list(pd.unique(freq_df["dataset"]))
    rows = []
    for layer, d in freq_df.groupby("layer", sort=True):
        vec = {ds: g.sort_values("expert")["frequency"].to_numpy() for ds, g in d.groupby("dataset")}
        for a, b in combinations(datasets, 2):
            if a in vec and b in vec:
                rows.append({"layer": layer, "dataset_a": a, "dataset_b": b, "js_divergence": js_divergence(vec[a],
                                                                                                         vec[b])})
    return pd.DataFrame(rows, columns=["layer", "dataset_a", "dataset_b", "js_divergence"])


def _dtype_of_itemsize(itemsize: int):
    import torch

    return {1: torch.int8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[int(itemsize)]


def kv_footprint(kv_df: pd.DataFrame, config, dtype=None) -> pd.DataFrame:
    """KV-cache bytes per (dataset, sequence, step) against the all-global baseline of the same layers.

    Columns: dataset, sequence, step, context, bytes, global_bytes, sliding_bytes, all_global_bytes (every recorded
    layer global: ``kv_cache_bytes(config, context, dtype, all_global=True)`` when all layers were recorded),
    ratio = bytes / all_global_bytes. dtype: the cache's, by default from ``attrs["kv_itemsize"]``.
    """
    from ..model.kv_cache import kv_cache_bytes

    if dtype is None:
        itemsize = kv_df.attrs.get("kv_itemsize")
        if not itemsize:
            raise ValueError("kv_footprint needs dtype= (the frame's attrs carry no kv_itemsize)")
        dtype = _dtype_of_itemsize(itemsize)
    keys = ["dataset", "sequence", "step"]
    df = kv_df.assign(_g=np.where(kv_df["attention"] == "global", kv_df["bytes"], 0),
                      _s=np.where(kv_df["attention"] == "sliding", kv_df["bytes"], 0))
    g = df.groupby(keys, sort=False)
    out = pd.DataFrame({"context": g["context"].first(), "bytes": g["bytes"].sum(), "global_bytes": g["_g"].sum(),
                        "sliding_bytes": g["_s"].sum()}).reset_index()
    layers = g["layer"].apply(lambda s: sorted(set(s)))
    base = []
    for (key, ctx) in zip(layers.index, out["context"]):
        per_layer = kv_cache_bytes(config, int(ctx), dtype, all_global=True, per_layer=True)
        base.append(sum(per_layer[i] for i in layers.loc[key]))
    out["all_global_bytes"] = np.array(base, dtype=np.int64)
    out["ratio"] = out["bytes"] / out["all_global_bytes"]
    return out


def hit_rates(cache_df: pd.DataFrame) -> pd.DataFrame:
    """Expert-cache hit rate per layer and overall (last row, layer "all"), from the cache events.

    Columns: hits, misses, prefetches, evictions, bytes_read (miss + prefetch bytes), hit_rate = hits / (hits +
    misses); index: layer.
    """
    def agg(d: pd.DataFrame) -> dict:
        ev = d["event"]
        hits, misses = int((ev == "hit").sum()), int((ev == "miss").sum())
        return {"hits": hits, "misses": misses, "prefetches": int((ev == "prefetch").sum()),
                "evictions": int((ev == "evict").sum()),
                "bytes_read": int(d.loc[ev.isin(["miss", "prefetch"]), "bytes"].sum()),
                "hit_rate": hits / (hits + misses) if hits + misses else float("nan")}

    rows = {layer: agg(d) for layer, d in cache_df.groupby("layer", sort=True)}
    rows["all"] = agg(cache_df)
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "layer"
    return out


def throughput(timing_df: pd.DataFrame) -> pd.DataFrame:
    """Tokens/s of prefill and decode per dataset, from the per-step wall times (the "total" rows).

    Columns: dataset, phase, steps, tokens, seconds, tok_s.
    """
    t = timing_df[timing_df["part"] == "total"]
    g = t.groupby(["dataset", "phase"], sort=False)
    out = pd.DataFrame({"steps": g.size(), "tokens": g["tokens"].sum(), "seconds": g["seconds"].sum()}).reset_index()
    out["tok_s"] = out["tokens"] / out["seconds"]
    return out


def time_breakdown(timing_df: pd.DataFrame) -> pd.DataFrame:
    """Seconds per (dataset, phase, part), summed over layers and steps, and their share of the steps' wall time.

    Columns: dataset, phase, part, seconds, share. Engine only (a model reports only the "total" part).
    """
    total = timing_df[timing_df["part"] == "total"].groupby(["dataset", "phase"])["seconds"].sum()
    out = timing_df.groupby(["dataset", "phase", "part"], sort=False)["seconds"].sum().reset_index()
    out["share"] = out["seconds"] / total.reindex(pd.MultiIndex.from_frame(out[["dataset", "phase"]])).to_numpy()
    return out


def io_wait_share(timing_df: pd.DataFrame) -> pd.DataFrame:
    """Share of the wall time spent waiting for expert I/O, per (dataset, phase) and overall (phase "all").

    Columns: dataset, phase, io_wait_seconds, seconds, io_wait_share.
    """
    t = timing_df.assign(_io=np.where(timing_df["part"] == "io_wait", timing_df["seconds"], 0.0),
                         _tot=np.where(timing_df["part"] == "total", timing_df["seconds"], 0.0))
    parts = [t, t.assign(phase="all")]
    g = pd.concat(parts).groupby(["dataset", "phase"], sort=False)
    out = pd.DataFrame({"io_wait_seconds": g["_io"].sum(), "seconds": g["_tot"].sum()}).reset_index()
    out["io_wait_share"] = out["io_wait_seconds"] / out["seconds"]
    return out


def top_tokens(rec, layer: int, expert: int, n: int = 10, dataset: str | None = None) -> pd.DataFrame:
    """The tokens that route to ``expert`` of ``layer`` most often in recording ``rec`` (kinds "experts", with
    ``tokens.id``): the drill-down of one heatmap cell.

    One row per token id, most routed first (ties: the higher rate first, then the lower id): token_id, token (its
    piece, when the recording has ``tokens.piece``), routed (rows of that token routed to the expert), occurrences
    (rows of that token in the recording, at that layer), rate = routed / occurrences, share = routed / all rows
    routed to the expert. The first ``n`` rows. ``dataset``: only the token rows of that dataset label.
    """
    if "experts" not in rec.kinds:
        raise KeyError(f"top_tokens needs kind 'experts' in the recording (kinds recorded: {rec.kinds})")
    if layer not in rec.layers:
        raise KeyError(f"layer {layer} is not in the recording (layers recorded: {rec.layers})")
    E = rec.config.num_experts
    if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not 0 <= expert < E:
        raise ValueError(f"expert must be an integer in [0, {E}), got {expert!r}")
    if "tokens.id" not in rec:
        raise KeyError("the recording has no tokens.id (recorded before token ids were kept, or its forwards did "
                       "not report them): record it again")
    ids, tok = rec[f"layers.{layer}.moe.topk_ids"], rec["tokens.id"]
    pieces_all = rec["tokens.piece"] if "tokens.piece" in rec else None
    if dataset is not None:
        if dataset not in rec.datasets:
            raise KeyError(f"dataset {dataset!r} is not in the recording (datasets: {rec.datasets})")
        keep = rec["tokens.dataset"] == dataset
        ids, tok = ids[keep], tok[keep]
        pieces_all = pieces_all[keep] if pieces_all is not None else None
    hit = (ids == expert).any(axis=1)
    occurrences = pd.Series(tok).value_counts()
    routed = pd.Series(tok[hit]).value_counts()
    df = pd.DataFrame({"token_id": routed.index.to_numpy(dtype=np.int64), "routed": routed.to_numpy()})
    df["occurrences"] = occurrences.loc[df["token_id"]].to_numpy()
    df["rate"] = df["routed"] / df["occurrences"]
    df["share"] = df["routed"] / max(int(hit.sum()), 1)
    df = df.sort_values(["routed", "rate", "token_id"], ascending=[False, False, True]).head(n)
    if pieces_all is not None:
        pieces = dict(zip(tok.tolist(), pieces_all.tolist()))
        df.insert(1, "token", [pieces[t] for t in df["token_id"]])
    df = df.reset_index(drop=True)
    df.attrs.update({"layer": layer, "expert": expert, "dataset": dataset, "routed_rows": int(hit.sum()),
                     "rows": len(tok)})
    return df


# the sparsity definitions live in sparsity.py, the cache's derived views in curves.py; sl.metrics names them all
from .curves import (  # noqa: E402,F401
    compulsory_ceiling,
    hit_rate_curves,
    lru_hit_curve,
    miss_breakdown,
    policy_hit_curve,
    trace_from_recording,
)
from .sparsity import (  # noqa: E402,F401
    DEFINITIONS,
    dead_neurons,
    neuron_sparsity_by_expert,
    neuron_sparsity_by_layer,
    neuron_sparsity_by_neuron,
    neuron_sparsity_by_pair,
    neuron_sparsity_definitions,
)
