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
# # Neuron sparsity of the ReGLU experts
#
# In a routed expert, a neuron whose gate is <= 0 contributes nothing (ReGLU: up(x) * relu(gate(x))). The paper's
# Figure 6 shows "neuron sparsity" per layer (median above 0.6, early layers near 1). The recording gives, per
# layer, a 0/1 matrix (routed (token, expert) pairs x the expert's neurons, 1 where relu(gate) = 0), and there are
# three ways to read it: per pair, per expert and per neuron. All three here, against the same measurement on the
# random initialisation of the same config (what chance gives). Then what skipping the inactive neurons saves:
# FLOPs counted from the recording, and time measured in the engine, dense against sparse (same tokens).

# %% tags=["parameters"]
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 16
TIMING_PROMPTS = 2  # per set, for the dense vs sparse timing
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets
from smallthinker_lab.engine import Engine
from smallthinker_lab.model.checkpoint import resolve_path
from smallthinker_lab.model.tokenizer import load_tokenizer

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

model = sl.load_model(MODEL)
cfg = model.config
prompts = load_prompt_sets(PROMPT_SETS, MAX_PROMPTS)
tok = load_tokenizer(MODEL)
rec = sl.Recording.concat([sl.profile(model, ps, dataset=name, kinds=("neurons",), max_new_tokens=MAX_NEW_TOKENS,
                                      tokenizer=tok) for name, ps in prompts.items()])
neurons, counts = rec.to_dataframe("neurons"), rec.to_dataframe("neuron_counts")

# chance: the same config, weights as the trainer initialises them (seed 0), the same prompts
chance_model = sl.SmallThinkerForCausalLM(cfg).init_weights(seed=0).eval()
chance = sl.Recording.concat([sl.profile(chance_model, ps, dataset=name, kinds=("neurons",),
                                         max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok)
                              for name, ps in prompts.items()])
neurons.head()

# %% [markdown]
# ## Three definitions, side by side
#
# - **per pair**: for one routed token, the share of the expert's neurons with relu(gate) = 0 (a row of the matrix);
# - **per expert**: the mean of that over the expert's routed tokens;
# - **per neuron**: for one neuron, the share of its expert's routed tokens for which it is inactive (a column); the
#   reading that fits Figure 6's caption, "most neurons ... exhibit sparsity levels exceeding 0.6".
#
# Dead neurons (in an expert some token reached, active for none of its tokens) have per-neuron sparsity 1 by
# construction: they are counted apart and left out of the per-neuron figures.

# %%
def definitions(r):
    return sl.metrics.neuron_sparsity_definitions(r.to_dataframe("neurons").assign(dataset="all"),
                                                  r.to_dataframe("neuron_counts").assign(dataset="all"))


defs, defs_chance = definitions(rec), definitions(chance)
side = defs.pivot(index="layer", columns="definition", values="median")[["pair", "expert", "neuron"]]
side["dead neurons"] = defs[defs.definition == "neuron"].set_index("layer")["dead"]
side["random init: pair"] = defs_chance[defs_chance.definition == "pair"].set_index("layer")["median"]
side["random init: neuron"] = defs_chance[defs_chance.definition == "neuron"].set_index("layer")["median"]
side.style.format("{:.3f}", subset=["pair", "expert", "neuron", "random init: pair", "random init: neuron"]) \
    .set_caption("median neuron sparsity per layer, all prompt sets")

# %% [markdown]
# They differ because they average the same zeros along different axes: weighted by routed tokens all three have the
# same mean, but a row mixes an expert's always-on and rarely-on neurons into one share near that mean, while the
# columns keep those neurons apart, so the per-neuron distribution is as wide as the neurons' behaviours are.

# %%
per_neuron = sl.metrics.neuron_sparsity_by_neuron(counts.assign(dataset="all"))
weighted = (per_neuron.sparsity * per_neuron.tokens).groupby(per_neuron.layer).sum() \
    / per_neuron.groupby("layer").tokens.sum()
pair_mean = defs[defs.definition == "pair"].set_index("layer")["mean"]
print("token-weighted means agree across definitions:", bool(((weighted - pair_mean).abs() < 1e-9).all()))

# %% [markdown]
# ## Sparsity per layer (Figure 6), per-neuron reading, with chance beside it

# %%
chance_neurons = sl.metrics.neuron_sparsity_by_neuron(chance.to_dataframe("neuron_counts").assign(dataset="all"))
ax = plots.plot_sparsity_boxplots(per_neuron[~per_neuron.dead], baseline=chance_neurons[~chance_neurons.dead],
                                  baseline_label="random init (seed 0), chance")
ax.set_title(f"{resolve_path(MODEL).name}, per-neuron sparsity, {MAX_PROMPTS} prompts of each of "
             f"{', '.join(PROMPT_SETS)}", fontsize="medium")
ax.set_ylabel("per-neuron sparsity");

# %% [markdown]
# The per-pair reading of the same recording, for contrast (one sample per routed (token, expert) pair):

# %%
ax = plots.plot_sparsity_boxplots(neurons, baseline=chance.to_dataframe("neurons"),
                                  baseline_label="random init (seed 0), chance")
ax.set_title(f"{resolve_path(MODEL).name}, per-pair sparsity", fontsize="medium");

# %%
tables.sparsity_table(neurons)

# %%
by_layer = sl.metrics.neuron_sparsity_by_layer(neurons)
by_layer.pivot(index="layer", columns="dataset", values="median")

# %% [markdown]
# ## What sparse ReGLU saves
#
# FLOPs per routed (token, expert) pair: dense = gate + up + down = 3 x 2HF; sparse = the gate in full (2HF) plus up
# and down only for the active neurons (2 x 2H per neuron).

# %%
H, F = cfg.hidden_size, cfg.moe_ffn_hidden_size
active = neurons["ffn"] - neurons["inactive"]
flops = pd.Series({"dense": float(len(neurons) * 3 * 2 * H * F),
                   "sparse": float((2 * H * F + 2 * 2 * H * active).sum())})
print(f"expert FLOPs saved by skipping inactive neurons: {1 - flops['sparse'] / flops['dense']:.1%}")
flops.to_frame("expert FLOPs over the recording")

# %% [markdown]
# Time, in the engine with every expert resident (after a warm-up), dense against sparse expert compute:

# %%
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
pd.DataFrame(rows).set_index("expert compute")
