"""Warm starts and domain locality: an engine whose expert cache starts filled by a warm-up, per-domain hit rates,
and a run that switches domains while the cache re-adapts.

A cold cache misses every expert on its first touch (a compulsory miss), so a short generation from an empty cache
reports a low hit rate even when the cache holds every expert. A server's cache is warm: :func:`warm_start` fills
it first, from a recorded trace (``cache.preload``: the experts the trace used last, one read each) or from a
prompt set (generated through the engine, greedy: the cache is left exactly as serving them leaves it), then zeroes
the counters (``engine.reset_stats()``, the cache kept), so what follows is measured warm.

* :func:`domain_hit_rates`: per prompt set (domain), the hit rate at the engine's limit from a cold cache and warm
  from each domain's warm-up prompts (its own, and the others: how much of a domain's locality carries over).
* :func:`switch_domains`: one cache, cold at first, serving one domain's prompts and then another's; per forward
  step the requests, hits and misses split into compulsory and capacity, for ``plots.plot_domain_switch``.

Everything here uses the engine's public objects: ``engine.cache``, ``engine.generate``/``stream``,
``engine.trace``, ``engine.reset_stats``, ``engine.stats``, ``engine.config``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

SELECT = ("recent", "frequent")


@dataclass
class WarmStart:
    """What :func:`warm_start` did: the source ("trace" or "prompts"), the experts it read, the cache's entries
    afterwards (of ``capacity_experts``), the bytes read and the seconds it took."""

    source: str
    experts_read: int
    resident: int
    capacity_experts: int
    bytes_read: int
    seconds: float


def _is_trace(source: Any) -> bool:
    if isinstance(source, pd.DataFrame) or hasattr(source, "trace"):
        return True
    if isinstance(source, str | bytes) or not isinstance(source, Sequence) or not len(source):
        return False
    return all(isinstance(t, tuple) for t in source)


def trace_keys(source: Any, num_layers: int, num_experts: int) -> list[tuple[int, int]]:
    """(layer, expert) per request of a trace (an engine, its ``.trace``, a DataFrame with layer/expert columns, or
    (step, layer, expert) / (layer, expert) tuples), checked against the model's shape."""
    if hasattr(source, "trace") and not isinstance(source, pd.DataFrame):
        source = source.trace
    if isinstance(source, pd.DataFrame):
        missing = {"layer", "expert"} - set(source.columns)
        if missing:
            raise ValueError(f"a trace DataFrame needs columns layer and expert; missing {sorted(missing)}")
        items = list(zip(source["layer"].astype(int), source["expert"].astype(int)))
    else:
        items = list(source)
    keys = []
    for i, item in enumerate(items):
        if len(item) not in (2, 3):
            raise ValueError(f"trace item {i} is {item!r}: expected (layer, expert) or (step, layer, expert)")
        layer, expert = int(item[-2]), int(item[-1])
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise ValueError(f"trace item {i} is {item!r}: layer must be in [0, {num_layers}) and expert in "
                             f"[0, {num_experts}) for this model")
        keys.append((layer, expert))
    return keys


def warm_order(keys: Sequence[tuple[int, int]], capacity: int, select: str = "recent") -> list[tuple[int, int]]:
    """Which experts of a trace to preload into a cache of ``capacity``, in preload order (the last ones end as
    the most recently used). ``recent``: the ``capacity`` experts used last, oldest first: exactly the state an
    LRU cache of that size is left in by the trace. ``frequent``: the ``capacity`` experts requested most (ties:
    the later last use wins), least requested first."""
    if select not in SELECT:
        raise ValueError(f"unknown warm-up selection {select!r}; known: {', '.join(SELECT)}")
    last = {k: i for i, k in enumerate(keys)}
    if select == "recent":
        order = sorted(last, key=last.__getitem__)
    else:
        count = Counter(keys)
        order = sorted(last, key=lambda k: (count[k], last[k]))
    return order[-capacity:] if capacity > 0 else []


