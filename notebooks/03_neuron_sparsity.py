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
# In a routed expert, a neuron whose gate is <= 0 contributes nothing (ReGLU: up(x) * relu(gate(x))). The share of
# such neurons per (token, expert) is the sparsity; the paper's Figure 6 shows its distribution per layer (median
# above 0.6, early layers near 1). Then what skipping them saves: FLOPs counted from the recording, and time
# measured in the engine, dense against sparse (same tokens).

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
neurons = rec.to_dataframe("neurons")
neurons.head()

# %% [markdown]
# ## Sparsity per layer (Figure 6)

# %%
plots.plot_sparsity_boxplots(neurons);

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
