"""Cache behaviour tables: the miss breakdown of measured runs (:func:`hit_rate_table`), and what locality buys
(:func:`locality_table`): one engine at one memory limit, the same prompts, once on the model's own (trained)
routing and once on uniform random routing forced position by position (``RoutingTrace.uniform`` replayed:
``smallthinker_lab.interventions.replay``), each from an empty cache. The difference in hit rate (and in bytes
read per decode token) at the same limit is what the trained router's skew and reuse give the cache; the miss
breakdown says where it comes from (fewer distinct experts: fewer compulsory misses; reuse: fewer capacity ones).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

ROUTINGS = ("trained", "uniform")


def hit_rate_table(bench: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per engine run of ``bench`` (cold, each from an empty cache): the measured hit rate and misses split into
    compulsory (first touch: a cold cache of any size misses these) and capacity (evicted earlier), as shares of
    the run's requests (the engine's counters), beside Belady's hit rate at the same capacity on the same requests
    (``curves``, from the every-expert run's trace), the policy's misses above Belady's (policy misses), and the
    compulsory ceiling (the best any cache reaches on these requests from a cold start)."""
    runs = bench[bench["mode"] == "offload"]
    best = curves[curves["policy"].str.lower() == "belady"].set_index("capacity_experts")["hit_rate"]
    ceiling = float(curves["ceiling"].iloc[0]) if "ceiling" in curves and len(curves) else np.nan
    rows = []
    for r in runs.to_dict("records"):
        n, cap = r["requests"], int(r["capacity_experts"])
        belady = float(best.get(cap, np.nan))
        rows.append({"variant": r["variant"], "policy": r["policy"], "prefetch": r["prefetch"],
                     "capacity_experts": cap, "share_of_expert_bytes": r["limit_share_of_expert_bytes"],
                     "hit_rate": r["hit_rate"], "compulsory_share": r["compulsory_misses"] / n,
                     "capacity_share": r["capacity_misses"] / n, "belady_hit_rate": belady,
                     "policy_share": belady - r["hit_rate"], "ceiling": ceiling})
    return pd.DataFrame(rows)


def locality_table(model: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, memory_limit,
                   device: str = "cpu", policy: str = "lru", seed: int = 0) -> pd.DataFrame:
    """Rows ``trained`` and ``uniform``: routing, memory_limit, capacity_experts, share_of_expert_bytes, requests,
    hit_rate (prefill and decode, cold), compulsory_share and capacity_share (of the requests), distinct_experts
    (compulsory misses: experts ever touched) and decode_bytes_read_per_token; generations of exactly
    ``max_new_tokens`` (no stop tokens), the uniform trace of prompt ``i`` seeded ``seed + i``."""
    from ..engine import Engine
    from ..interventions import RoutingTrace, replay

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("locality_table needs at least one prompt, each of at least one token")
    rows = []
    with Engine.from_pretrained(model, memory_limit=memory_limit, device=device, policy=policy,
                                progress=False) as engine:
        cfg, plan = engine.config, engine.memory_plan()
        for routing in ROUTINGS:
            engine.reset_stats(clear_cache=True)
            for i, ids in enumerate(prompts):
                ids = [int(t) for t in ids]
                trace = (RoutingTrace.uniform(len(ids) + max_new_tokens - 1, cfg, seed + i)
                         if routing == "uniform" else None)
                with replay(engine, trace) if trace is not None else nullcontext():
                    engine.generate(ids, max_new_tokens, stop_tokens=[])
            s, c = engine.stats(), engine.cache.stats
            n = c.requests
            rows.append({"routing": routing, "memory_limit": memory_limit, "capacity_experts": s["capacity_experts"],
                         "share_of_expert_bytes": s["capacity_experts"] / (cfg.num_hidden_layers * cfg.num_experts),
                         "requests": n, "hit_rate": c.hits / n if n else float("nan"),
                         "compulsory_share": c.compulsory_misses / n if n else float("nan"),
                         "capacity_share": c.capacity_misses / n if n else float("nan"),
                         "distinct_experts": c.compulsory_misses,
                         "decode_bytes_read_per_token": s["decode_bytes_read_per_token"]})
    df = pd.DataFrame(rows)
    df.attrs.update(prompts=len(prompts), max_new_tokens=max_new_tokens, fixed_bytes=plan["fixed_bytes"])
    return df


