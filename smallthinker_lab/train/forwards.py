"""The forwards training uses: the MoE with every expert computed densely (gradients for all), the attention as
torch's fused kernel, and the pair the trainer switches between."""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from ..model.attention import Attention, attention_mask
from ..model.model import SmallThinkerForCausalLM
from ..model.moe import MoEBlock


# ------------------------------------------------------------------ fast training forwards
def dense_moe_forward(self: MoEBlock, u: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """MoEBlock.forward as dense matmuls over all experts (no hooks): u (B, T, H), logits (B, T, E) -> (B, T, H)."""
    shape = u.shape
    E = self.num_experts
    u = u.reshape(-1, shape[-1])  # (N, H)
    ids, weights = self.select(router_logits.reshape(-1, E))  # (N, K)
    w_gate = torch.cat([e.gate.weight for e in self.experts])  # (E*F, H)
    w_up = torch.cat([e.up.weight for e in self.experts])  # (E*F, H)
    w_down = torch.cat([e.down.weight for e in self.experts], dim=1)  # (H, E*F)
    g = F.linear(u, w_gate)  # (N, E*F)
    a = F.linear(u, w_up) * F.relu(g)  # (N, E*F)
    dense_w = torch.zeros(u.shape[0], E, dtype=a.dtype, device=u.device).scatter(1, ids, weights.to(a.dtype))
    a = (a.view(u.shape[0], E, -1) * dense_w[:, :, None]).view(u.shape[0], -1)  # (N, E*F)
    return F.linear(a, w_down).to(u.dtype).reshape(shape)


def train_attention_forward(self: Attention, x: torch.Tensor, positions: torch.Tensor, rope, cache=None
                            ) -> torch.Tensor:
    """Attention.forward without a cache, KV heads repeated; global layers use is_causal (flash on CUDA)."""
    if cache is not None:
        raise ValueError("the training attention forward takes no KV cache")
    B, T, _ = x.shape
    q, k, v = self.project(x, rope)
    rep = self.n_heads // self.n_kv
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, h, T, D)
    if self.window is None or self.window >= T:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(positions, positions, self.window))
    return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, H)


@contextlib.contextmanager
def training_forwards(model: SmallThinkerForCausalLM, dense_moe: bool = True):
    """Swap in the fast training forwards for the duration of the block (instance attributes, removed after):
    attention always, the MoE if ``dense_moe``."""
    patched = []
    for module in model.modules():
        if isinstance(module, MoEBlock) and dense_moe:
            module.forward = types.MethodType(dense_moe_forward, module)
            patched.append(module)
        elif isinstance(module, Attention):
            module.forward = types.MethodType(train_attention_forward, module)
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
