"""``smallthinker-lab report``: run the prompt sets through the engine with the instruments on and write report/.

What it does, in order (one progress bar per stage):

1. profile: every prompt set (``--max-prompts`` each, ``--max-new-tokens`` each) through the offloading engine
   under ``--memory-limit`` (LRU, prefetch on) with every instrument on: expert routing, neuron sparsity, KV
   bytes, cache events, timing;
2. bench: the first ``--bench-prompts`` prompts of each set, instruments off, timed: in memory (the model with
   every weight resident), the engine with a cache that holds every expert, under the limit (LRU and LFU,
   prefetch on and off), at 25% and 75% of the expert bytes, and at the minimum (no cache; with prefetch off
   that is naive on-demand offload). The hit-rate curves come from the expert trace of the every-expert run,
   so each limited run's measured LRU hit rate is a point on its curve;
3. write PNGs, CSVs and an ``index.html`` that shows them together (static: images referenced relatively, no
   JavaScript).

``--memory-limit`` is a size ("24MiB", "1.5GiB", bytes) or a share of the expert bytes ("50%": the engine's
fixed working set plus half of all experts). ``--threads auto`` (the default) runs a small model such as the
default one on one CPU thread: its matrices are too small for more to pay, and on a busy machine spinning threads
make decode many times slower. The defaults (8 prompts per set, 16 new tokens, 2 bench prompts per set) take one
to three minutes on a laptop CPU with the default model.
"""

from __future__ import annotations

import html
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .locality import hit_rate_table  # noqa: F401  (the report's table; lives with the cache-behaviour tables)
from .prompts import PROMPT_SETS, load_prompt_sets

MiB = 2**20
KINDS = ("experts", "neurons", "kv", "cache", "timing")


# ------------------------------------------------------------------ limits
def _share(limit) -> float | None:
    from ..engine.memory import share_of

    return share_of(limit)


def check_limit(limit: str | int | float | None) -> None:
    """Raise ValueError naming ``limit`` if it is neither a size nor "NN%" (before any engine is opened)."""
    from ..engine.memory import parse_memory_limit

    if _share(limit) is None:
        parse_memory_limit(limit)


def resolve_limit(limit: str | int | float | None, plan: dict[str, Any]) -> int | None:
    """Bytes of a memory limit: a size, or "NN%" of all expert bytes on top of the fixed working set (never
    below the engine's minimum). ``plan`` is an engine's ``memory_plan()`` (engine/memory.py resolve_memory_limit)."""
    from ..engine.memory import resolve_memory_limit

    return resolve_memory_limit(limit, plan)


def limit_for_share(plan: dict[str, Any], share: float) -> int:
    """The limit whose expert cache holds ``share`` of all experts (engine/memory.py)."""
    from ..engine.memory import limit_for_share as for_share

    return for_share(plan, share)


def prepare(model: str | Path, prompt_sets: dict[str, Sequence[str]], max_prompt_tokens: int | None = 256,
            device: str = "cpu", progress: bool = False) -> tuple[dict[str, Any], Any, dict[str, list[list[int]]]]:
    """Open the engine once (converting the expert bundle on first use): its memory plan with no limit (the
    fixed working set and expert sizes), the config, and every prompt as token ids cut to ``max_prompt_tokens``."""
    from ..engine import Engine

    engine = Engine.from_pretrained(model, memory_limit=None, device=device, progress=progress)
    try:
        ids = {n: [engine.encode(p)[0, :max_prompt_tokens].tolist() for p in ps] for n, ps in prompt_sets.items()}
        return dict(engine.memory_plan()), engine.config, ids
    finally:
        engine.close()


# ------------------------------------------------------------------ non-finite logits
@dataclass
class LogitWatch:
    """What :func:`watch_logits` saw: forward steps, those whose logits held a NaN or an infinity, the first."""

    steps: int = 0
    non_finite: int = 0
    first_step: int | None = None
    first_detail: str = ""

    def message(self, what: str) -> str:
        return (f"{what}: the logits were not finite (NaN or infinite) in {self.non_finite} of {self.steps} forward "
                f"steps, first at step {self.first_step} ({self.first_detail}): the weights hold NaN/Inf or "
                f"overflow the compute dtype (load with check_finite=True to find the tensor); tokens, hit rates "
                f"and timings of this run are not meaningful")


