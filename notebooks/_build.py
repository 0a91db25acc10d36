"""Write the workbench notebooks (outputs stripped) from the cell sources below: ``python notebooks/_build.py``.

Each notebook starts with a markdown title and a code cell tagged ``parameters`` (papermill's convention), whose
small defaults the tests replace; the rest calls the library and shows. Edit here, then rebuild; ``--check``
exits 1 when a notebook on disk differs from what this script would write.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent



def setup(imports: str, body: str) -> str:
    """The first code cell after the parameters: its imports, the torch threads, then ``body``."""
    return f"""{imports}

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

{body}"""


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

# ---------------------------------------------------------------------------------------------------------- 01
NOTEBOOKS["01_tour"] = [
    ("md", """\
# A tour of SmallThinker

Load the default model (a small SmallThinker trained by this project, `data/models/smallthinker-tiny`) or any
checkpoint folder, look at its architecture, talk to it, then run it through the offloading engine under a memory
limit and read the engine's statistics."""),
    ("parameters", """\
MODEL = "default"  # or a checkpoint folder in the Hugging Face layout
PROMPT = "def fibonacci(n):"
CHAT = "What is 12 plus 30?"
MAX_NEW_TOKENS = 32
MEMORY_LIMIT = "50%"  # a size ("24MiB") or the share of expert bytes the cache holds
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.report import resolve_limit
from smallthinker_lab.engine import Engine
from smallthinker_lab.model.tokenizer import apply_chat_template, load_tokenizer""", """\
model = sl.load_model(MODEL)
tok = load_tokenizer(MODEL)
cfg = model.config
print(f"{model.num_parameters() / 1e6:.2f} M parameters, {cfg.num_hidden_layers} layers, "
      f"{cfg.num_experts} experts per layer ({cfg.top_k} active), vocabulary {cfg.vocab_size}")""")),
    ("md", """\
## Architecture

Per layer: the attention kind (global or sliding window), its window, the position encoding (RoPE, or none:
NoPE) and the experts. SmallThinker repeats 1 NoPE-global layer : 3 RoPE-sliding layers; the router sits before
attention, on the layer's raw input."""),
    ("code", "cfg.layer_table()"),
    ("code", """\
expert_params = 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
pd.Series({
    "hidden size": cfg.hidden_size,
    "attention heads / KV heads": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}",
    "sliding window": cfg.sliding_window_size,
    "expert (gate+up+down) parameters": expert_params,
    "all expert parameters": expert_params * cfg.num_experts * cfg.num_hidden_layers,
    "active expert parameters per token": expert_params * cfg.top_k * cfg.num_hidden_layers,
    "parameters in total": model.num_parameters(),
}).to_frame("value")"""),
    ("md", "## Generate (greedy, in memory)"),
    ("code", """\
ids = tok(PROMPT)["input_ids"]
out = sl.generate(model, ids, MAX_NEW_TOKENS)
print(PROMPT + tok.decode(out))"""),
    ("md", "## Chat (ChatML template)"),
    ("code", """\
chat_ids = apply_chat_template(tok, [{"role": "user", "content": CHAT}])
print(tok.decode(chat_ids))
print(tok.decode(sl.generate(model, chat_ids, MAX_NEW_TOKENS)))"""),
    ("md", """\
## Under a memory limit

The engine keeps the expert weights in one file on storage and only a cache of them in memory. It splits the
limit between the non-expert weights, the KV cache, its workspace and the expert cache:"""),
    ("code", """\
with Engine.from_pretrained(MODEL, memory_limit=None) as probe:
    limit = resolve_limit(MEMORY_LIMIT, probe.memory_plan())
engine = Engine.from_pretrained(MODEL, memory_limit=limit)
engine.memory_plan(as_frame=True)"""),
    ("code", """\
result = engine.generate(PROMPT, MAX_NEW_TOKENS)
print(PROMPT + result.text)
print("same tokens as in memory:", result.tokens == out)"""),
    ("code", """\
stats = engine.stats()
pd.Series({k: stats[k] for k in ("capacity_experts", "hits", "misses", "hit_rate", "bytes_read",
                                 "bytes_read_per_token", "io_wait_seconds", "prefill_tok_s", "decode_tok_s",
                                 "neuron_sparsity")}, dtype=object).to_frame("value")"""),
    ("code", "engine.stats_frame()"),
    ("code", "engine.close()"),
]