def locality_paragraph(df: pd.DataFrame) -> str:
    """One paragraph on what locality buys, from :func:`locality_table`'s measured numbers."""
    t, u = (df.set_index("routing").loc[r] for r in ROUTINGS)
    mib = 2**20
    return (f"What locality buys: with the cache holding {t['share_of_expert_bytes']:.0%} of the experts "
            f"({int(t['capacity_experts'])} slots), the trained router's own routing hits {t['hit_rate']:.1%} of "
            f"{int(t['requests'])} expert requests from a cold cache, uniform random routing over the same positions "
            f"{u['hit_rate']:.1%} of {int(u['requests'])} (a prefill requests each expert its tokens share once; "
            f"measured, {df.attrs.get('prompts', '?')} prompts x "
            f"{df.attrs.get('max_new_tokens', '?')} new tokens). The trained routing touches "
            f"{int(t['distinct_experts'])} distinct experts against {int(u['distinct_experts'])} (compulsory misses "
            f"{t['compulsory_share']:.1%} vs {u['compulsory_share']:.1%} of requests) and reuses what it keeps "
            f"(capacity misses {t['capacity_share']:.1%} vs {u['capacity_share']:.1%}); a decode token reads "
            f"{t['decode_bytes_read_per_token'] / mib:.2f} MiB of experts instead of "
            f"{u['decode_bytes_read_per_token'] / mib:.2f} MiB. Benchmarks on random-weight checkpoints route close "
            f"to uniform: their hit rates are the pessimistic end.")


def benchmark_routing_rows(path: str | Path | None = None) -> pd.DataFrame:
    """The engine rows of a benchmark result (``python -m benchmarks.run ... --routing DOMAINS``; default: the
    repository's ``benchmarks/results/bench_gpu_routing.json``, else ``bench_cpu_routing.json``, when there) on the
    synthetic shape, the synthetic uniform routing and each trained routing side by side, per configuration (the
    row's name without its routing and backend, and the backend that ran it): model, configuration, routing,
    hit_rate, mib_read_per_token, decode_tok_s, vs_in_memory (decode tok/s over the same backend's in-memory engine
    row on the same routing), bound_share and repeats (timed generations, one prompt each: rows with different
    repeats saw different prompts, so their hit rates differ by prompt too). Empty when there is no such file."""
    import json
    import re

    if path is None:
        results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
        path = next((results / n for n in ("bench_gpu_routing.json", "bench_cpu_routing.json")
                     if (results / n).is_file()), results / "bench_gpu_routing.json")
    path = Path(path)
    cols = ["model", "configuration", "routing", "hit_rate", "mib_read_per_token", "decode_tok_s", "vs_in_memory",
            "bound_share", "repeats"]
    if not path.is_file():
        return pd.DataFrame(columns=cols)
    res = json.loads(path.read_text(encoding="utf-8"))
    rows = [r for r in res.get("rows", []) if r.get("mode") == "engine" and not r.get("error")]

    def config(r) -> str:  # "60% lru prefetch (kernels)": cuda_graph=kernels and backend=kernels are one backend
        name = re.sub(r" (routing|backend|cuda_graph)=\S+", "", r["name"].split(" ", 1)[1]).strip()
        return f"{name} ({r.get('backend') or 'eager'})"

    memory = {(r.get("routing"), r.get("backend")): r.get("decode_tok_s") for r in rows
              if r.get("limit_share_of_expert_bytes") == 1.0 and r.get("variant") == "in memory"}
    configs = {config(r) for r in rows if r.get("routing")}
    out = []
    for r in rows:
        if config(r) not in configs:
            continue
        base = memory.get((r.get("routing"), r.get("backend")))
        rate = r.get("decode_tok_s")
        out.append({"model": r["model"], "configuration": config(r),
                    "routing": f"trained ({r['routing']})" if r.get("routing") else "synthetic uniform",
                    "hit_rate": r.get("hit_rate"), "mib_read_per_token": (r.get("bytes_read_per_token") or 0) / 2**20,
                    "decode_tok_s": rate, "vs_in_memory": rate / base if rate and base else float("nan"),
                    "bound_share": r.get("bound_share"), "repeats": r.get("repeats")})
    df = pd.DataFrame(out, columns=cols).sort_values(["configuration", "routing"], kind="stable")
    df.attrs["source"] = str(path)
    return df.reset_index(drop=True)