def warm_start(engine, source, *, kind: str = "auto", max_new_tokens: int = 16, select: str = "recent",
               clear: bool = True, progress: bool = False) -> WarmStart:
    """Fill ``engine``'s expert cache by a warm-up, then zero its counters (the cache kept warm).

    ``source``: a recorded trace (an engine, its ``.trace``, a DataFrame, or a list of (step, layer, expert)
    tuples) whose experts are preloaded (``select``: see :func:`warm_order`); or prompts (a str, a list of str,
    or a list of token-id lists) generated through the engine, greedy, ``max_new_tokens`` each. ``kind``:
    "trace", "prompts" or "auto" (tuples or a DataFrame are a trace, anything else prompts). ``clear``: empty the
    cache first (default), so the warm state is the warm-up's alone. Generations afterwards give the same tokens
    as from a cold cache: the cache changes where the bytes come from, never the arithmetic.
    """
    from tqdm.auto import tqdm

    if kind not in ("auto", "trace", "prompts"):
        raise ValueError(f"kind must be 'auto', 'trace' or 'prompts', got {kind!r}")
    cache, cfg = engine.cache, engine.config
    is_trace = _is_trace(source) if kind == "auto" else kind == "trace"
    t0 = time.perf_counter()
    keys = trace_keys(source, cfg.num_hidden_layers, cfg.num_experts) if is_trace else None  # checked first
    if clear:
        engine.reset_stats(clear_cache=True)
    st = cache.stats
    bytes0, reads0 = st.bytes_read, st.misses + st.speculative_reads
    if is_trace:
        read = cache.preload(warm_order(keys, cache.capacity_experts, select))
    else:
        prompts = [source] if isinstance(source, str) else list(source)
        if not prompts:
            raise ValueError("warm_start: no prompts to warm the cache with")
        for p in tqdm(prompts, desc="warm-up", unit="prompt", disable=not progress):
            engine.generate(p, max_new_tokens)
        read = st.misses + st.speculative_reads - reads0
    nbytes = st.bytes_read - bytes0
    engine.reset_stats(clear_cache=False)
    return WarmStart("trace" if is_trace else "prompts", int(read), len(cache), cache.capacity_experts, int(nbytes),
                     time.perf_counter() - t0)


# ------------------------------------------------------------------ measurements
def _measure(engine, prompts: Sequence, max_new_tokens: int) -> dict[str, Any]:
    """Generate ``prompts`` on the engine as it is and return its counters (stats + the miss split)."""
    for p in prompts:
        engine.generate(p, max_new_tokens)
    s = engine.stats()
    st = engine.cache.stats
    return {"memory_limit": s["memory_limit"], "capacity_experts": s["capacity_experts"],
            "prompts": len(prompts), "tokens": s["prefill_tokens"] + s["decode_tokens"],
            "requests": st.requests, "hits": st.hits, "compulsory_misses": st.compulsory_misses,
            "capacity_misses": st.capacity_misses, "hit_rate": st.hit_rate,
            "compulsory_share": st.compulsory_misses / st.requests if st.requests else float("nan"),
            "capacity_share": st.capacity_misses / st.requests if st.requests else float("nan"),
            "decode_bytes_read_per_token": s["decode_bytes_read_per_token"]}