# ---------------------------------------------------------------------------------------------------------- 02
NOTEBOOKS["02_expert_specialization"] = [
    ("md", """\
# Expert specialisation

Which experts each domain uses: activation frequency (the share of a domain's tokens routed to an expert) per
layer and expert, on GSM8K, HumanEval, English Wikipedia and Chinese news (the paper's Figures 4-5); how skewed it
is (the paper: 70-80% of experts under 0.14); how different the domains are (Jensen-Shannon divergence); and what
the DP-group global balance loss changes against a conventional micro-batch balance loss."""),
    ("parameters", """\
MODEL = "default"
COMPARE_MODEL = "../data/models/smallthinker-tiny-microbatch"  # trained with the micro-batch balance loss
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 16
MAX_NEW_TOKENS = 16
THRESHOLD = 0.14
DRILL_DATASET = "zh-news"  # the drill-down: a heatmap cell of this domain
DRILL_LAYER = None  # None: the domain's hottest cell
DRILL_EXPERT = None
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets
from smallthinker_lab.model.checkpoint import resolve_path
from smallthinker_lab.model.tokenizer import load_tokenizer""", """\
prompts = load_prompt_sets(PROMPT_SETS, MAX_PROMPTS)


def expert_usage(path):
    \"\"\"The recording (kinds experts, with token ids and pieces) of one model over the prompt sets, and its expert
    frequency per (dataset, layer, expert).\"\"\"
    model = sl.load_model(path)
    tok = load_tokenizer(path)
    recs = [sl.profile(model, ps, dataset=name, kinds=("experts",), max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok)
            for name, ps in prompts.items()]
    rec = sl.Recording.concat(recs)
    return rec, sl.metrics.expert_frequency(rec.to_dataframe("experts"), model.config.num_experts)


rec, freq = expert_usage(MODEL)
freq.head()""")),
    ("md", "## Activation frequency, layer x expert, per domain (one colour scale)"),
    ("code", "plots.plot_expert_heatmaps(freq, ncols=2);"),
    ("md", """\
## Drill-down: the tokens behind one cell

The tokens of one domain that route to one expert most (``sl.metrics.top_tokens``): ``routed`` rows of the token
went to the expert, out of its ``occurrences``; ``share`` is the part of the expert's rows they make up. By default
the domain's hottest cell; set ``DRILL_LAYER`` / ``DRILL_EXPERT`` for another."""),
    ("code", """\
cells = freq[freq["dataset"] == DRILL_DATASET]
if DRILL_LAYER is None:
    hottest = cells.loc[cells["frequency"].idxmax()]
    DRILL_LAYER, DRILL_EXPERT = int(hottest["layer"]), int(hottest["expert"])
print(f"{DRILL_DATASET}: layer {DRILL_LAYER}, expert {DRILL_EXPERT}")
sl.metrics.top_tokens(rec, DRILL_LAYER, DRILL_EXPERT, n=12, dataset=DRILL_DATASET)"""),
    ("md", "## Cold and hot experts"),
    ("code", "plots.plot_expert_frequency_distribution(freq, threshold=THRESHOLD);"),
    ("code", """\
div = sl.metrics.expert_usage_divergence(freq)
tables.expert_usage_table(freq, threshold=THRESHOLD, js=div)"""),
    ("md", """\
## Cross-domain similarity

Jensen-Shannon divergence of expert usage between every pair of domains (bits: 0 same usage, 1 disjoint experts),
averaged over layers, and per layer."""),
    ("code", """\
mean_js = div.groupby(["dataset_a", "dataset_b"])["js_divergence"].mean().unstack()
ax = sns.heatmap(mean_js, annot=True, fmt=".2f", cmap="mako_r", vmin=0)
ax.set(title="mean JS divergence of expert usage", xlabel="", ylabel="");"""),
    ("code", """\
div.assign(pair=div["dataset_a"] + " / " + div["dataset_b"]).pivot(index="layer", columns="pair",
                                                                    values="js_divergence")"""),
    ("md", """\
## DP-group vs micro-batch balance loss

The same figures for a model trained with the conventional micro-batch balance loss (it forces every micro-batch,
hence every domain, to spread over all experts)."""),
    ("code", """\
# the comparison model's weights are not in git (they would push the repository past the device tool's 64 MiB
# tree limit): run it live where its weights are present, else read the frequencies the model card's quality
# script measured on it over the same prompt sets (data/models/smallthinker-tiny/quality_frequency.csv)
MEASURED = resolve_path("default") / "quality_frequency.csv"
if (Path(COMPARE_MODEL) / "model.safetensors").exists():
    _, freq_mb = expert_usage(COMPARE_MODEL)
elif MEASURED.exists():
    print(f"no weights at {COMPARE_MODEL}: using the frequencies the quality script measured on it ({MEASURED.name})")
    measured = pd.read_csv(MEASURED)
    freq_mb = measured[measured["model"] == "micro-batch"].drop(columns=["model"])
    freq_mb = freq_mb[freq_mb["dataset"].isin(PROMPT_SETS)]
else:
    freq_mb = None
if freq_mb is not None:
    div_mb = sl.metrics.expert_usage_divergence(freq_mb)
    summary = pd.DataFrame({
        name: {f"share < {THRESHOLD}": float((f["frequency"] < THRESHOLD).mean()),
               "share >= 0.4": float((f["frequency"] >= 0.4).mean()),
               "largest frequency": float(f["frequency"].max()),
               "mean JS divergence": float(d["js_divergence"].mean())}
        for name, f, d in (("DP-group (default)", freq, div), ("micro-batch", freq_mb, div_mb))})
    display(summary)
    plots.plot_expert_heatmaps(pd.concat([freq[freq.dataset == PROMPT_SETS[0]].assign(dataset="DP-group"),
                                          freq_mb[freq_mb.dataset == PROMPT_SETS[0]].assign(dataset="micro-batch")]))
else:
    print(f"no comparison model at {COMPARE_MODEL} and no measured frequencies at {MEASURED}")"""),
]

