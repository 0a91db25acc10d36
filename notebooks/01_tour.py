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
# # A tour of SmallThinker
#
# Load the default model (a small SmallThinker trained by this project, `data/models/smallthinker-tiny`) or any
# checkpoint folder, look at its architecture, talk to it, then run it through the offloading engine under a memory
# limit and read the engine's statistics.

# %% tags=["parameters"]
MODEL = "default"  # or a checkpoint folder in the Hugging Face layout
PROMPT = "def fibonacci(n):"
CHAT = "What is 12 plus 30?"
MAX_NEW_TOKENS = 32
MEMORY_LIMIT = "50%"  # a size ("24MiB") or the share of expert bytes the cache holds
THREADS = 1  # torch CPU threads: 1 suits the small default model; None: torch's default

# %%
import pandas as pd
import torch

import smallthinker_lab as sl
from smallthinker_lab.analysis.report import resolve_limit
from smallthinker_lab.engine import Engine
from smallthinker_lab.model.tokenizer import apply_chat_template, load_tokenizer

if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.precision", 3)

model = sl.load_model(MODEL)
tok = load_tokenizer(MODEL)
cfg = model.config
print(f"{model.num_parameters() / 1e6:.2f} M parameters, {cfg.num_hidden_layers} layers, "
      f"{cfg.num_experts} experts per layer ({cfg.top_k} active), vocabulary {cfg.vocab_size}")

# %% [markdown]
# ## Architecture
#
# Per layer: the attention kind (global or sliding window), its window, the position encoding (RoPE, or none:
# NoPE) and the experts. SmallThinker repeats 1 NoPE-global layer : 3 RoPE-sliding layers; the router sits before
# attention, on the layer's raw input.

# %%
cfg.layer_table()

# %%
expert_params = 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
pd.Series({
    "hidden size": cfg.hidden_size,
    "attention heads / KV heads": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}",
    "sliding window": cfg.sliding_window_size,
    "expert (gate+up+down) parameters": expert_params,
    "all expert parameters": expert_params * cfg.num_experts * cfg.num_hidden_layers,
    "active expert parameters per token": expert_params * cfg.top_k * cfg.num_hidden_layers,
    "parameters in total": model.num_parameters(),
}).to_frame("value")

# %% [markdown]
# ## Generate (greedy, in memory)

# %%
ids = tok(PROMPT)["input_ids"]
out = sl.generate(model, ids, MAX_NEW_TOKENS)
print(PROMPT + tok.decode(out))

# %% [markdown]
# ## Chat (ChatML template)

# %%
chat_ids = apply_chat_template(tok, [{"role": "user", "content": CHAT}])
print(tok.decode(chat_ids))
print(tok.decode(sl.generate(model, chat_ids, MAX_NEW_TOKENS)))

# %% [markdown]
# ## Under a memory limit
#
# The engine keeps the expert weights in one file on storage and only a cache of them in memory. It splits the
# limit between the non-expert weights, the KV cache, its workspace and the expert cache:

# %%
with Engine.from_pretrained(MODEL, memory_limit=None) as probe:
    limit = resolve_limit(MEMORY_LIMIT, probe.memory_plan())
engine = Engine.from_pretrained(MODEL, memory_limit=limit)
engine.memory_plan(as_frame=True)

# %%
result = engine.generate(PROMPT, MAX_NEW_TOKENS)
print(PROMPT + result.text)
print("same tokens as in memory:", result.tokens == out)

# %%
stats = engine.stats()
pd.Series({k: stats[k] for k in ("capacity_experts", "hits", "misses", "hit_rate", "bytes_read",
                                 "bytes_read_per_token", "io_wait_seconds", "prefill_tok_s", "decode_tok_s",
                                 "neuron_sparsity")}, dtype=object).to_frame("value")

# %%
engine.stats_frame()

# %%
engine.close()
