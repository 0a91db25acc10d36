"""Expert-cache hit-rate curves from one recorded expert trace: "what if the memory limit were X".

A trace is the ordered list of demand requests: items ``(step, layer, expert)`` or ``(layer, expert)``; the cache
key is (layer, expert). Take it from the engine (``engine.trace``: every demand request in the order the engine
issued it, since its last ``reset_stats``) or from a recording (``trace_from_recording``: per step, per layer in
ascending order, the distinct experts the layer's tokens were routed to, in ascending expert id; that is the
engine's request order whenever a layer's experts fit its cache, and the order the model's MoE block visits them).

* ``lru_hit_curve``: the LRU hit rate at every capacity in ONE pass. LRU has the inclusion property, so a request
  hits in a cache of c experts iff its stack (reuse) distance, the number of distinct other keys requested since
  the same key's previous request, is < c. Distances come from a Fenwick tree over request times that holds a 1
  at each key's latest request: O(n log n) time and O(n + distinct) memory for n requests, then one histogram.
  The engine pins a layer's experts while it computes; pinned entries are always the most recently requested,
  so pins never change an LRU victim and the one-pass curve is the engine's LRU hit rate, exactly.
* ``policy_hit_curve``: LFU or Belady (evict the entry needed furthest in the future) by replay through the
  engine's ``smallthinker_lab.engine.cache.simulate``, one replay per capacity (with (step, layer, expert) items
  it pins as the engine does, which can change LFU and Belady victims). A Belady sweep costs
  O(n * capacity log capacity) per capacity: pass a grid of capacities for long traces.
* ``hit_rate_curves``: a tidy DataFrame (policy, capacity_experts, capacity_bytes, hits, misses, the misses split,
  hit_rate, ceiling) for ``plots.plot_hit_rate_curves``.

Misses, split as the engine's cache counts them: **compulsory** (the first request of a key in the trace: a cold
cache of any size misses it), **capacity** (every other miss: the key was requested before and did not stay),
and, where a policy is compared with the optimal one, **policy** misses: its misses minus Belady's at the same
capacity, the part of its capacity misses a better replacement choice would have avoided (0 for Belady itself).
``compulsory_ceiling`` = 1 - compulsory share is the best hit rate any cache of any size reaches on the trace: the
curves' limit at infinite capacity. A short trace touches most experts only once or twice, so its ceiling is low.

All policies start cold and admit every missed key; capacity 0 never hits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..engine.policies import POLICIES, simulate


def trace_items(trace) -> list[tuple]:
    """Requests as tuples: from an engine (its ``.trace``), a DataFrame (step?, layer, expert) or a list."""
    if hasattr(trace, "trace") and not isinstance(trace, pd.DataFrame):
        trace = trace.trace
    if isinstance(trace, pd.DataFrame):
        cols = [c for c in ("step", "layer", "expert") if c in trace]
        return list(zip(*(trace[c].astype(int) for c in cols)))
    return [tuple(t) for t in trace]


def _k(item) -> tuple[int, int]:
    return int(item[-2]), int(item[-1])


def trace_keys(trace) -> list[tuple[int, int]]:
    """(layer, expert) per request."""
    return [_k(t) for t in trace_items(trace)]


def stack_distances(trace) -> np.ndarray:
    """Per request, the number of distinct other keys requested since its key's previous request; -1 if first."""
    keys = trace_keys(trace)
    n = len(keys)
    tree = [0] * (n + 1)  # Fenwick tree over request times 1..n

    def add(i: int, v: int) -> None:
        while i <= n:
            tree[i] += v
            i += i & -i

    def prefix(i: int) -> int:  # sum of times 1..i
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    last: dict[tuple[int, int], int] = {}
    out = np.empty(n, dtype=np.int64)
    for t, key in enumerate(keys, start=1):
        p = last.get(key)
        if p is None:
            out[t - 1] = -1
        else:
            out[t - 1] = prefix(t - 1) - prefix(p)  # latest requests of other keys in (p, t)
            add(p, -1)
        add(t, 1)
        last[key] = t
    return out


def compulsory_ceiling(trace) -> float:
    """1 - compulsory share: the hit rate of a cold cache that never evicts (any size, any policy), the best any
    cache reaches on ``trace``; NaN for an empty trace."""
    keys = trace_keys(trace)
    return (len(keys) - len(set(keys))) / len(keys) if keys else float("nan")


def miss_breakdown(trace, capacity: int, policy: str = "lru", optimal: bool = True) -> dict[str, float]:
    """One cold cache of ``capacity`` experts on ``trace`` (the engine's simulator): requests, hits,
    compulsory_misses, capacity_misses, policy_misses (misses - Belady's misses at the same capacity; NaN with
    ``optimal=False``, which skips that replay), each as a share of the requests, and the compulsory ceiling."""
    items = trace_items(trace)
    n, distinct = len(items), len({_k(t) for t in items})
    hits = _replay(items, int(capacity), policy)[0]
    best = _replay(items, int(capacity), "belady")[0] if optimal else float("nan")
    share = (lambda v: v / n) if n else (lambda v: float("nan"))
    return {"policy": policy, "capacity_experts": int(capacity), "requests": n, "hits": hits,
            "compulsory_misses": distinct, "capacity_misses": n - hits - distinct, "policy_misses": best - hits,
            "hit_rate": share(hits), "compulsory_share": share(distinct), "capacity_share": share(n - hits - distinct),
            "policy_share": share(best - hits), "ceiling": share(n - distinct)}