# ---------------------------------------------------------------------------------------------------------- 03
NOTEBOOKS["03_neuron_sparsity"] = [
    ("md", """\
# Neuron sparsity of the ReGLU experts

In a routed expert, a neuron whose gate is <= 0 contributes nothing (ReGLU: up(x) * relu(gate(x))). The share of
such neurons per (token, expert) is the sparsity; the paper's Figure 6 shows its distribution per layer (median
above 0.6, early layers near 1). Then what skipping them saves: FLOPs counted from the recording, and time
measured in the engine, dense against sparse (same tokens)."""),
    ("parameters", """\
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 16
TIMING_PROMPTS = 2  # per set, for the dense vs sparse timing
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets
from smallthinker_lab.engine import Engine
from smallthinker_lab.model.tokenizer import load_tokenizer""", """\
model = sl.load_model(MODEL)
cfg = model.config
prompts = load_prompt_sets(PROMPT_SETS, MAX_PROMPTS)
tok = load_tokenizer(MODEL)
rec = sl.Recording.concat([sl.profile(model, ps, dataset=name, kinds=("neurons",), max_new_tokens=MAX_NEW_TOKENS,
                                      tokenizer=tok) for name, ps in prompts.items()])
neurons = rec.to_dataframe("neurons")
neurons.head()""")),
    ("md", "## Sparsity per layer (Figure 6)"),
    ("code", "plots.plot_sparsity_boxplots(neurons);"),
    ("code", "tables.sparsity_table(neurons)"),
    ("code", "by_layer = sl.metrics.neuron_sparsity_by_layer(neurons)\n"
             "by_layer.pivot(index=\"layer\", columns=\"dataset\", values=\"median\")"),
    ("md", """\
## What sparse ReGLU saves

FLOPs per routed (token, expert) pair: dense = gate + up + down = 3 x 2HF; sparse = the gate in full (2HF) plus up
and down only for the active neurons (2 x 2H per neuron)."""),
    ("code", """\
H, F = cfg.hidden_size, cfg.moe_ffn_hidden_size
active = neurons["ffn"] - neurons["inactive"]
flops = pd.Series({"dense": float(len(neurons) * 3 * 2 * H * F),
                   "sparse": float((2 * H * F + 2 * 2 * H * active).sum())})
print(f"expert FLOPs saved by skipping inactive neurons: {1 - flops['sparse'] / flops['dense']:.1%}")
flops.to_frame("expert FLOPs over the recording")"""),
    ("md", "Time, in the engine with every expert resident (after a warm-up), dense against sparse expert compute:"),
    ("code", """\
ids = [tok(p)["input_ids"][:256] for ps in prompts.values() for p in ps[:TIMING_PROMPTS]]
rows, outputs = [], {}
for mode in (False, True):
    with Engine.from_pretrained(MODEL, memory_limit=None, sparse_reglu=mode) as engine:
        engine.generate(ids[0], 2)  # warm-up: read every expert the first prompt needs
        engine.reset_stats()
        outputs[mode] = [engine.generate(i, MAX_NEW_TOKENS).tokens for i in ids]
        s = engine.stats()
    rows.append({"expert compute": "sparse" if mode else "dense", "decode tok/s": s["decode_tok_s"],
                 "prefill tok/s": s["prefill_tok_s"],
                 "MoE ms / token": 1e3 * s["moe_seconds"] / (s["prefill_tokens"] + s["decode_tokens"]),
                 "neuron sparsity": s["neuron_sparsity"]})
print("same tokens dense and sparse:", outputs[False] == outputs[True])
pd.DataFrame(rows).set_index("expert compute")"""),
]

