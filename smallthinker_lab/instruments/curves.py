"""Expert-cache hit-rate curves from one recorded expert trace: "what if the memory limit were X".

A trace is the ordered list of expert requests: items ``(layer, expert)`` or ``(step, layer, expert)`` (only the
last two count: the cache key is (layer, expert)). Take it from the engine (``engine.trace``: every demand request
in the order the engine issued it) or from a recording (``trace_from_recording``: per step, per layer in
ascending order, the distinct experts the layer's tokens were routed to in ascending expert id, which is the order
the model's MoE block visits them).

* ``lru_hit_curve``: the LRU hit rate at every capacity in ONE pass. LRU has the inclusion property, so a request
  hits in a cache of c experts iff its stack (reuse) distance, the number of distinct other keys requested since
  the same key's previous request, is < c. Distances come from a Fenwick tree over request times that holds a 1
  at each key's latest request: O(n log n) time and O(n + distinct) memory for n requests, then one histogram.
* ``policy_hit_curve``: LFU or Belady (optimal, evict the key needed furthest in the future) by replay, one pass
  per capacity, O(n log n) each (heaps with lazy deletion). The engine's ``simulate`` is used when it exists
  (``use_engine=True``); ``simulate_policy`` is this module's replay, which the tests check against it.
* ``hit_rate_curves``: a tidy DataFrame (policy, capacity_experts, capacity_bytes, hits, misses, hit_rate) for
  ``plots.plot_hit_rate_curves``.

Every policy here admits every missed key (no bypass), starts cold and counts a request as a hit only if the key
is already cached, so Belady is an upper bound of the others at every capacity.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

POLICIES = ("lru", "lfu", "belady")


def trace_keys(trace) -> list[tuple[int, int]]:
    """(layer, expert) per request, from an engine (``.trace``), a DataFrame (layer, expert) or a list of tuples."""
    if hasattr(trace, "trace") and not isinstance(trace, pd.DataFrame):
        trace = trace.trace
    if isinstance(trace, pd.DataFrame):
        return list(zip(trace["layer"].astype(int), trace["expert"].astype(int)))
    return [(int(t[-2]), int(t[-1])) for t in trace]


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


def simulate_policy(trace, capacity: int, policy: str) -> tuple[int, int]:
    """(hits, misses) of a cold cache of ``capacity`` experts replaying the trace under lru, lfu or belady.

    lfu: evict the cached key with the fewest requests so far (counts survive eviction), ties to the least
    recently used (the engine's LFUPolicy). belady: evict the cached key whose next request is furthest away
    (never = infinitely far).
    """
    keys = trace_keys(trace)
    policy = policy.lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}")
    if capacity <= 0:
        return 0, len(keys)
    hits = 0
    if policy == "lru":
        from collections import OrderedDict

        od: OrderedDict = OrderedDict()
        for key in keys:
            if key in od:
                hits += 1
                od.move_to_end(key)
            else:
                if len(od) >= capacity:
                    od.popitem(last=False)
                od[key] = None
        return hits, len(keys) - hits
    heap: list = []
    state: dict = {}  # cached key -> its current heap entry's priority
    if policy == "belady":
        nxt = _next_use(keys)
        for t, key in enumerate(keys):
            prio = (-nxt[t],)
            if key in state:
                hits += 1
            elif len(state) >= capacity:
                _pop_valid(heap, state)
            state[key] = prio
            heapq.heappush(heap, (prio, key))
        return hits, len(keys) - hits
    count: dict = {}
    for t, key in enumerate(keys):
        count[key] = count.get(key, 0) + 1
        if key in state:
            hits += 1
        elif len(state) >= capacity:
            _pop_valid(heap, state)
        prio = (count[key], t)
        state[key] = prio
        heapq.heappush(heap, (prio, key))
    return hits, len(keys) - hits


def _pop_valid(heap: list, state: dict):
    """Pop entries until one is the current entry of a cached key; evict that key."""
    while True:
        prio, key = heapq.heappop(heap)
        if state.get(key) == prio:
            del state[key]
            return key


def _next_use(keys: Sequence) -> np.ndarray:
    n = len(keys)
    out = np.empty(n, dtype=np.int64)
    seen: dict = {}
    for t in range(n - 1, -1, -1):
        out[t] = seen.get(keys[t], n + t)  # never again: beyond the end, later ones further
        seen[keys[t]] = t
    return out


def _engine_simulate():
    try:
        from ..engine.cache import simulate
    except ImportError:
        return None
    return simulate


def _replay(sim, keys: list, capacity: int, policy: str) -> tuple[int, int]:
    if sim is None or capacity < 1:  # an empty cache never hits; the engine's simulate wants >= 1
        return simulate_policy(keys, capacity, policy)
    res = sim(keys, capacity, policy.lower())
    return int(res.hits), int(res.misses)


def policy_hit_curve(trace, capacities: Iterable[int], policy: str = "lfu", use_engine: bool = True) -> pd.Series:
    """Hit rate of ``policy`` ("lru", "lfu", "belady") at each capacity, by replay (the engine's ``simulate`` when
    it exists and ``use_engine``, else ``simulate_policy``)."""
    keys = trace_keys(trace)
    caps = _capacities(len(set(keys)), capacities)
    sim = _engine_simulate() if use_engine else None
    rates = []
    for c in caps:
        hits, misses = _replay(sim, keys, int(c), policy)
        rates.append(hits / (hits + misses) if hits + misses else float("nan"))
    return pd.Series(rates, index=pd.Index(caps, name="capacity_experts"), name="hit_rate")


def hit_rate_curves(trace, capacities=None, policies: Sequence[str] = POLICIES, expert_nbytes: int | None = None,
                    use_engine: bool = True) -> pd.DataFrame:
    """Tidy hit-rate curves: policy, capacity_experts, capacity_bytes, hits, misses, hit_rate.

    ``trace``: an engine, its ``.trace`` or a list of (layer, expert) / (step, layer, expert). capacities: experts
    (default 0 .. distinct keys). capacity_bytes = capacity_experts * expert_nbytes (from the engine's cache when
    an engine is given), else NaN. LRU comes from one stack-distance pass, the others by replay.
    """
    if expert_nbytes is None and hasattr(trace, "cache"):
        expert_nbytes = getattr(trace.cache, "expert_nbytes", None)
    keys = trace_keys(trace)
    n = len(keys)
    caps = _capacities(len(set(keys)), capacities)
    sim = _engine_simulate() if use_engine else None
    frames = []
    for policy in policies:
        if policy.lower() == "lru":
            _, hits, _ = lru_hits(keys, caps)
        else:
            hits = np.array([_replay(sim, keys, int(c), policy)[0] for c in caps], dtype=np.int64)
        frames.append(pd.DataFrame({
            "policy": policy, "capacity_experts": caps,
            "capacity_bytes": caps * expert_nbytes if expert_nbytes else np.full(len(caps), np.nan),
            "hits": hits, "misses": n - hits, "hit_rate": hits / n if n else np.nan}))
    return pd.concat(frames, ignore_index=True)


def trace_from_recording(rec) -> list[tuple[int, int, int]]:
    """(step_row, layer, expert) requests from a Recording's experts kind: per step (rows of ``steps.*``), per
    recorded layer ascending, the distinct routed experts in ascending id, the model's MoE visit order."""
    rec._sync()
    row_of_token = rec._tokens()["step_row"]
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
