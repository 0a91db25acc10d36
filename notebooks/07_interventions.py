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
# # Interventions: are a domain's experts needed for it?
#
# Notebook 02 shows *which* experts each domain uses; here we ask what happens without them. Ablate a domain's
# hottest experts and measure perplexity on every domain (with random ablations of the same size as the control),
# force a routing on one prompt, read the residual stream layer by layer through the LM head (the logit lens), and
# edit the residual stream through a hook. Every tool works on the in-memory model and on the offloading engine
# (``sl.intervene(engine, ...)``).

# %% tags=["parameters"]
MODEL = "default"
M = 4  # experts ablated per layer
SEEDS = [0, 1, 2]  # one random control ablation per seed
N_PROFILE = 50  # texts per domain that choose its hottest experts
N_EVAL = 40  # the next texts per domain: scored (held out)
MAX_TOKENS = 256  # tokens per text
PROMPT = "The history of the city"
MATH_PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"
CODE_PROMPT = "def is_even(n):\n    return"
MAX_NEW_TOKENS = 24
STEER_LAYER = 3  # the residual edit: after this layer
STEER_ALPHA = 1.0  # and its strength
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.prompts import load_prompt_sets
from smallthinker_lab.interventions.plots import plot_logit_lens, plot_specialisation

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

model = sl.load_model(MODEL)
cfg = model.config
print(f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts per layer, top-{cfg.top_k}")
sl.hook_points_table()

# %% [markdown]
# ## Ablating a domain's hottest experts
#
# Per domain, the ``M`` experts per layer with the highest activation frequency on its first ``N_PROFILE`` texts leave
# the routing (their router logits are -inf, the next-best experts take their tokens); perplexity on the next
# ``N_EVAL`` texts of every domain, divided by the unablated perplexity. A diagonal above the rest, and above the
# random rows, is causal evidence of specialisation.

# %%
result = sl.causal_specialisation(model, m=M, seeds=SEEDS, n_profile=N_PROFILE, n_eval=N_EVAL,
                                  max_tokens=MAX_TOKENS)
result.matrix("ratio")

# %%
plot_specialisation(result.table);

# %%
result.summary()

# %% [markdown]
# ## Forced routing on one prompt
#
# Every layer routes each token to the Chinese-news domain's ``top_k`` most used experts (their weights by the
# router's rule from their logits): what changes in the greedy continuation?

# %%
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
              "continuation": [repr(plain.text), repr(steered.text)]})

# %% [markdown]
# ## Logit lens on a math and a code prompt
#
# The residual after each layer through the final norm and the LM head: where in depth does the next token appear?
# Each cell is the top-1 prediction at that position after that layer, coloured by its probability.

# %%
for prompt in (MATH_PROMPT, CODE_PROMPT):
    lens = sl.logit_lens(model, prompt, top=3)
    plot_logit_lens(lens)
lens[lens["rank"] == 0].pivot(index="layer", columns="position", values="pred").tail(3)

# %% [markdown]
# ## Editing the residual stream through a hook
#
# A hook returning its input leaves the logits bit-identical (at every point but ``hook_pattern``). Then a steering
# edit: add ``STEER_ALPHA`` times the difference between the mean residual (after layer ``STEER_LAYER``) on Chinese
# and on English text to every position, and count the CJK characters in the continuation.

# %%
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
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text) / max(len(text), 1)


with sl.hooks(model, {point: lambda x, name: x + STEER_ALPHA * direction}):
    edited = model.generate(PROMPT, MAX_NEW_TOKENS, stop_tokens=[])
pd.DataFrame({"residual": ["as computed", f"+ {STEER_ALPHA} x (zh - en) after layer {STEER_LAYER}"],
              "continuation": [repr(plain.text), repr(edited.text)],
              "CJK share": [cjk_share(plain.text), cjk_share(edited.text)]})
