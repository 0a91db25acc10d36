"""Grouped-query attention, NoPE or RoPE per layer, global or sliding window per layer.

Shape letters: B batch, T new tokens, S keys attended, H hidden, h query heads, k kv heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SmallThinkerConfig
from .kv_cache import LayerKVCache
from .layers import apply_rope


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query may attend key: causal, and q_pos - k_pos < window if sliding."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed &= (qp - kp) < window
    return allowed


class Attention(nn.Module):
    def __init__(self, config: SmallThinkerConfig, layer_idx: int, qkv_bias: bool = False) -> None:
        """``qkv_bias``: biases on the q/k/v projections (Qwen2's dense models have them, SmallThinker none)."""
        super().__init__()
        H, h, k, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, k, D
        self.q_proj = nn.Linear(H, h * D, bias=qkv_bias)
        self.k_proj = nn.Linear(H, k * D, bias=qkv_bias)
        self.v_proj = nn.Linear(H, k * D, bias=qkv_bias)
        self.o_proj = nn.Linear(h * D, H, bias=False)
        # q, k and v as one module returning the three (the engine's Q4_0 attention, engine/attention_quant.py), or
        # None: the three Linear modules above
        self.qkv: nn.Module | None = None
        self.layer_idx = layer_idx
        self.use_rope = config.uses_rope(layer_idx)
        self.window = config.sliding_window_size if config.is_sliding(layer_idx) else None
        self.hooks = None  # the model's HookRegistry (edit points hook_q/k/v/pattern)

    @property
    def kind(self) -> str:
        return "sliding" if self.window else "global"

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, T, H), rotated on RoPE layers: (B, h, T, D), (B, k, T, D) x 2."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, k, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, k, T, D)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        hooks = self.hooks
        edits = hooks is not None and hooks.edits
        if edits:
            name = f"blocks.{self.layer_idx}.attn.hook_"
            q, k, v = hooks.edit(name + "q", q), hooks.edit(name + "k", k), hooks.edit(name + "v", v)
        if cache is not None:
            k, v, k_pos = cache.update(k, v, positions)  # (B, k, S, D)
        else:
            k_pos = positions
        if T == 1 and (self.window is None or k.shape[2] <= self.window):
            mask = None  # one query sees every cached key
        else:
            mask = attention_mask(positions, k_pos, self.window)  # (T, S)
        if edits and hooks.active(name + "pattern"):  # the pattern computed explicitly, so that a hook sees it
            out = self._attend_with_pattern(q, k, v, mask, name + "pattern")
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, H)

    def _attend_with_pattern(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             name: str) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v with the pattern (B, h, T, S) through the hook ``name`` (fp32 softmax)."""
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, h, S, D)
        scores = (q @ k.transpose(-1, -2)).float() / self.head_dim ** 0.5  # (B, h, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = self.hooks.edit(name, torch.softmax(scores, dim=-1).to(q.dtype))
        return pattern @ v  # (B, h, T, D)
