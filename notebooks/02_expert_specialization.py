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
# # Expert specialisation
#
# Which experts each domain uses: activation frequency (the share of a domain's tokens routed to an expert) per
# layer and expert, on GSM8K, HumanEval, English Wikipedia and Chinese news (the paper's Figures 4-5); how skewed it
# is (the paper: 70-80% of experts under 0.14); how different the domains are (Jensen-Shannon divergence); and what
# the DP-group global balance loss changes against a conventional micro-batch balance loss.

# %% tags=["parameters"]
MODEL = "default"
COMPARE_MODEL = "../data/models/smallthinker-tiny-microbatch"  # trained with the micro-batch balance loss
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 16
MAX_NEW_TOKENS = 16
THRESHOLD = 0.14
DRILL_DATASET = "zh-news"  # the drill-down: a heatmap cell of this domain
DRILL_LAYER = None  # None: the domain's hottest cell
DRILL_EXPERT = None
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch

import smallthinker_lab as sl
from smallthinker_lab import plots, tables
from smallthinker_lab.analysis.widgets import load_prompt_sets
from smallthinker_lab.model.checkpoint import resolve_path
from smallthinker_lab.model.tokenizer import load_tokenizer

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

prompts = load_prompt_sets(PROMPT_SETS, MAX_PROMPTS)


def expert_usage(path):
    """The recording (kinds experts, with token ids and pieces) of one model over the prompt sets, and its expert
    frequency per (dataset, layer, expert)."""
    model = sl.load_model(path)
    tok = load_tokenizer(path)
    recs = [sl.profile(model, ps, dataset=name, kinds=("experts",), max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok)
            for name, ps in prompts.items()]
    rec = sl.Recording.concat(recs)
    return rec, sl.metrics.expert_frequency(rec.to_dataframe("experts"), model.config.num_experts)


rec, freq = expert_usage(MODEL)
freq.head()

# %% [markdown]
# ## Activation frequency, layer x expert, per domain (one colour scale)

# %%
plots.plot_expert_heatmaps(freq, ncols=2);

# %% [markdown]
# ## Drill-down: the tokens behind one cell
#
# The tokens of one domain that route to one expert most (``sl.metrics.top_tokens``): ``routed`` rows of the token
# went to the expert, out of its ``occurrences``; ``share`` is the part of the expert's rows they make up. By default
# the domain's hottest cell; set ``DRILL_LAYER`` / ``DRILL_EXPERT`` for another.

# %%
cells = freq[freq["dataset"] == DRILL_DATASET]
if DRILL_LAYER is None:
    hottest = cells.loc[cells["frequency"].idxmax()]
    DRILL_LAYER, DRILL_EXPERT = int(hottest["layer"]), int(hottest["expert"])
print(f"{DRILL_DATASET}: layer {DRILL_LAYER}, expert {DRILL_EXPERT}")
sl.metrics.top_tokens(rec, DRILL_LAYER, DRILL_EXPERT, n=12, dataset=DRILL_DATASET)

# %% [markdown]
# ## Cold and hot experts

# %%
plots.plot_expert_frequency_distribution(freq, threshold=THRESHOLD);

# %%
div = sl.metrics.expert_usage_divergence(freq)
tables.expert_usage_table(freq, threshold=THRESHOLD, js=div)

# %% [markdown]
# ## Cross-domain similarity
#
# Jensen-Shannon divergence of expert usage between every pair of domains (bits: 0 same usage, 1 disjoint experts),
# averaged over layers, and per layer.

# %%
mean_js = div.groupby(["dataset_a", "dataset_b"])["js_divergence"].mean().unstack()
ax = sns.heatmap(mean_js, annot=True, fmt=".2f", cmap="mako_r", vmin=0)
ax.set(title="mean JS divergence of expert usage", xlabel="", ylabel="");

# %%
div.assign(pair=div["dataset_a"] + " / " + div["dataset_b"]).pivot(index="layer", columns="pair",
                                                                    values="js_divergence")

# %% [markdown]
# ## DP-group vs micro-batch balance loss
#
# The same figures for a model trained with the conventional micro-batch balance loss (it forces every micro-batch,
# hence every domain, to spread over all experts).

# %%
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
    print(f"no comparison model at {COMPARE_MODEL} and no measured frequencies at {MEASURED}")
