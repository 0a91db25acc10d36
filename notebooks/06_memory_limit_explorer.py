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
# # Memory-limit explorer
#
# Move the memory-limit slider: the hit rate the expert cache would reach is predicted at once from the recorded
# expert trace of the selected prompt set (its hit-rate curve, computed once). Press **Run** to measure it: the
# engine opens under that limit, policy and prefetch setting, the text streams in, and the measured hit rate,
# tok/s, I/O wait and per-layer hit rates appear.

# %% tags=["parameters"]
MODEL = "default"
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 4
MAX_NEW_TOKENS = 16
LIMIT_MIB = None  # the slider's start (None: half way)
RUN_AT_START = True
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import numpy as np
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots
from smallthinker_lab.analysis.widgets import MemoryLimitExplorer

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

explorer = MemoryLimitExplorer(MODEL, PROMPT_SETS, max_prompts=MAX_PROMPTS, max_new_tokens=MAX_NEW_TOKENS,
                               limit_mib=LIMIT_MIB)
if RUN_AT_START:
    explorer.run()
explorer.widget

# %% [markdown]
# The curves behind the prediction, for the selected prompt set (rerun this cell after changing it):

# %%
trace = explorer.trace()
curves = sl.metrics.hit_rate_curves(trace, capacities=np.arange(explorer.num_experts_total + 1),
                            policies=("lru", "lfu", "belady"), expert_nbytes=explorer.expert_nbytes)
plots.plot_hit_rate_curves(curves, limit=explorer.capacity_experts * explorer.expert_nbytes,
                           total_bytes=explorer.num_experts_total * explorer.expert_nbytes);
