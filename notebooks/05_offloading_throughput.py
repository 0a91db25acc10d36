# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Offloading: throughput under a memory limit
#
# The same prompts, timed: the model with every weight in memory; the engine with a cache that holds every
# expert; under the limit with LRU and LFU, prefetch on and off; at 25% and 75% of the expert bytes; and at the
# minimum (no cache: with prefetch off that is naive on-demand offload). Each run reports its hit rate, bytes read
# per token, I/O wait and the share of its bound (the memory-bandwidth floor, or the reads, whichever is longer).
# The hit-rate curves come from the every-expert run's trace, so the limited LRU runs are points on the curve.

# %% tags=["parameters"]
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
BENCH_PROMPTS = 2  # per set
MAX_NEW_TOKENS = 16
MEMORY_LIMIT = "50%"
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import numpy as np
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, report, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

plan, cfg, ids = report.prepare(MODEL, load_prompt_sets(PROMPT_SETS, BENCH_PROMPTS))
limit = report.resolve_limit(MEMORY_LIMIT, plan)
prompts = [p for ps in ids.values() for p in ps]
bench = report.bench_runs(MODEL, prompts, MAX_NEW_TOKENS, plan, limit)
print(f"memory bandwidth (copy): {bench.rows.attrs['memory_bandwidth'] / 1e9:.1f} GB/s; "
      f"limit {limit / 2**20:.2f} MiB")

# %% [markdown]
# ## Throughput (as the paper's Tables 4-7)

# %%
tables.throughput_table(bench.rows)

# %%
plots.plot_throughput(bench.rows);

# %% [markdown]
# ## Ablation: prefetch, cache, naive on-demand offload

# %%
tables.ablation_table(bench.rows)

# %% [markdown]
# ## Hit rate against the memory limit

# %%
n_total = plan["total_expert_bytes"] // plan["expert_slot_bytes"]
caps = sorted(set(np.linspace(0, n_total, min(n_total + 1, 129)).round().astype(int)))
curves = sl.metrics.hit_rate_curves(bench.trace, capacities=caps, policies=("lru", "lfu", "belady"),
                            expert_nbytes=plan["expert_slot_bytes"])
runs = bench.rows[(bench.rows["mode"] == "offload") & (bench.rows["variant"] != "all experts cached")]
measured = runs.assign(capacity_bytes=runs["capacity_experts"] * plan["expert_slot_bytes"])
plots.plot_hit_rate_curves(curves, measured[["policy", "hit_rate", "capacity_bytes"]],
                           limit=limit - plan["fixed_bytes"], total_bytes=plan["total_expert_bytes"]);

# %% [markdown]
# ## Misses: compulsory, capacity, policy
#
# Every run starts from an empty cache, so its first touch of each expert is a miss no cache size avoids
# (compulsory); the rest of the misses are capacity misses (an expert evicted earlier and needed again). Against
# Belady's optimal policy at the same capacity, on the same requests, the gap is the policy's own share (policy
# misses); the ceiling is the best any cache reaches on these requests from a cold start.

# %%
report.hit_rate_table(bench.rows, curves)

# %% [markdown]
# ## What locality buys
#
# The same engine, limit and prompts, once on the model's own routing and once on uniform random routing forced
# position by position (`sl.replay` of `sl.RoutingTrace.uniform`), each from an empty cache: the trained router
# reuses the experts the cache keeps (fewer capacity misses), and touches no more distinct experts.

# %%
from smallthinker_lab.analysis.locality import benchmark_routing_rows, locality_paragraph, locality_table

locality = locality_table(MODEL, prompts, MAX_NEW_TOKENS, limit)
print(locality_paragraph(locality))
locality

# %% [markdown]
# ## The 4B shape on trained routing
#
# Benchmarks on a synthetic 4B checkpoint route with random weights: close to uniform, no locality. The suite can
# replay this model's recorded routing on the big shape instead (`python -m benchmarks.run --suite gpu --routing
# gsm8k,zh-news ...`: layer l takes layer l mod L of this model; its E experts map one to one onto a shape with as
# many, else expert e at position t becomes e + E (t mod m) on a shape with m E experts, and a larger top-k is padded
# by the router's next-ranked: `RoutingTrace.for_shape` states the rule it applied), so prefetch, look-ahead and the
# cache policies meet real locality. On a GPU the Triton kernels route to the replayed experts themselves, so the
# kernel rows (the LRU resolved on the GPU included) run on it. No peer can be fed this routing, so `vs_in_memory`
# compares with the engine's own in-memory row under the same replay. Rows of the committed result (hit rates and
# bytes are exact counts; its timings come from the machine that ran it, its header names the model whose routing
# it replays; rows with different `repeats` saw different prompts):

# %%
routed = benchmark_routing_rows()
routed if len(routed) else print("no benchmarks/results/bench_gpu_routing.json in this checkout")

# %%
# what the trained routing's locality buys at the same limit and backend, as ratios to the uniform row
for cfg_name, group in routed.groupby("configuration"):
    uniform = group[group.routing == "synthetic uniform"]
    if uniform.empty or uniform.hit_rate.iloc[0] >= 1:
        continue
    u = uniform.iloc[0]
    for _, r in group[group.routing != "synthetic uniform"].iterrows():
        print(f"{cfg_name}, {r.routing}: hit rate {r.hit_rate:.2f} vs {u.hit_rate:.2f} uniform, "
              f"{r.mib_read_per_token:.0f} vs {u.mib_read_per_token:.0f} MiB read per token, decode "
              f"{r.decode_tok_s / u.decode_tok_s:.2f}x the uniform row's ({r.repeats} vs {u.repeats} repeats)")

# %% [markdown]
# ## Bytes per token, I/O wait and the share of the bound

# %%
bench.rows[["variant", "memory_limit", "policy", "prefetch", "hit_rate", "bytes_read_per_token", "io_wait_share",
            "decode_tok_s", "bound_share"]]

# %% [markdown]
# ## Where the main run's time goes, per layer

# %%
bench.main_layers