def domain_hit_rates(engine, prompt_sets: Mapping[str, Sequence], *, warmup_prompts: int = 4,
                     max_new_tokens: int = 16, cross: bool = True, progress: bool = True) -> pd.DataFrame:
    """Hit rates per domain at the engine's memory limit, cold and warm.

    Each set's first ``warmup_prompts`` prompts are its warm-up, the rest are measured. Per domain: one run from
    an empty cache (``warm_from`` "none") and one warm from each domain's warm-up (its own only with
    ``cross=False``): the warm-up's trace is recorded once (generated from an empty cache) and preloaded
    (:func:`warm_start`, ``select="recent"``). Columns: domain, warm_from, start (cold/warm), memory_limit,
    capacity_experts, prompts, tokens, requests, hits, compulsory_misses, capacity_misses, hit_rate,
    compulsory_share, capacity_share, decode_bytes_read_per_token. Leaves the engine's cache warm from the last
    run and its counters holding that run.
    """
    from tqdm.auto import tqdm

    sets = {str(k): list(v) for k, v in prompt_sets.items()}
    for name, prompts in sets.items():
        if len(prompts) <= warmup_prompts:
            raise ValueError(f"prompt set {name!r} has {len(prompts)} prompts: it needs more than "
                             f"warmup_prompts={warmup_prompts} (the first ones warm the cache, the rest are measured)")
    traces = {}
    runs = [(d, w) for d in sets for w in ([None, *sets] if cross else [None, d])]
    bar = tqdm(total=len(sets) + len(runs), desc="domains", unit="run", disable=not progress)
    try:
        for name, prompts in sets.items():  # each warm-up's demand trace, from an empty cache
            engine.reset_stats(clear_cache=True)
            for p in prompts[:warmup_prompts]:
                engine.generate(p, max_new_tokens)
            traces[name] = list(engine.trace)
            bar.update(1)
        rows = []
        for domain, warm_from in runs:
            if warm_from is None:
                engine.reset_stats(clear_cache=True)
            else:
                warm_start(engine, traces[warm_from], kind="trace")
            m = _measure(engine, sets[domain][warmup_prompts:], max_new_tokens)
            rows.append({"domain": domain, "warm_from": warm_from or "none",
                         "start": "cold" if warm_from is None else "warm", **m})
            bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows)


def switch_domains(engine, phases: Mapping[str, Sequence] | Sequence[tuple[str, Sequence]], *,
                   max_new_tokens: int = 16, progress: bool = True) -> pd.DataFrame:
    """One cache serving one domain's prompts and then the next's (e.g. {"humaneval": code, "zh-news": chinese}),
    cold at the start and never reset in between: how it re-adapts after a switch.

    One row per forward step (a prompt's prefill, then each decode step): phase, phase_index, prompt (index in
    its phase), token (0 = the prefill), step (global), requests, hits, compulsory_misses, capacity_misses,
    hit_rate (of that step), resident (experts in the cache after the step) and phase_share: the share of them
    read into the cache during the current phase, which climbs from 0 after a switch as the cache re-adapts. The
    new domain's experts that the old one never used are first touches (compulsory misses). On a backend that
    runs a step ahead of the host, a step's counters may include the next step's requests.
    """
    from tqdm.auto import tqdm

    phases = list(phases.items()) if isinstance(phases, Mapping) else [(str(n), p) for n, p in phases]
    if len(phases) < 1 or any(len(p) == 0 for _, p in phases):
        raise ValueError("switch_domains needs at least one phase, each with at least one prompt")
    engine.reset_stats(clear_cache=True)
    st = engine.cache.stats
    rows, step = [], 0
    last = (0, 0, 0, 0)
    bar = tqdm(total=sum(len(p) for _, p in phases), desc="switch domains", unit="prompt", disable=not progress)
    try:
        for i, (name, prompts) in enumerate(phases):
            before = dict(engine.cache.entries)  # the entries held when the phase began (kept alive: `is` below)
            for j, prompt in enumerate(prompts):
                for t, _ in enumerate(engine.stream(prompt, max_new_tokens)):
                    engine.stats()  # makes every backend's counters current (the graph backend counts lazily)
                    st = engine.cache.stats
                    now = (st.requests, st.hits, st.compulsory_misses, st.capacity_misses)
                    d = [a - b for a, b in zip(now, last)]
                    last = now
                    entries = engine.cache.entries
                    fresh = sum(1 for k, e in entries.items() if before.get(k) is not e)
                    rows.append({"phase": name, "phase_index": i, "prompt": j, "token": t, "step": step,
                                 "requests": d[0], "hits": d[1], "compulsory_misses": d[2], "capacity_misses": d[3],
                                 "hit_rate": d[1] / d[0] if d[0] else float("nan"), "resident": len(entries),
                                 "phase_share": fresh / len(entries) if entries else float("nan")})
                    step += 1
                bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows)
