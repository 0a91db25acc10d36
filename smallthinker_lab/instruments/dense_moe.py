"""Dense against MoE: parameters, bytes read per token and KV bytes from the shapes; FFN activation sparsity measured.

A dense SiLU-gated FFN reads every neuron's weights every token, and SiLU is zero only at 0 (and below about -88 in
fp32, where it underflows), so it has almost no exact zeros; a ReGLU expert's neurons are exactly zero wherever the
gate is negative, and a MoE reads only its top-k experts. :func:`size_table` counts from a model built on the meta
device (no weights allocated, so a 21B shape costs nothing); :func:`ffn_activation_sparsity` runs prompts through a
real model and reads the FFN gates at the model's hook points (``mlp`` on the dense model, ``moe`` on SmallThinker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from ..model.config import SmallThinkerConfig
from ..model.dense import DenseForCausalLM
from ..model.dense_config import DenseConfig
from ..model.kv_cache import kv_cache_bytes
from ..model.model import SmallThinkerForCausalLM

Q4_0_BYTES_PER_WEIGHT = 18 / 32  # llama.cpp's Q4_0: blocks of 32 weights, 16 bytes of nibbles + an fp16 scale
CONTEXTS = (1024, 4096, 16384, 32768)


def _model_class(config) -> type:
    return DenseForCausalLM if isinstance(config, DenseConfig) else SmallThinkerForCausalLM


def parameter_groups(config) -> dict[str, int]:
    """Parameters by role for ``config`` (a DenseConfig or a SmallThinkerConfig), counted on the meta device:
    ``embedding``, ``lm_head`` (0 when tied), ``experts`` (routed expert FFNs), ``ffn`` (the dense FFN),
    ``other`` (attention, norms, router); plus the matrix/vector split the byte counts need."""
    with torch.device("meta"):
        model = _model_class(config)(config)
    groups = dict(embedding=0, lm_head=0, experts=0, ffn=0, other=0, vectors=0)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        role = ("embedding" if name.endswith("embed_tokens.weight") else "lm_head" if name == "lm_head.weight"
                else "experts" if ".experts." in name else "ffn" if ".mlp." in name else "other")
        groups[role] += p.numel()
        if p.dim() == 1:
            groups["vectors"] += p.numel()
    return groups


def _active_share(config) -> float:
    """The share of the routed experts one token uses (1 for a dense FFN)."""
    return config.top_k / config.num_experts if isinstance(config, SmallThinkerConfig) else 1.0


def size_table(configs: Mapping[str, Any], contexts: Sequence[int] = CONTEXTS) -> pd.DataFrame:
    """One row per named config: kind, parameters (total; active per token without embeddings, as "A0.6B" counts
    them), FFN weight bytes one decode token reads, all weight bytes one decode token reads (active layers + the LM
    head + one embedding row) in bf16 and in Q4_0 (matrices 18 bytes per 32 weights, vectors fp32), and the KV cache
    in MiB (bf16) at each context length (sliding layers keep their window)."""
    rows = []
    for name, cfg in configs.items():
        g = parameter_groups(cfg)
        share = _active_share(cfg)
        total = sum(v for k, v in g.items() if k != "vectors")
        ffn_active = g["ffn"] + g["experts"] * share
        body_active = g["other"] + ffn_active  # per layer: attention, norms, router, the FFN neurons used
        head = g["lm_head"] if g["lm_head"] else g["embedding"]  # a tied head reads the embedding matrix
        read = body_active + head + cfg.hidden_size  # + the one embedding row looked up
        vec = g["vectors"]
        row = {
            "model": name, "kind": "dense" if isinstance(cfg, DenseConfig) else "MoE",
            "params_total": total, "params_active": int(body_active),
            "ffn_share_active": ffn_active / (g["ffn"] + g["experts"]),
            "ffn_MiB_per_token_bf16": ffn_active * 2 / 2**20,
            "ffn_MiB_per_token_q4_0": ffn_active * Q4_0_BYTES_PER_WEIGHT / 2**20,
            "MiB_per_token_bf16": read * 2 / 2**20,
            "MiB_per_token_q4_0": ((read - vec) * Q4_0_BYTES_PER_WEIGHT + vec * 4) / 2**20,
            "global_layers": sum(not cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)),
            "layers": cfg.num_hidden_layers,
        }
        for n in contexts:
            row[f"kv_MiB_{n // 1024}K"] = kv_cache_bytes(cfg, n) / 2**20
        rows.append(row)
    return pd.DataFrame(rows)


def ffn_activation_sparsity(model, prompts: Sequence[Sequence[int] | str], thresholds: Sequence[float] = (0.0, 1e-3,
                            1e-2, 1e-1), max_prompt_tokens: int = 256, name: str | None = None) -> pd.DataFrame:
    """Tidy, one row per (layer, threshold): the share of FFN activations with |activation| <= threshold over every
    token of ``prompts`` (one prefill forward each). Dense: silu(gate_proj x) of every neuron; MoE: relu(gate x) of
    the neurons of the experts each token was routed to. ``threshold`` 0 is the share of exact zeros."""
    name = name or getattr(model, "name_or_path", None) or type(model).__name__
    dense = isinstance(model, DenseForCausalLM)
    ths = torch.tensor([float(t) for t in thresholds])
    L = model.config.num_hidden_layers
    below = torch.zeros(L, len(ths), dtype=torch.float64)
    counts = torch.zeros(L, dtype=torch.float64)

    def add(layer: int, act: torch.Tensor) -> None:
        a = act.detach().float().abs().reshape(-1)
        below[layer] += (a[:, None] <= ths[None, :].to(a.device)).sum(0).double().cpu()
        counts[layer] += a.numel()

    def on_mlp(layer, gate):
        add(layer, F.silu(gate))

    def on_moe(layer, experts, token_index, gates):
        for g in gates:
            add(layer, F.relu(g))

    handle = model.hooks.add("mlp", on_mlp) if dense else model.hooks.add("moe", on_moe)
    tok = getattr(model, "tokenizer", None)
    try:
        with torch.inference_mode():
            for p in prompts:
                ids = tok(p)["input_ids"] if isinstance(p, str) else list(p)
                model(torch.tensor([ids[-max_prompt_tokens:]], device=model.device))
    finally:
        handle.remove()
    rows = []
    for layer in range(L):
        for j, t in enumerate(thresholds):
            rows.append({"model": name, "activation": "SiLU" if dense else "ReLU (ReGLU)", "layer": layer,
                         "threshold": float(t), "share": float(below[layer, j] / counts[layer]) if counts[layer]
                         else float("nan"), "values": int(counts[layer])})
    return pd.DataFrame(rows)
