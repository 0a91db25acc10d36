"""The dense Qwen2-architecture causal LM (SmallThinker-3B-Preview), with the state-dict names of Qwen2ForCausalLM.

Per layer, with x the residual entering it:
  x = x + attn(input_layernorm(x))          # GQA, RoPE on every layer, biases on q/k/v
  x = x + mlp(post_attention_layernorm(x))  # down(silu(gate(x)) * up(x)): every neuron, every token
The attention, RMSNorm, RoPE and KV cache are the SmallThinker model's modules; the SiLU-gated MLP is the new block.
It has the SmallThinker model's surface (``forward(ids, cache=...) -> CausalLMOutput``, ``new_cache``, ``tokenizer``,
``generate``), so generation and speculative decoding run on either. Shape letters: B batch, T tokens, H hidden,
F intermediate size, V vocabulary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .dense_config import DenseConfig
from .generate import generate
from .hooks import HookRegistry
from .kv_cache import KVCache
from .layers import RMSNorm, RotaryEmbedding
from .model import (
    CHECKPOINT_IO,  # load_model / save_pretrained, filled by model/checkpoint.py
    CausalLMOutput,
)
from .tokenizer import find_tokenizer


class DenseModelError(ValueError):
    """A dense checkpoint given to something that works on experts (the offloading engine, ``convert``)."""


def dense_expected_tensors(config: DenseConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Qwen2 checkpoint, in file order; no ``lm_head.weight`` when tied."""
    H, D, Fi = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, H)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        for proj, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{proj}.weight"] = (n, H)
            if config.attention_bias:
                out[f"{p}self_attn.{proj}.bias"] = (n,)
        out[p + "self_attn.o_proj.weight"] = (H, q)
        out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "mlp.gate_proj.weight"] = (Fi, H)
        out[p + "mlp.up_proj.weight"] = (Fi, H)
        out[p + "mlp.down_proj.weight"] = (H, Fi)
    out["model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, H)
    return out


class DenseMLP(nn.Module):
    """Qwen2's SiLU-gated MLP. Fires the hook point ``mlp`` (layer, gate (N, F): gate_proj's output before the
    SiLU) when someone listens, as the MoE block fires ``moe`` with its experts' pre-ReLU gates."""

    def __init__(self, config: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        H, Fi = config.hidden_size, config.intermediate_size
        self.layer_idx = layer_idx
        self.gate_proj = nn.Linear(H, Fi, bias=False)
        self.up_proj = nn.Linear(H, Fi, bias=False)
        self.down_proj = nn.Linear(Fi, H, bias=False)
        self.hooks: HookRegistry | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # (B, T, F)
        if self.hooks is not None and self.hooks.active("mlp"):
            self.hooks.fire("mlp", layer=self.layer_idx, gate=gate.reshape(-1, gate.shape[-1]))  # (B*T, F)
        return self.down_proj(F.silu(gate) * self.up_proj(x))  # (B, T, H)


class DenseDecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, qkv_bias=config.attention_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DenseMLP(config, layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseModel(nn.Module):
    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, H)
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, rope, cache[i] if cache is not None else None)
        return self.norm(x)


class DenseForCausalLM(nn.Module):
    """Qwen2ForCausalLM in the project's modules; :func:`~smallthinker_lab.load_model` builds it for a folder whose
    config.json says model_type "qwen2"."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hooks = HookRegistry()
        for layer in self.model.layers:
            layer.mlp.hooks = self.hooks
        self.name_or_path: str | None = None
        self._tokenizer: Any = None
        self._tokenizer_looked_up = False

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs) -> DenseForCausalLM:
        """The model of a Qwen2 checkpoint folder or repo id in the local hub cache (:func:`load_model`'s keywords);
        a folder of another model_type raises ValueError naming it."""
        model = CHECKPOINT_IO["load"](path_or_repo_id, **kwargs)
        if not isinstance(model, cls):
            raise ValueError(f"{path_or_repo_id} holds a {type(model).__name__} (model_type "
                             f"{model.config.model_type!r}), not a dense Qwen2 model: use load_model")
        return model

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> CausalLMOutput:
        """``.logits`` (B, T, V) for input_ids (B, T); with ``cache``, continue after the cached positions."""
        T = input_ids.shape[1]
        start = cache.seq_len if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence too long: {start + T} tokens ({start} cached + {T} new) exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
        observed = self.hooks.active("forward")
        t0 = time.perf_counter() if observed else 0.0
        logits = self.lm_head(self.model(input_ids, positions, cache))  # (B, T, V)
        if observed:
            self.hooks.fire("forward", phase="prefill" if start == 0 else "decode", start=start, tokens=T,
                            cache=cache, seconds=time.perf_counter() - t0)
        return CausalLMOutput(logits)

    # --------------------------------------------------------------- utilities
    def new_cache(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, dtype or p.dtype, p.device)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the folder the model was loaded from (the Qwen2 tokenizer files), or None."""
        if self._tokenizer is None and not self._tokenizer_looked_up:
            self._tokenizer_looked_up = True
            self._tokenizer = find_tokenizer(Path(self.name_or_path)) if self.name_or_path else None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer, self._tokenizer_looked_up = tokenizer, True

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self, include_lm_head: bool = True) -> int:
        """Parameter count; a tied head counts once (it is the embedding). Works on the meta device."""
        seen, n = set(), 0
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen or (name == "lm_head.weight" and not include_lm_head):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> DenseForCausalLM:
        """Normal(0, initializer_range) for linear and embedding weights, zeros for biases, ones for norms."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    def save_pretrained(self, path, **kwargs):
        return CHECKPOINT_IO["save"](self, path, **kwargs)

    def generate(self, prompt, max_new_tokens: int = 32, **kwargs):
        """:func:`~smallthinker_lab.generate` on this model: a GenerationResult (tokens, text, timings)."""
        return generate(self, prompt, max_new_tokens, **kwargs)