# ---------------------------------------------------------------------------------------------------------- 04
NOTEBOOKS["04_kv_cache"] = [
    ("md", """\
# The KV cache: hybrid NoPE-global / RoPE-sliding attention

Sliding-window layers keep at most `sliding_window_size` positions, global layers all of them. Measured on the
default model (recorded bytes per layer, checked against the analytic formula), then the analytic footprint of the
released 4B and 21B shapes from 1K to 32K tokens, hybrid against every layer global."""),
    ("parameters", """\
MODEL = "default"
PROMPT_SET = "wiki-en"
MAX_PROMPTS = 2
MAX_NEW_TOKENS = 64
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_set
from smallthinker_lab.model.tokenizer import load_tokenizer""", """\
model = sl.load_model(MODEL)
cfg = model.config
tok = load_tokenizer(MODEL)
rec = sl.profile(model, load_prompt_set(PROMPT_SET, MAX_PROMPTS), dataset=PROMPT_SET, kinds=("kv",),
                 max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok)
kv = rec.to_dataframe("kv")
kv.tail()""")),
    ("md", "## Measured bytes per layer (last step of the last prompt)"),
    ("code", """\
last = kv[(kv.sequence == kv.sequence.max())]
plots.plot_kv_per_layer(last);"""),
    ("code", """\
foot = sl.metrics.kv_footprint(kv, cfg)
dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[kv.attrs["kv_itemsize"]]
foot["analytic"] = [sl.kv_cache_bytes(cfg, int(c), dtype) for c in foot["context"]]
print("recorded bytes equal the analytic formula at every step:", bool((foot["bytes"] == foot["analytic"]).all()))
foot.tail()"""),
    ("md", "## The released shapes, 1K to 32K tokens (bf16)"),
    ("code", """\
configs = {"SmallThinker-4B-A0.6B": sl.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
           "SmallThinker-21B-A3B": sl.SmallThinkerConfig.from_name("smallthinker-21b-a3b"),
           "this model": cfg}
plots.plot_kv_vs_context({k: configs[k] for k in list(configs)[:2]}, CONTEXTS);"""),
    ("code", "tables.kv_table(configs, CONTEXTS)"),
    ("code", """\
cfg21 = configs["SmallThinker-21B-A3B"]
plots.plot_kv_per_layer(sl.kv_cache_bytes(cfg21, 16384, per_layer=True), cfg21);"""),
]

