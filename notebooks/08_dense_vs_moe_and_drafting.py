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
# # Dense against MoE, and drafting
#
# SmallThinker-3B-Preview is the family's dense model (a Qwen2.5-3B fine-tune): every token reads all of its FFN
# weights, and its SiLU gates are almost never exactly zero, where a ReGLU expert's neurons are zero wherever the gate
# is negative. The table counts parameters, bytes read per token and KV bytes from the released shapes (on the meta
# device: nothing is allocated); the figure measures FFN activation sparsity. Then speculative decoding: a small draft
# proposes tokens that the target checks in one forward.

# %% tags=["parameters"]
MODEL = "default"  # the target of the drafting section (a checkpoint folder also works)
PROMPT_SETS = ["gsm8k", "humaneval", "wiki-en", "zh-news"]
MAX_PROMPTS = 3
MAX_NEW_TOKENS = 32
DRAFT = "smallthinker-tiny-draft"  # the draft shipped beside the default model (a folder also works)
DRAFT_TOKENS = [1, 2, 4]
ENGINE_MEMORY_LIMIT = "50%"  # the engine as target: its expert cache holds this share of the experts
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.prompts import load_prompt_sets
from smallthinker_lab.instruments.dense_moe import ffn_activation_sparsity, size_table
from smallthinker_lab.instruments.speculative import acceptance_by_position, measure_speculative, speculative_summary

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

shapes = {"SmallThinker-3B-Preview (dense)": sl.DenseConfig.from_name("smallthinker-3b-preview"),
          "SmallThinker-4B-A0.6B (MoE)": sl.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
          "SmallThinker-21B-A3B (MoE)": sl.SmallThinkerConfig.from_name("smallthinker-21b-a3b")}
size_table(shapes).set_index("model").T

# %% [markdown]
# FFN activation sparsity on the prompt sets: the default model's ReGLU experts against dense SiLU models of the same
# tokenizer: one of the same width with random weights (its exact zeros, none, are what SiLU guarantees whatever the
# weights; its near-zero shares are a property of random weights only) and the trained 2-layer draft shipped beside
# the default model (a trained SiLU model's near-zero shares, at a much smaller scale of training).

# %%
target = sl.load_model(MODEL, dtype=torch.float32)
prompts = [p for ps in load_prompt_sets(PROMPT_SETS, max_prompts=MAX_PROMPTS).values() for p in ps]
c = target.config
dense = sl.DenseForCausalLM(sl.DenseConfig(
    vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
    intermediate_size=c.top_k * c.moe_ffn_hidden_size, max_position_embeddings=c.max_position_embeddings,
    torch_dtype="float32")).init_weights(0).eval()
dense.tokenizer = target.tokenizer
draft = sl.load_model(DRAFT, dtype=torch.float32)
sparsity = pd.concat([ffn_activation_sparsity(target, prompts, name="default (ReGLU experts)"),
                      ffn_activation_sparsity(dense, prompts, name="dense, random weights (SiLU)"),
                      ffn_activation_sparsity(draft, prompts, name="draft, trained (SiLU)")])
exact = sparsity[sparsity.threshold == 0].pivot(index="layer", columns="model", values="share")
ax = exact.plot.bar(figsize=(8, 3), ylim=(0, 1), rot=0, ylabel="share of exact zeros",
                   title="FFN activations that are exactly 0 (the SiLU bars are 0: it has none)")
ax.legend(loc="upper right", fontsize=8)
sparsity.pivot_table(index=["model", "threshold"], values="share", aggfunc="mean")

# %% [markdown]
# Speculative decoding with the default model as target and the draft shipped beside it (`DRAFT`: a 2-layer dense
# Qwen2-shaped model trained on the same corpus and tokenizer; its README.md gives the recipe and its acceptance per
# domain): for each prompt, the target alone and then with the draft at each k, in the same round; speed-up = tok/s
# over the target alone's on the same prompt (on a shared CPU, noisy). Greedy drafts propose the same tokens whatever
# k, so the acceptance curves of different k coincide where they overlap.

# %%
sets = load_prompt_sets(PROMPT_SETS, max_prompts=MAX_PROMPTS)
runs = measure_speculative(target, draft, sets, draft_tokens=DRAFT_TOKENS, max_new_tokens=MAX_NEW_TOKENS, repeats=1)
print("greedy outputs equal the target's:", bool(runs.same_tokens.all()))
speculative_summary(runs)

# %%
by_position = acceptance_by_position(runs)
ax = by_position.pivot(index="position", columns="mode", values="acceptance").plot(
    marker="o", figsize=(6, 3), xticks=range(1, max(DRAFT_TOKENS) + 1), ylabel="P(kept | earlier kept)",
    title="acceptance by draft position")
speculative_summary(runs[runs.draft_tokens > 0], by=("domain",))

# %% [markdown]
# The offloading engine as target (experts read from storage into a cache of `ENGINE_MEMORY_LIMIT` of them), the draft
# in memory: each round's k draft tokens plus one are scored by one engine forward (`forward(all_logits=True)`), and
# `engine.truncate()` rolls its KV cache back past the rejected ones. `engine.stats()` counts those forwards apart
# (`verify_*`: positions scored, rejected ones included) and the positions rolled back.

# %%
with sl.Engine(MODEL, memory_limit=ENGINE_MEMORY_LIMIT, dtype=torch.float32, progress=False) as engine:
    engine_runs = measure_speculative(engine, draft, sets, draft_tokens=DRAFT_TOKENS,
                                      max_new_tokens=MAX_NEW_TOKENS, repeats=1)
    st = engine.stats()
print("engine: greedy outputs equal the engine alone's:", bool(engine_runs.same_tokens.all()))
print(f"verify forwards {st['verify_forwards']}, positions scored {st['verify_tokens']}, rolled back "
      f"{st['rolled_back_tokens']}; expert hit rate {st['hit_rate']:.2f}")
speculative_summary(engine_runs)