def _capacities(trace_len_distinct: int, capacities) -> np.ndarray:
    if capacities is None:
        return np.arange(trace_len_distinct + 1)
    caps = np.asarray(list(capacities) if not np.isscalar(capacities) else [capacities], dtype=np.int64)
    if (caps < 0).any():
        raise ValueError("cache capacities must be >= 0 experts")
    return caps


def lru_hits(trace, capacities=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(capacities, hits at each, requests) for LRU, from one pass over the trace."""
    d = stack_distances(trace)
    distinct = int((d < 0).sum())
    caps = _capacities(distinct, capacities)
    hist = np.bincount(d[d >= 0], minlength=1)
    cum = np.concatenate(([0], np.cumsum(hist)))  # cum[c] = requests with distance < c
    hits = cum[np.minimum(caps, len(cum) - 1)]
    return caps, hits, len(d)


def lru_hit_curve(trace, capacities=None) -> pd.Series:
    """LRU hit rate at each capacity (in experts; default 0 .. distinct keys), indexed by capacity_experts."""
    caps, hits, n = lru_hits(trace, capacities)
    rate = hits / n if n else np.full(len(caps), np.nan)
    return pd.Series(rate, index=pd.Index(caps, name="capacity_experts"), name="hit_rate")


def _replay(items: list, capacity: int, policy: str) -> tuple[int, int]:
    """(hits, misses) of the engine's simulator; an empty cache never hits."""
    if capacity < 1:
        return 0, len(items)
    res = simulate(items, int(capacity), policy.lower())
    return int(res.hits), int(res.misses)


def policy_hit_curve(trace, capacities: Iterable[int], policy: str = "lfu") -> pd.Series:
    """Hit rate of ``policy`` ("lru", "lfu", "belady") at each capacity, by replay through the engine's
    ``simulate`` (its hit semantics and pins, exactly)."""
    items = trace_items(trace)
    caps = _capacities(len({_k(t) for t in items}), capacities)
    n = len(items)
    rates = [_replay(items, int(c), policy)[0] / n if n else float("nan") for c in caps]
    return pd.Series(rates, index=pd.Index(caps, name="capacity_experts"), name="hit_rate")


def hit_rate_curves(trace, capacities=None, policies: Sequence[str] = POLICIES,
                    expert_nbytes: int | None = None) -> pd.DataFrame:
    """Tidy hit-rate curves: policy, capacity_experts, capacity_bytes, hits, misses, compulsory_misses,
    capacity_misses, policy_misses, hit_rate, ceiling (see the module docstring).

    ``trace``: an engine, its ``.trace`` or a list of (layer, expert) / (step, layer, expert). capacities: experts
    (default 0 .. distinct keys; pass a grid to bound the replays' cost). capacity_bytes = capacity_experts *
    expert_nbytes (from the engine's cache when an engine is given), else NaN. LRU comes from one stack-distance
    pass, the other policies from one replay per capacity. policy_misses = misses - Belady's misses at the same
    capacity when "belady" is among ``policies``, else NaN; ceiling = :func:`compulsory_ceiling` (every row).
    """
    if expert_nbytes is None and hasattr(trace, "cache"):
        expert_nbytes = getattr(trace.cache, "expert_nbytes", None)
    items = trace_items(trace)
    n = len(items)
    distinct = len({_k(t) for t in items})
    caps = _capacities(distinct, capacities)
    hits_of = {}
    for policy in policies:
        if policy.lower() == "lru":
            _, hits, _ = lru_hits(items, caps)
        else:
            hits = np.array([_replay(items, int(c), policy)[0] for c in caps], dtype=np.int64)
        hits_of[policy] = hits
    optimal = next((hits_of[p] for p in policies if p.lower() == "belady"), None)
    frames = []
    for policy, hits in hits_of.items():
        frames.append(pd.DataFrame({
            "policy": policy, "capacity_experts": caps,
            "capacity_bytes": caps * expert_nbytes if expert_nbytes else np.full(len(caps), np.nan),
            "hits": hits, "misses": n - hits, "compulsory_misses": distinct,
            "capacity_misses": n - hits - distinct,
            "policy_misses": optimal - hits if optimal is not None else np.full(len(caps), np.nan),
            "hit_rate": hits / n if n else np.nan, "ceiling": compulsory_ceiling(items)}))
    return pd.concat(frames, ignore_index=True)


def trace_from_recording(rec) -> list[tuple[int, int, int]]:
    """(step_row, layer, expert) requests from a Recording's experts kind: per step (rows of ``steps.*``), per
    recorded layer ascending, the distinct routed experts in ascending id, the model's MoE visit order."""
    row_of_token = rec["tokens.step_row"]
    bounds = np.searchsorted(row_of_token, np.arange(rec.num_steps + 1))
    ids = {i: rec[f"layers.{i}.moe.topk_ids"] for i in rec.layers}
    out = []
    for s in range(rec.num_steps):
        lo, hi = bounds[s], bounds[s + 1]
        for i in rec.layers:
            for e in np.unique(ids[i][lo:hi]):
                if e >= 0:
                    out.append((s, i, int(e)))
    return out