# ---------------------------------------------------------------------------------------------------------- 05
NOTEBOOKS["05_offloading_throughput"] = [
    ("md", """\
# Offloading: throughput under a memory limit

The same prompts, timed: the model with every weight in memory; the engine with a cache that holds every
expert; under the limit with LRU and LFU, prefetch on and off; at 25% and 75% of the expert bytes; and at the
minimum (no cache: with prefetch off that is naive on-demand offload). Each run reports its hit rate, bytes read
per token, I/O wait and the share of its bound (the memory-bandwidth floor, or the reads, whichever is longer).
The hit-rate curves come from the every-expert run's trace, so the limited LRU runs are points on the curve."""),
    ("parameters", """\
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
BENCH_PROMPTS = 2  # per set
MAX_NEW_TOKENS = 16
MEMORY_LIMIT = "50%"
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import numpy as np
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, report, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets""", """\
plan, cfg, ids = report.prepare(MODEL, load_prompt_sets(PROMPT_SETS, BENCH_PROMPTS))
limit = report.resolve_limit(MEMORY_LIMIT, plan)
prompts = [p for ps in ids.values() for p in ps]
bench = report.bench_runs(MODEL, prompts, MAX_NEW_TOKENS, plan, limit)
print(f"memory bandwidth (copy): {bench.rows.attrs['memory_bandwidth'] / 1e9:.1f} GB/s; "
      f"limit {limit / 2**20:.2f} MiB")""")),
    ("md", "## Throughput (as the paper's Tables 4-7)"),
    ("code", "tables.throughput_table(bench.rows)"),
    ("code", "plots.plot_throughput(bench.rows);"),
    ("md", "## Ablation: prefetch, cache, naive on-demand offload"),
    ("code", "tables.ablation_table(bench.rows)"),
    ("md", "## Hit rate against the memory limit"),
    ("code", """\
n_total = plan["total_expert_bytes"] // plan["expert_slot_bytes"]
caps = sorted(set(np.linspace(0, n_total, min(n_total + 1, 129)).round().astype(int)))
curves = sl.metrics.hit_rate_curves(bench.trace, capacities=caps, policies=("lru", "lfu", "belady"),
                            expert_nbytes=plan["expert_slot_bytes"])
runs = bench.rows[(bench.rows["mode"] == "offload") & (bench.rows["variant"] != "all experts cached")]
measured = runs.assign(capacity_bytes=runs["capacity_experts"] * plan["expert_slot_bytes"])
plots.plot_hit_rate_curves(curves, measured[["policy", "hit_rate", "capacity_bytes"]],
                           limit=limit - plan["fixed_bytes"], total_bytes=plan["total_expert_bytes"]);"""),
    ("md", "## Bytes per token, I/O wait and the share of the bound"),
    ("code", """\
bench.rows[["variant", "memory_limit", "policy", "prefetch", "hit_rate", "bytes_read_per_token", "io_wait_share",
            "decode_tok_s", "bound_share"]]"""),
    ("md", "## Where the main run's time goes, per layer"),
    ("code", "bench.main_layers"),
]