def watch_logits(engine) -> LogitWatch:
    """Count the engine's forward steps whose logits are not finite (wraps ``engine.forward`` of this engine)."""
    import torch

    watch, forward = LogitWatch(), engine.forward

    def checked(*args, **kwargs):
        logits = forward(*args, **kwargs)
        finite = torch.isfinite(logits)
        if not bool(finite.all()):
            watch.non_finite += 1
            if watch.first_step is None:
                watch.first_step = watch.steps
                watch.first_detail = (f"{int(torch.isnan(logits).sum())} NaN, {int(torch.isinf(logits).sum())} "
                                      f"infinite of {logits.numel()} logits")
        watch.steps += 1
        return logits

    engine.forward = checked
    return watch


# ------------------------------------------------------------------ runs
@dataclass
class Bench:
    """Timed runs: one row per run (``rows``), the expert trace of the every-expert run (``trace``: the hit-rate
    curves' input; each limited run replays the same requests), the per-layer stats of the main run."""

    rows: pd.DataFrame
    trace: list
    main_layers: pd.DataFrame | None


def default_runs(plan: dict[str, Any], main_limit: int) -> list[tuple[str, int, str, bool]]:
    """(variant, memory_limit, policy, prefetch) of the report's timed engine runs, duplicates removed."""
    minimum = int(plan["minimum_bytes"])
    runs = [
        ("all experts cached", limit_for_share(plan, 1.0), "lru", True),
        ("full", main_limit, "lru", True),
        ("no prefetch", main_limit, "lru", False),
        ("full", main_limit, "lfu", True),
        ("full", limit_for_share(plan, 0.25), "lru", True),
        ("full", limit_for_share(plan, 0.75), "lru", True),
        ("no cache", minimum, "lru", True),
        ("naive offload", minimum, "lru", False),
    ]
    seen, unique = set(), []
    for r in runs:
        if r[1:] not in seen:
            seen.add(r[1:])
            unique.append(r)
    return unique


