"""The pre-attention router, ReGLU experts and the MoE block.

Shape letters: N tokens (batch and time flattened), H hidden, E experts, K active experts, F expert ffn size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SmallThinkerConfig
from .hooks import HookRegistry


class Expert(nn.Module):
    """ReGLU expert: down(up(x) * relu(gate(x)))."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * F.relu(self.gate(x)))


def check_expert_ids(ids: torch.Tensor, num_experts: int, where: str) -> None:
    """ValueError unless every id is in [0, num_experts) and each row's ids are distinct."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: expert ids must be integers, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"{where}: expert ids must be in [0, {num_experts}), got {int(ids.min())}..{int(ids.max())}")
    s = ids.sort(dim=-1).values
    if ids.shape[-1] > 1 and bool((s[..., 1:] == s[..., :-1]).any()):
        raise ValueError(f"{where}: a token's expert ids must be distinct")


def route_weights(logits: torch.Tensor, k: int, apply_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the raw router logits, then softmax over them, or sigmoid renormalised to sum 1.

    logits (N, E) -> ids (N, K) long, weights (N, K) in logits' dtype. Softmax runs in fp32 (as the
    reference); sigmoid in the logits' dtype.
    """
    top_logits, ids = torch.topk(logits, k, dim=-1)  # (N, K)
    return ids, _weights(top_logits, apply_softmax, logits.dtype)


def weights_of(logits: torch.Tensor, ids: torch.Tensor, apply_softmax: bool) -> torch.Tensor:
    """The routing weights of experts ``ids`` (N, K) by the model's rule, from their logits (N, E): the weights
    :func:`route_weights` gives when those are the top-k (forced or edited routing uses it)."""
    return _weights(logits.gather(-1, ids), apply_softmax, logits.dtype)


def _weights(top_logits: torch.Tensor, apply_softmax: bool, dtype: torch.dtype) -> torch.Tensor:
    if apply_softmax:
        return torch.softmax(top_logits.float(), dim=-1).to(dtype)
    s = torch.sigmoid(top_logits)
    return s / s.sum(dim=-1, keepdim=True)


class MoEBlock(nn.Module):
    """Named ``block_sparse_moe`` in the checkpoints: ``primary_router`` plus ``experts.{e}``."""

    def __init__(self, config: SmallThinkerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.apply_softmax = config.moe_primary_router_apply_softmax
        self.primary_router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.hidden_size, config.moe_ffn_hidden_size)
                                     for _ in range(config.num_experts))
        self.hooks: HookRegistry | None = None

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits from the raw residual x (before input_layernorm): (..., H) -> (..., E)."""
        return self.primary_router(x)

    def select(self, logits: torch.Tensor, rules_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and weights (N, K) of logits (N, E), through the ``hook_topk_ids`` / ``hook_topk_weights``
        edit hooks when any are registered (edited ids get their weights by the model's rule). ``rules_only``:
        only the ``intervene()`` rules (the engine's look-ahead)."""
        ids, weights = route_weights(logits, self.top_k, self.apply_softmax)
        hooks = self.hooks
        if hooks is not None and hooks.edits:
            i = self.layer_idx
            new = hooks.edit(f"blocks.{i}.moe.hook_topk_ids", ids, rules_only)
            if new is not ids:
                check_expert_ids(new, self.num_experts, f"blocks.{i}.moe.hook_topk_ids")
                ids, weights = new, weights_of(logits, new, self.apply_softmax)
            weights = hooks.edit(f"blocks.{i}.moe.hook_topk_weights", weights, rules_only)
        return ids, weights

    def edit_logits(self, logits: torch.Tensor, rules_only: bool = False) -> torch.Tensor:
        """Router logits (N, E) through the ``hook_router_logits`` edit hooks (none registered: as they are)."""
        hooks = self.hooks
        if hooks is None or not hooks.edits:
            return logits
        return hooks.edit(f"blocks.{self.layer_idx}.moe.hook_router_logits", logits, rules_only)

    def forward(self, u: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """u: normalised hidden (B, T, H); router_logits (B, T, E) computed before attention (and through the
        ``hook_router_logits`` edit hooks: :meth:`edit_logits`, which the decoder layer applies)."""
        shape = u.shape
        u = u.reshape(-1, shape[-1])  # (N, H)
        logits = router_logits.reshape(-1, self.num_experts)  # (N, E)
        ids, weights = self.select(logits)  # (N, K)
        weights = weights.to(u.dtype)
        hooks = self.hooks
        if hooks is not None and hooks.active("router"):
            hooks.fire("router", layer=self.layer_idx, logits=logits, topk_ids=ids, topk_weights=weights)
        watch_one = hooks is not None and hooks.active("expert")
        seen: tuple[list, list, list] | None = ([], [], []) if hooks is not None and hooks.active("moe") else None
        edits = hooks is not None and hooks.edits
        y = torch.zeros_like(u)
        # loop only over experts that received tokens (as HF Mixtral), combine with index_add_
        expert_mask = F.one_hot(ids, self.num_experts).permute(2, 1, 0)  # (E, K, N)
        for e in torch.nonzero(expert_mask.sum(dim=(1, 2))).flatten().tolist():
            slot, token = torch.where(expert_mask[e])
            expert = self.experts[e]
            x_e = u[token]  # (n, H)
            g = expert.gate(x_e)  # (n, F)
            if watch_one:
                hooks.fire("expert", layer=self.layer_idx, expert=e, token_index=token, gate=g)
            if seen is not None:
                seen[0].append(e), seen[1].append(token), seen[2].append(g)
            act = expert.up(x_e) * F.relu(g)  # (n, F)
            if edits:
                act = hooks.edit(f"blocks.{self.layer_idx}.moe.experts.{e}.hook_act", act)
            out = expert.down(act)  # (n, H)
            y.index_add_(0, token, out * weights[token, slot, None])
        if seen is not None:
            hooks.fire("moe", layer=self.layer_idx, experts=seen[0], token_index=seen[1], gates=seen[2])
        return y.reshape(shape)