# ---------------------------------------------------------------------------------------------------------- 06
NOTEBOOKS["06_memory_limit_explorer"] = [
    ("md", """\
# Memory-limit explorer

Move the memory-limit slider: the hit rate the expert cache would reach is predicted at once from the recorded
expert trace of the selected prompt set (its hit-rate curve, computed once). Press **Run** to measure it: the
engine opens under that limit, policy and prefetch setting, the text streams in, and the measured hit rate,
tok/s, I/O wait and per-layer hit rates appear."""),
    ("parameters", """\
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 4
MAX_NEW_TOKENS = 16
LIMIT_MIB = None  # the slider's start (None: half way)
RUN_AT_START = True
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import numpy as np
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots
from smallthinker_lab.analysis.widgets import MemoryLimitExplorer""", """\
explorer = MemoryLimitExplorer(MODEL, PROMPT_SETS, max_prompts=MAX_PROMPTS, max_new_tokens=MAX_NEW_TOKENS,
                               limit_mib=LIMIT_MIB)
if RUN_AT_START:
    explorer.run()
explorer.widget""")),
    ("md", "The curves behind the prediction, for the selected prompt set (rerun this cell after changing it):"),
    ("code", """\
trace = explorer.trace()
curves = sl.metrics.hit_rate_curves(trace, capacities=np.arange(explorer.num_experts_total + 1),
                            policies=("lru", "lfu", "belady"), expert_nbytes=explorer.expert_nbytes)
plots.plot_hit_rate_curves(curves, limit=explorer.capacity_experts * explorer.expert_nbytes,
                           total_bytes=explorer.num_experts_total * explorer.expert_nbytes);"""),
]

