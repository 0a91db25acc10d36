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
# # The KV cache: hybrid NoPE-global / RoPE-sliding attention
#
# Sliding-window layers keep at most `sliding_window_size` positions, global layers all of them. Measured on the
# default model (recorded bytes per layer, checked against the analytic formula), then the analytic footprint of the
# released 4B and 21B shapes from 1K to 32K tokens, hybrid against every layer global.

# %% tags=["parameters"]
MODEL = "default"
PROMPT_SET = "wiki-en"
MAX_PROMPTS = 2
MAX_NEW_TOKENS = 64
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_set
from smallthinker_lab.model.tokenizer import load_tokenizer

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

model = sl.load_model(MODEL)
cfg = model.config
tok = load_tokenizer(MODEL)
rec = sl.profile(model, load_prompt_set(PROMPT_SET, MAX_PROMPTS), dataset=PROMPT_SET, kinds=("kv",),
                 max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok)
kv = rec.to_dataframe("kv")
kv.tail()

# %% [markdown]
# ## Measured bytes per layer (last step of the last prompt)

# %%
last = kv[(kv.sequence == kv.sequence.max())]
plots.plot_kv_per_layer(last);

# %%
foot = sl.metrics.kv_footprint(kv, cfg)
dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[kv.attrs["kv_itemsize"]]
foot["analytic"] = [sl.kv_cache_bytes(cfg, int(c), dtype) for c in foot["context"]]
print("recorded bytes equal the analytic formula at every step:", bool((foot["bytes"] == foot["analytic"]).all()))
foot.tail()

# %% [markdown]
# ## The released shapes, 1K to 32K tokens (bf16)

# %%
configs = {"SmallThinker-4B-A0.6B": sl.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
           "SmallThinker-21B-A3B": sl.SmallThinkerConfig.from_name("smallthinker-21b-a3b"),
           "this model": cfg}
plots.plot_kv_vs_context({k: configs[k] for k in list(configs)[:2]}, CONTEXTS);

# %%
tables.kv_table(configs, CONTEXTS)

# %%
cfg21 = configs["SmallThinker-21B-A3B"]
plots.plot_kv_per_layer(sl.kv_cache_bytes(cfg21, 16384, per_layer=True), cfg21);