def _timed(generate_one, prompts: Sequence[Sequence[int]], max_new_tokens: int, bar) -> dict[str, float]:
    """Prefill/decode seconds and tokens over the prompts, with ``generate_one(ids, n, stats)``."""
    from ..model.generate import GenerationStats

    out = {"prompts": 0, "prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0}
    for ids in prompts:
        st = GenerationStats()
        generate_one(ids, max_new_tokens, st)
        out["prompts"] += 1
        out["prefill_tokens"] += st.prompt_tokens
        out["prefill_seconds"] += st.prefill_seconds
        out["decode_tokens"] += len(st.decode_token_seconds)
        out["decode_seconds"] += st.decode_seconds
        bar.update(1)
    return out


def _rates(t: dict[str, float]) -> dict[str, float]:
    return {"prefill_tok_s": t["prefill_tokens"] / t["prefill_seconds"] if t["prefill_seconds"] else np.nan,
            "decode_tok_s": t["decode_tokens"] / t["decode_seconds"] if t["decode_seconds"] else np.nan,
            "prefill_tokens": t["prefill_tokens"], "decode_tokens": t["decode_tokens"]}


def bench_runs(model: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, plan: dict[str, Any],
               main_limit: int, device: str = "cpu", runs: Sequence[tuple[str, int, str, bool]] | None = None,
               memory_bandwidth: float | None = None, progress: bool = True, backend: str = "auto") -> Bench:
    """Time the in-memory model and the engine's ``runs`` (default :func:`default_runs`) over the same prompts,
    instruments off, each engine from an empty cache. Rows: mode, variant, device, memory_limit,
    limit_share_of_expert_bytes, policy, prefetch, prefill/decode tok/s and tokens, hit_rate,
    bytes_read_per_token (decode), io_wait_share, capacity_experts, requests, compulsory_misses, capacity_misses
    (the engine's counters), bound_share (see :func:`decode_bound`)."""
    from tqdm.auto import tqdm

    from ..engine import Engine
    from ..model import load_model
    from ..model.generate import stream_generate

    runs = list(runs) if runs is not None else default_runs(plan, main_limit)
    total = int(plan["total_expert_bytes"])
    bw = memory_bandwidth or measure_memory_bandwidth()
    rows, trace, main_layers = [], [], None
    bar = tqdm(total=len(prompts) * (len(runs) + 1), desc="bench", unit="gen", disable=not progress)
    try:
        lm = load_model(model, device=device)
        config = lm.config

        def gen_model(ids, n, st):
            for _ in stream_generate(lm, ids, n, stats=st):
                pass

        t = _timed(gen_model, prompts, max_new_tokens, bar)
        rows.append({"mode": "in_memory", "variant": "in memory", "device": device, "memory_limit": np.nan,
                     "limit_share_of_expert_bytes": 1.0, "policy": None, "prefetch": None, **_rates(t),
                     "hit_rate": np.nan, "bytes_read_per_token": 0.0, "io_wait_share": 0.0,
                     "capacity_experts": np.nan, "requests": np.nan, "compulsory_misses": np.nan,
                     "capacity_misses": np.nan})
        lm = None  # free it before the engines run
        for variant, limit, policy, prefetch in runs:
            engine = Engine.from_pretrained(model, memory_limit=limit, device=device, policy=policy,
                                            prefetch=prefetch, progress=False, backend=backend)
            try:
                engine.reset_stats(clear_cache=True)

                def gen_engine(ids, n, st, engine=engine):
                    for _ in engine.stream(ids, n, stats=st):
                        pass

                t = _timed(gen_engine, prompts, max_new_tokens, bar)
                s = engine.stats()
                c = engine.cache.stats
                if variant == "all experts cached":
                    trace = list(engine.trace)
                if (limit, policy, prefetch) == (main_limit, "lru", True):
                    main_layers = engine.stats_frame()
            finally:
                engine.close()
            busy = t["prefill_seconds"] + t["decode_seconds"]
            rows.append({"mode": "offload", "variant": variant, "device": device, "memory_limit": limit,
                         "limit_share_of_expert_bytes": s["capacity_experts"] * s["expert_nbytes"] / total,
                         "policy": policy, "prefetch": prefetch, **_rates(t), "hit_rate": s["hit_rate"],
                         "bytes_read_per_token": s["decode_bytes_read_per_token"],
                         "io_wait_share": s["io_wait_seconds"] / busy if busy else np.nan,
                         "capacity_experts": s["capacity_experts"], "requests": c.requests,
                         "compulsory_misses": c.compulsory_misses, "capacity_misses": c.capacity_misses})
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    mean_context = float(np.mean([len(p) for p in prompts])) + max_new_tokens / 2
    df["bound_share"] = [decode_bound(plan, config, r, bw, mean_context) * r["decode_tok_s"]
                         for r in df.to_dict("records")]
    df.attrs["memory_bandwidth"] = bw
    return Bench(df, trace, main_layers)


def measure_memory_bandwidth(nbytes: int = 64 * MiB, repeats: int = 5) -> float:
    """Bytes/s of a large in-memory copy (read + written bytes counted; the best of ``repeats``)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_bound(plan: dict[str, Any], config, row: dict[str, Any], bandwidth: float, context: float) -> float:
    """Seconds per decode token no engine can beat on this machine (../shared/reference/performance.md):
    max(T_mem, T_io), T_mem = (non-expert + KV + the routed experts' bytes) / memory bandwidth, T_io = expert
    bytes read per token / the same bandwidth (reads served from the page cache are memory copies)."""
    from ..model.kv_cache import kv_cache_bytes

    kv = kv_cache_bytes(config, int(context))
    experts = config.num_hidden_layers * config.top_k * int(plan["expert_slot_bytes"])
    t_mem = (int(plan["non_expert_bytes"]) + kv + experts) / bandwidth
    read = row.get("bytes_read_per_token") or 0.0
    t_io = (0.0 if read != read else float(read)) / bandwidth
    return max(t_mem, t_io)


# ------------------------------------------------------------------ the report
def resolve_threads(threads: int | str | None, model: str | Path) -> int | None:
    """torch CPU threads for a run: an int; None (torch's default); "auto": 1 for a model whose hidden size is at
    most 1024 (its matrices are too small for threads to pay, and on a busy machine spinning threads make decode
    many times slower), else torch's default."""
    if threads is None or isinstance(threads, int):
        return threads
    if str(threads) != "auto":
        return int(threads)
    from ..model.checkpoint import resolve_path
    from ..model.config import SmallThinkerConfig

    return 1 if SmallThinkerConfig.from_json(resolve_path(model)).hidden_size <= 1024 else None


def write_report(model: str | Path = "default", out: str | Path = "report", memory_limit: str | int | None = "50%",
                 max_prompts: int = 8, max_new_tokens: int = 16, bench_prompts: int = 2, device: str = "cpu",
                 prompt_sets: Sequence[str] | None = None, max_prompt_tokens: int = 256,
                 threads: int | str | None = "auto", progress: bool = True, backend: str = "auto") -> list[Path]:
    """Run the prompt sets with the instruments on and write PNGs, CSVs and index.html to ``out``.

    Returns the files written (index.html last). See the module docstring for what runs; ``threads``: see
    :func:`resolve_threads` (the previous torch setting is restored afterwards).
    """
    import torch

    before = torch.get_num_threads()
    n = resolve_threads(threads, model)
    if n:
        torch.set_num_threads(n)
    try:
        return _write_report(model, Path(out), memory_limit, max_prompts, max_new_tokens, bench_prompts, device,
                             prompt_sets, max_prompt_tokens, progress, backend)
    finally:
        torch.set_num_threads(before)


def _write_report(model, out: Path, memory_limit, max_prompts: int, max_new_tokens: int, bench_prompts: int,
                  device: str, prompt_sets, max_prompt_tokens: int, progress: bool,
                  backend: str = "auto") -> list[Path]:
    import matplotlib.pyplot as plt

    from ..engine import Engine
    from ..instruments import Recording, profile
    from ..instruments.curves import hit_rate_curves
    from ..instruments.metrics import (
        expert_frequency,
        expert_usage_divergence,
        hit_rates,
        io_wait_share,
        kv_footprint,
        neuron_sparsity_by_layer,
        neuron_sparsity_by_neuron,
        neuron_sparsity_definitions,
        throughput,
    )
    from ..instruments.sparsity import chance_recording
    from ..model.config import SmallThinkerConfig
    from . import plots, tables
    from .locality import benchmark_routing_rows, locality_paragraph, locality_table

    t_start = time.perf_counter()
    check_limit(memory_limit)
    out.mkdir(parents=True, exist_ok=True)
    names = list(prompt_sets or PROMPT_SETS)
    texts = load_prompt_sets(names, max_prompts)
    written: list[Path] = []

    # 1. profile under the limit, instruments on
    plan, config, ids = prepare(model, texts, max_prompt_tokens, device, progress)
    limit = resolve_limit(memory_limit, plan)
    if limit is None:
        limit = limit_for_share(plan, 1.0)
    engine = Engine.from_pretrained(model, memory_limit=limit, device=device, policy="lru", prefetch=True,
                                    progress=False, backend=backend)
    watch = watch_logits(engine)
    try:
        engine.reset_stats(clear_cache=True)
        recs = [profile(engine, ids[n], dataset=n, max_new_tokens=max_new_tokens, kinds=KINDS, progress=progress)
                for n in names]
        main_plan = engine.memory_plan(as_frame=True)
        profile_stats = engine.stats()
    finally:
        engine.close()
    rec = Recording.concat(recs)
    if watch.non_finite:
        warnings.warn(watch.message(f"report on {model}"), RuntimeWarning, stacklevel=3)

    # 2. timed runs
    bench_ids = [p for n in names for p in ids[n][:bench_prompts]]
    bench_result = bench_runs(model, bench_ids, max_new_tokens, plan, limit, device=device, progress=progress,
                              backend=backend)
    bench, trace, main_layers = bench_result.rows, bench_result.trace, bench_result.main_layers
    locality = locality_table(model, bench_ids, max_new_tokens, limit, device=device)  # trained vs uniform routing

    # 3. frames and tables
    experts = rec.to_dataframe("experts")
    freq = expert_frequency(experts, config.num_experts)
    neurons, counts = rec.to_dataframe("neurons"), rec.to_dataframe("neuron_counts")
    chance = chance_recording(config, {n: ids[n] for n in names}, 0, max_new_tokens).to_dataframe("neuron_counts")
    live = [d[~d["dead"]] for d in (neuron_sparsity_by_neuron(c.assign(dataset="all")) for c in (counts, chance))]
    kv = rec.to_dataframe("kv")
    cache = rec.to_dataframe("cache")
    timing = rec.to_dataframe("timing")
    n_total = int(plan["total_expert_bytes"] // plan["expert_slot_bytes"])
    caps = sorted(set(np.linspace(0, n_total, min(n_total + 1, 129)).round().astype(int).tolist())
                  | {int(c) for c in bench["capacity_experts"].dropna()})
    curves = hit_rate_curves(trace, capacities=caps, policies=("lru", "lfu", "belady"),
                             expert_nbytes=int(plan["expert_slot_bytes"]))
    kv_configs = {"SmallThinker-4B-A0.6B": SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
                  "SmallThinker-21B-A3B": SmallThinkerConfig.from_name("smallthinker-21b-a3b"),
                  f"{Path(str(model)).name if str(model) != 'default' else 'smallthinker-tiny'} (this model)": config}
    kv_contexts = (1024, 2048, 4096, 8192, 16384, 32768)

    csvs: dict[str, tuple[pd.DataFrame, str]] = {
        "throughput_table.csv": (tables.throughput_table(bench), "Throughput: in memory vs under the limit"),
        "ablation_table.csv": (tables.ablation_table(bench), "Ablation: prefetch and cache"),
        "bench_runs.csv": (bench, None),
        "expert_usage_table.csv": (tables.expert_usage_table(freq), "Expert usage per prompt set"),
        "expert_frequency.csv": (freq, None),
        "expert_usage_divergence.csv": (expert_usage_divergence(freq), None),
        "sparsity_table.csv": (tables.sparsity_table(neurons), "Neuron sparsity per layer"),
        "sparsity_by_layer.csv": (neuron_sparsity_by_layer(neurons), None),
        "sparsity_definitions.csv": (neuron_sparsity_definitions(neurons, counts), None),
        "kv_table.csv": (tables.kv_table(kv_configs, kv_contexts), "KV cache: hybrid vs all-global"),
        "kv_footprint.csv": (kv_footprint(kv, config), None),
        "hit_rates_per_layer.csv": (hit_rates(cache), "Hit rate per layer (profile run)"),
        "hit_rate_table.csv": (hit_rate_table(bench, curves),
                               "Hit rate and misses per run, from a cold cache: compulsory (first touch), capacity "
                               "(evicted earlier), the policy's gap to Belady, the cold-start ceiling"),
        "hit_rate_curves.csv": (curves, None),
        "locality_table.csv": (locality, "What locality buys: the same limit and prompts on the model's routing and "
                                         "on uniform random routing (replayed), cold"),
        "instrumented_throughput.csv": (throughput(timing), None),
        "io_wait_share.csv": (io_wait_share(timing), None),
        "memory_plan.csv": (main_plan.reset_index(), "Memory plan under the limit"),
    }
    if main_layers is not None:
        csvs["engine_stats_per_layer.csv"] = (main_layers.reset_index(), None)
    if len(routed := benchmark_routing_rows()):  # the repository's benchmark result, when there is one
        csvs["benchmark_routing.csv"] = (routed, f"Big synthetic shape, uniform vs trained routing "
                                                 f"({routed.attrs['source']})")
    for fname, (df, _) in csvs.items():
        if not isinstance(df.index, pd.RangeIndex):  # e.g. per layer, indexed by layer
            df = df.reset_index()
            csvs[fname] = (df, csvs[fname][1])
        df.to_csv(out / fname, index=False)
        written.append(out / fname)

    # 4. figures
    measured = bench[bench["mode"] == "offload"].assign(
        capacity_bytes=lambda d: d["capacity_experts"] * plan["expert_slot_bytes"])
    measured = measured[measured["variant"] != "all experts cached"]
    shown = Path(str(model)).name if str(model) != "default" else "smallthinker-tiny (default)"
    on = f"up to {max_prompts} prompts of each of {', '.join(names)}"
    figures = {
        "expert_heatmaps.png": ("Expert activation frequency (Figures 4-5)",
                                lambda: plots.plot_expert_heatmaps(freq, datasets=names, n_experts=config.num_experts,
                                                                   ncols=2, title=f"{shown}: {on}")),
        "expert_frequency_distribution.png": ("Expert frequency distribution",
                                              lambda: plots.plot_expert_frequency_distribution(freq)),
        "sparsity_boxplots.png": ("Per-neuron sparsity per layer (Figure 6), hatched: the random initialisation",
                                  lambda: plots.plot_sparsity_boxplots(live[0], baseline=live[1],
                                                                       baseline_label="random init (seed 0)",
                                                                       ylabel="per-neuron sparsity",
                                                                       title=f"{shown}: {on}")),
        "kv_per_layer.png": ("KV-cache bytes per layer (measured)", lambda: plots.plot_kv_per_layer(kv)),
        "kv_vs_context.png": ("KV cache against context: hybrid vs all-global (released shapes; this model)",
                              lambda: _kv_vs_context(plots, kv_configs, kv_contexts)),
        "hit_rate_curves.png": ("Hit rate against cache capacity, measured points",
                                lambda: plots.plot_hit_rate_curves(
                                    curves, measured[["policy", "hit_rate", "capacity_bytes"]],
                                    limit=(limit - plan["fixed_bytes"]), total_bytes=plan["total_expert_bytes"])),
        "throughput.png": ("Decode throughput", lambda: plots.plot_throughput(bench)),
    }
    captions = {}
    for fname, (caption, draw) in figures.items():
        obj = draw()
        fig = obj if hasattr(obj, "savefig") else obj.figure
        fig.savefig(out / fname, dpi=110, bbox_inches="tight", facecolor="white")
        plt.close(fig)
        written.append(out / fname)
        captions[fname] = caption

    # 5. index.html
    summary = {
        "model": str(model), "device": device, "memory limit": f"{limit / MiB:.2f} MiB",
        "expert cache": f"{profile_stats['capacity_experts']} of {n_total} experts "
                        f"({profile_stats['capacity_experts'] / n_total:.0%} of the expert bytes)",
        "prompt sets": ", ".join(f"{n} ({len(ids[n])})" for n in names),
        "new tokens per prompt": max_new_tokens, "bench prompts per set": bench_prompts,
        "profile hit rate": f"{profile_stats['hit_rate']:.1%}",
        "what locality buys": locality_paragraph(locality),
        "non-finite logits": (f"WARNING: {watch.non_finite} of {watch.steps} forward steps (first at step "
                              f"{watch.first_step}: {watch.first_detail}); results are not meaningful"
                              if watch.non_finite else f"none ({watch.steps} forward steps checked)"),
        "wall time": f"{time.perf_counter() - t_start:.0f} s",
    }
    index = out / "index.html"
    index.write_text(_html(summary, figures=captions, tables={k: v for k, v in csvs.items() if v[1]},
                           files=[p.name for p in written]), encoding="utf-8")
    written.append(index)
    return written


def _kv_vs_context(plots, configs: dict, contexts: Sequence[int]):
    """Two panels: the released shapes (4B, 21B), and this model (too small to read on the same axis)."""
    import matplotlib.pyplot as plt

    names = list(configs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    plots.plot_kv_vs_context({n: configs[n] for n in names[:-1]}, contexts, ax=a)
    plots.plot_kv_vs_context({names[-1]: configs[names[-1]]}, contexts, ax=b)
    a.set_title("released shapes (bf16)")
    b.set_title("this model (bf16)")
    return fig


def _fmt(v: Any) -> str:
    """A cell of the report's tables: floats to 3 significant digits (from 1000 on, whole with separators)."""
    if isinstance(v, float | np.floating):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _table_html(df: pd.DataFrame, index: bool = False, header: bool = True, cls: str | None = None) -> str:
    """A DataFrame as a plain HTML table through pandas' Styler: cells and labels HTML-escaped, NaN blank, no
    styling ids (the page's CSS lays the tables out; ``cls``: a class on a div around it)."""
    styler = df.style.format(_fmt, na_rep="", escape="html").format_index(escape="html", axis=0).format_index(
        escape="html", axis=1)
    if not index:
        styler = styler.hide(axis="index")
    if not header:
        styler = styler.hide(axis="columns")
    table = styler.to_html(exclude_styles=True)
    return f"<div class='{cls}'>{table}</div>" if cls else table


def _html(summary: dict[str, Any], figures: dict[str, str], tables: dict[str, tuple[pd.DataFrame, str]],
          files: list[str]) -> str:
    css = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
           "font-size:13px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
           ".figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}"
           "figure{margin:0 0 1em;flex:1 1 480px;max-width:100%}"
           "img{max-width:100%;border:1px solid #eee}figcaption{color:#555}"
           ".summary td{text-align:left}")
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>SmallThinker report</title>",
             f"<style>{css}</style></head><body><h1>SmallThinker report</h1>"]
    rows = pd.DataFrame({"value": [str(v) for v in summary.values()]}, index=[str(k) for k in summary])
    parts.append(_table_html(rows, index=True, header=False, cls="summary"))
    parts.append("<h2>Figures</h2><div class='figs'>")
    for fname, caption in figures.items():
        parts.append(f"<figure><img src='{fname}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)} ({fname})</figcaption></figure>")
    parts.append("</div><h2>Tables</h2>")
    for fname, (df, title) in tables.items():
        parts.append(f"<h3>{html.escape(title)} (<a href='{fname}'>{fname}</a>)</h3>{_table_html(df)}")
    parts.append("<h2>Files</h2><ul>")
    parts += [f"<li><a href='{f}'>{f}</a></li>" for f in files]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------ CLI
REPORT_DESCRIPTION = """\
Run the prompt sets through the offloading engine with every instrument on, time the engine against the
in-memory model and other memory limits, and write PNGs, CSVs and an index.html (static, no JavaScript).

1. profile: --max-prompts prompts of each set, --max-new-tokens each, under --memory-limit (LRU, prefetch on),
   recording expert routing, neuron sparsity, KV-cache bytes, cache events and timing;
2. bench: the first --bench-prompts prompts of each set, instruments off: in memory, with every expert cached,
   under the limit (LRU and LFU, prefetch on and off), at 25% and 75% of the expert bytes, and with no cache;
3. hit rate against memory limit at every cache size, from the expert trace of the every-expert run.

The defaults take one to three minutes on a laptop CPU with the default model."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="run the prompt sets with the instruments on and write report/ (PNG, CSV, index.html)",
        description=REPORT_DESCRIPTION)
    p.add_argument("--model", default="default", help="checkpoint folder, or 'default' (the shipped tiny model)")
    p.add_argument("--memory-limit", default="50%",
                   help="the engine's memory limit: a size (24MiB, 1.5GiB) or a share of the expert bytes on top "
                        "of the fixed working set (50%%); default 50%%")
    p.add_argument("--out", default="report", help="output folder (default report/)")
    p.add_argument("--max-prompts", type=int, default=8, help="prompts per set for the profile (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--bench-prompts", type=int, default=2,
                   help="prompts per set for each timed run (default 2)")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts are cut to this many tokens")
    p.add_argument("--prompt-sets", nargs="+", default=list(PROMPT_SETS),
                   help=f"names of shipped prompt sets or .jsonl paths (default: {' '.join(PROMPT_SETS)})")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "kernels", "fused", "graph", "eager"],
                   help="how the engine decodes (default auto: the fastest that can run; the instruments' hooks run "
                        "their steps eagerly)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, 'default' (torch's choice) or 'auto' (the default: 1 for a "
                        "model with hidden size <= 1024 such as the default model, else torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    files = write_report(model=args.model, out=args.out, memory_limit=args.memory_limit,
                         max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens,
                         bench_prompts=args.bench_prompts, device=args.device, prompt_sets=args.prompt_sets,
                         max_prompt_tokens=args.max_prompt_tokens,
                         threads=None if args.threads == "default" else args.threads,
                         progress=not args.no_progress, backend=args.backend)
    for f in files:
        print(f)
    print(f"report: open {files[-1]}")
    return 0