# ---------------------------------------------------------------------------------------------------------- 07
NOTEBOOKS["07_interventions"] = [
    ("md", """\
# Interventions: are a domain's experts needed for it?

Notebook 02 shows *which* experts each domain uses; here we ask what happens without them. Ablate a domain's
hottest experts and measure perplexity on every domain (with random ablations of the same size as the control),
force a routing on one prompt, read the residual stream layer by layer through the LM head (the logit lens), and
edit the residual stream through a hook. Every tool works on the in-memory model and on the offloading engine
(``sl.intervene(engine, ...)``)."""),
    ("parameters", """\
MODEL = "default"
M = 4  # experts ablated per layer
SEEDS = [0, 1, 2]  # one random control ablation per seed
N_PROFILE = 50  # texts per domain that choose its hottest experts
N_EVAL = 40  # the next texts per domain: scored (held out)
MAX_TOKENS = 256  # tokens per text
PROMPT = "The history of the city"
MATH_PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\\nAnswer:"
CODE_PROMPT = "def is_even(n):\\n    return"
MAX_NEW_TOKENS = 24
STEER_LAYER = 3  # the residual edit: after this layer
STEER_ALPHA = 1.0  # and its strength
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.prompts import load_prompt_sets
from smallthinker_lab.interventions.plots import plot_logit_lens, plot_specialisation""", """\
model = sl.load_model(MODEL)
cfg = model.config
print(f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts per layer, top-{cfg.top_k}")
sl.hook_points_table()""")),
    ("md", """\
## Ablating a domain's hottest experts

Per domain, the ``M`` experts per layer with the highest activation frequency on its first ``N_PROFILE`` texts leave
the routing (their router logits are -inf, the next-best experts take their tokens); perplexity on the next
``N_EVAL`` texts of every domain, divided by the unablated perplexity. A diagonal above the rest, and above the
random rows, is causal evidence of specialisation."""),
    ("code", """\
result = sl.causal_specialisation(model, m=M, seeds=SEEDS, n_profile=N_PROFILE, n_eval=N_EVAL,
                                  max_tokens=MAX_TOKENS)
result.matrix("ratio")"""),
    ("code", "plot_specialisation(result.table);"),
    ("code", "result.summary()"),
    ("md", """\
## Forced routing on one prompt

Every layer routes each token to the Chinese-news domain's ``top_k`` most used experts (their weights by the
router's rule from their logits): what changes in the greedy continuation?"""),
    ("code", """\
K = cfg.top_k
zh = result.frequency[result.frequency["dataset"] == "zh-news"]
forced = {int(layer): g.nlargest(K, "frequency")["expert"].astype(int).tolist() for layer, g in zh.groupby("layer")}
plain = model.generate(PROMPT, MAX_NEW_TOKENS, stop_tokens=[])
with sl.intervene(model, force=forced), sl.record(model, kinds="experts") as rec:
    steered = model.generate(PROMPT, MAX_NEW_TOKENS, stop_tokens=[])
print("forced:", forced)
print("routing recorded equals the forced experts:",
      all((rec[f"layers.{i}.moe.topk_ids"] == forced[i]).all() for i in forced))
pd.DataFrame({"routing": ["the model's", "forced (zh-news experts)"],
              "continuation": [repr(plain.text), repr(steered.text)]})"""),
    ("md", """\
## Logit lens on a math and a code prompt

The residual after each layer through the final norm and the LM head: where in depth does the next token appear?
Each cell is the top-1 prediction at that position after that layer, coloured by its probability."""),
    ("code", """\
for prompt in (MATH_PROMPT, CODE_PROMPT):
    lens = sl.logit_lens(model, prompt, top=3)
    plot_logit_lens(lens)
lens[lens["rank"] == 0].pivot(index="layer", columns="position", values="pred").tail(3)"""),
    ("md", """\
## Editing the residual stream through a hook

A hook returning its input leaves the logits bit-identical (at every point but ``hook_pattern``). Then a steering
edit: add ``STEER_ALPHA`` times the difference between the mean residual (after layer ``STEER_LAYER``) on Chinese
and on English text to every position, and count the CJK characters in the continuation."""),
    ("code", """\
ids = model.tokenizer(PROMPT)["input_ids"]
with torch.no_grad():
    base = model(torch.tensor([ids])).logits
    # every point but hook_pattern (hooking it swaps the fused attention kernel for an explicit softmax: ~1e-6 off)
    with sl.hooks(model, {lambda name: not name.endswith("hook_pattern"): lambda t, name: t}):
        same = model(torch.tensor([ids])).logits
print("identity hook leaves logits bit-identical:", torch.equal(base, same))

point = f"blocks.{STEER_LAYER}.hook_resid_post"


def mean_residual(texts):
    seen = []
    with torch.no_grad(), sl.hooks(model, {point: lambda x, name: seen.append(x[0].mean(0))}):
        for t in texts:
            model(torch.tensor([model.tokenizer(t)["input_ids"][:MAX_TOKENS]]))
    return torch.stack(seen).mean(0)


sets = load_prompt_sets(["zh-news", "wiki-en"], max_prompts=max(2, N_PROFILE // 5))
direction = mean_residual(sets["zh-news"]) - mean_residual(sets["wiki-en"])


def cjk_share(text):
    return sum("\\u4e00" <= ch <= "\\u9fff" for ch in text) / max(len(text), 1)


with sl.hooks(model, {point: lambda x, name: x + STEER_ALPHA * direction}):
    edited = model.generate(PROMPT, MAX_NEW_TOKENS, stop_tokens=[])
pd.DataFrame({"residual": ["as computed", f"+ {STEER_ALPHA} x (zh - en) after layer {STEER_LAYER}"],
              "continuation": [repr(plain.text), repr(edited.text)],
              "CJK share": [cjk_share(plain.text), cjk_share(edited.text)]})"""),
]


