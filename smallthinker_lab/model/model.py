"""SmallThinker decoder and causal LM, with state-dict names of the released checkpoints.

Per layer, with x the residual entering it:
  logits = router(x)                      # raw residual, before input_layernorm
  x = x + attn(input_layernorm(x))
  x = x + moe(post_attention_layernorm(x), logits)
Shape letters: B batch, T tokens, H hidden, V vocabulary, E experts.

The forward returns a :class:`CausalLMOutput` (``.logits``, ``.router_logits``), as transformers' models do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .config import SmallThinkerConfig
from .generate import generate
from .hooks import HookRegistry
from .kv_cache import KVCache
from .layers import RMSNorm, RotaryEmbedding
from .moe import MoEBlock
from .tokenizer import find_tokenizer

# load_model and save_pretrained, filled in by model/checkpoint.py (the reader and writer of checkpoints, which
# builds this class), so that the model's from_pretrained/save_pretrained need no import of it (no import cycle)
CHECKPOINT_IO: dict = {}


@dataclass
class CausalLMOutput:
    """What the forward returns: ``logits`` (B, T, V) and, with ``output_router_logits=True``, ``router_logits``:
    one (B*T, E) tensor per layer (transformers' convention for MoE models; ``.view(B, T, E)`` gives them per
    sequence). Unpacks like a tuple of the fields that are set: ``logits, router_logits = model(ids, ...)``."""

    logits: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        return (self.logits,) if self.router_logits is None else (self.logits, self.router_logits)

    def __iter__(self) -> Iterator:
        return iter(self.to_tuple())


class DecoderLayer(nn.Module):
    def __init__(self, config: SmallThinkerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoEBlock(config, layer_idx)

    hooks: HookRegistry | None = None  # the model's registry (set by SmallThinkerForCausalLM.hooks)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        hooks = self.hooks
        if hooks is None or not hooks.edits:  # no edit hook: the plain layer
            router_logits = self.block_sparse_moe.route(x)  # (B, T, E), before attention
            x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache)
            x = x + self.block_sparse_moe(self.post_attention_layernorm(x), router_logits)
            return x, router_logits
        name, moe = f"blocks.{self.layer_idx}.", self.block_sparse_moe
        x = hooks.edit(name + "hook_resid_pre", x)
        router_logits = moe.route(x)  # (B, T, E), before attention
        router_logits = moe.edit_logits(router_logits.view(-1, moe.num_experts)).view_as(router_logits)
        x = hooks.edit(name + "hook_resid_mid",
                       x + hooks.edit(name + "hook_attn_out",
                                      self.self_attn(self.input_layernorm(x), positions, rope, cache)))
        x = x + hooks.edit(name + "hook_moe_out", moe(self.post_attention_layernorm(x), router_logits))
        return hooks.edit(name + "hook_resid_post", x), router_logits


class SmallThinkerModel(nn.Module):
    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.hooks: HookRegistry | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                output_router_logits: bool = False):
        x = self.embed_tokens(input_ids)  # (B, T, H)
        rope = self.rotary(positions, x.dtype) if any(self.config.rope_layout) else None
        all_logits = []
        for i, layer in enumerate(self.layers):
            x, router_logits = layer(x, positions, rope, cache[i] if cache is not None else None)
            if output_router_logits:
                all_logits.append(router_logits.view(-1, router_logits.shape[-1]))  # (B*T, E)
        h = self.norm(x)
        if self.hooks is not None and self.hooks.edits:
            h = self.hooks.edit("hook_final_norm", h)
        return h, all_logits


class SmallThinkerForCausalLM(nn.Module):
    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = SmallThinkerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hooks = HookRegistry()
        self.name_or_path: str | None = None  # the folder it was loaded from (set by load_model)
        self._tokenizer: Any = None
        self._tokenizer_looked_up = False

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike = "default", **kwargs) -> SmallThinkerForCausalLM:
        """The model of a checkpoint folder, ``"default"`` or a Hugging Face repo id in the local hub cache.

        Keywords are :func:`~smallthinker_lab.load_model`'s: ``dtype``, ``device``, ``strict``, ``revision``,
        ``cache_dir``, ``local_files_only`` (True: never download; False lets huggingface_hub fetch the repo).
        """
        return CHECKPOINT_IO["load"](path_or_repo_id, **kwargs)

    @property
    def hooks(self) -> HookRegistry:
        """The hook registry of the model's points (``smallthinker_lab.model.hooks``); assigning one (the engine
        does) makes every layer, attention and MoE block fire into it."""
        return self._hooks

    @hooks.setter
    def hooks(self, registry: HookRegistry) -> None:
        self._hooks = registry
        self.model.hooks = registry
        for layer in self.model.layers:
            layer.hooks = layer.self_attn.hooks = layer.block_sparse_moe.hooks = registry

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                output_router_logits: bool = False) -> CausalLMOutput:
        """``.logits`` (B, T, V) for input_ids (B, T); with ``cache``, continue after the cached positions.

        With ``output_router_logits=True`` also ``.router_logits``: one (B*T, E) tensor per layer, the raw
        router outputs the layer routed with.
        """
        T = input_ids.shape[1]
        start = cache.seq_len if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence too long: {start + T} tokens ({start} cached + {T} new) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
        observed = self.hooks.active("forward")
        t0 = time.perf_counter() if observed else 0.0
        hidden, router_logits = self.model(input_ids, positions, cache, output_router_logits)
        logits = self.lm_head(hidden)  # (B, T, V)
        if observed:
            self.hooks.fire("forward", phase="prefill" if start == 0 else "decode", start=start, tokens=T,
                            cache=cache, seconds=time.perf_counter() - t0, input_ids=input_ids)
        return CausalLMOutput(logits, tuple(router_logits) if output_router_logits else None)

    # --------------------------------------------------------------- utilities
    def new_cache(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, dtype or p.dtype, p.device)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the folder the model was loaded from, loaded on first use; None if it has none.
        Assign one to use another (``generate`` encodes text prompts and decodes results with it)."""
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
        """Parameter count; a tied head counts once (it is the embedding)."""
        seen, n = set(), 0
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            if name == "lm_head.weight" and not include_lm_head:
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> SmallThinkerForCausalLM:
        """Normal(0, initializer_range) for linear and embedding weights, ones for norms."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                module.weight.copy_(w)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    def save_pretrained(self, path, **kwargs):
        """:func:`~smallthinker_lab.model.checkpoint.save_pretrained` of this model into ``path``."""
        return CHECKPOINT_IO["save"](self, path, **kwargs)

    def generate(self, prompt, max_new_tokens: int = 32, **kwargs):
        """:func:`~smallthinker_lab.generate` on this model: a GenerationResult (tokens, text, timings)."""
        return generate(self, prompt, max_new_tokens, **kwargs)