# ---------------------------------------------------------------------------------------------------------- 08
NOTEBOOKS["08_dense_vs_moe_and_drafting"] = [
    ("md", """\
# Dense against MoE, and drafting

SmallThinker-3B-Preview is the family's dense model (a Qwen2.5-3B fine-tune): every token reads all of its FFN
weights, and its SiLU gates are almost never exactly zero, where a ReGLU expert's neurons are zero wherever the gate
is negative. The table counts parameters, bytes read per token and KV bytes from the released shapes (on the meta
device: nothing is allocated); the figure measures FFN activation sparsity. Then speculative decoding: a small draft
proposes tokens that the target checks in one forward."""),
    ("parameters", """\
MODEL = "default"  # the target of the drafting section (a checkpoint folder also works)
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 3
MAX_NEW_TOKENS = 32
DRAFT_LAYERS = 2  # the draft: the target's first layers, its final norm and head (layer_draft)
DRAFT_TOKENS = [1, 2, 4]
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default"""),
    ("code", setup("""\
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.prompts import load_prompt_sets
from smallthinker_lab.instruments.dense_moe import ffn_activation_sparsity, size_table
from smallthinker_lab.instruments.speculative import acceptance_by_position, measure_speculative, speculative_summary
from smallthinker_lab.model.speculative import layer_draft""", """\
shapes = {"SmallThinker-3B-Preview (dense)": sl.DenseConfig.from_name("smallthinker-3b-preview"),
          "SmallThinker-4B-A0.6B (MoE)": sl.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
          "SmallThinker-21B-A3B (MoE)": sl.SmallThinkerConfig.from_name("smallthinker-21b-a3b")}
size_table(shapes).set_index("model").T""")),
    ("md", """\
FFN activation sparsity on the prompt sets: the default model's ReGLU experts against a dense SiLU model of the
same width and tokenizer. No trained dense model ships, so the dense one has random weights: its exact zeros (none)
are what SiLU guarantees whatever the weights; its near-zero shares are a property of random weights only."""),
    ("code", """\
target = sl.load_model(MODEL, dtype=torch.float32)
prompts = [p for ps in load_prompt_sets(PROMPT_SETS, max_prompts=MAX_PROMPTS).values() for p in ps]
c = target.config
dense = sl.DenseForCausalLM(sl.DenseConfig(
    vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
    intermediate_size=c.top_k * c.moe_ffn_hidden_size, max_position_embeddings=c.max_position_embeddings,
    torch_dtype="float32")).init_weights(0).eval()
dense.tokenizer = target.tokenizer
sparsity = pd.concat([ffn_activation_sparsity(target, prompts, name="default (ReGLU experts)"),
                      ffn_activation_sparsity(dense, prompts, name="dense, random weights (SiLU)")])
exact = sparsity[sparsity.threshold == 0].pivot(index="layer", columns="model", values="share")
ax = exact.plot.bar(figsize=(8, 3), ylim=(0, 1), rot=0, ylabel="share of exact zeros",
                   title="FFN activations that are exactly 0 (the SiLU bars are 0: it has none)")
ax.legend(loc="upper right", fontsize=8)
sparsity.pivot_table(index=["model", "threshold"], values="share", aggfunc="mean")"""),
    ("md", """\
Speculative decoding with the default model as target: for each prompt, the target alone and then with the draft at
each k, in the same round; speed-up = tok/s over the target alone's on the same prompt. Greedy drafts propose the
same tokens whatever k, so the acceptance curves of different k coincide where they overlap."""),
    ("code", """\
draft = layer_draft(target, DRAFT_LAYERS)
runs = measure_speculative(target, draft, load_prompt_sets(PROMPT_SETS, max_prompts=MAX_PROMPTS),
                           draft_tokens=DRAFT_TOKENS, max_new_tokens=MAX_NEW_TOKENS, repeats=1)
print("greedy outputs equal the target's:", bool(runs.same_tokens.all()))
speculative_summary(runs)"""),
    ("code", """\
by_position = acceptance_by_position(runs)
ax = by_position.pivot(index="position", columns="mode", values="acceptance").plot(
    marker="o", figsize=(6, 3), xticks=range(1, max(DRAFT_TOKENS) + 1), ylabel="P(kept | earlier kept)",
    title="acceptance by draft position")
speculative_summary(runs[runs.draft_tokens > 0], by=("domain",))"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                   "language_info": {"name": "python"}}
    for kind, src in cells:
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(src)
        elif kind == "parameters":
            cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["parameters"]})
        else:
            cell = nbformat.v4.new_code_cell(src)
        cell.pop("id", None)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: the file changes only when a cell does
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(name, cells)) + "\n"
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run python notebooks/_build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
