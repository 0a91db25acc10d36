"""The fused graph decoder's layer halves and the exact graph decoder's fused elementwise chains.

The arithmetic is the model's (``rms_norm``, ``apply_rope``, ``route_weights`` from smallthinker_lab.model), arranged
for one token and for inductor: ``fused_pre`` (router on the raw residual, routing, input norm, q/k/v, rotary) and
``fused_post`` (attention over the static KV slots, o_proj, post norm, the K experts read in place from their cache
slots, the combine in ascending expert order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...model.layers import apply_rope, rms_norm
from ...model.moe import route_weights


def sorted_route(logits: torch.Tensor, k: int, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``route_weights`` for one token, then the ids sorted ascending (the model's combine order) with
    their weights: (K,) long, (K,) in logits' dtype."""
    ids, w = route_weights(logits, k, softmax)  # (1, K)
    sid, perm = torch.sort(ids[0])
    return sid, w[0].gather(0, perm)



# ------------------------------------------------------------------ exact: the model's elementwise chains, fused
# Each helper is a chain of the model's elementwise ops between its reductions and matrix products. Compiled with
# inductor's ``emulate_precision_casts`` every intermediate is rounded to the tensors' dtype as the eager kernels
# round it, and the ops are IEEE fp32 (no reassociation; the roundings keep products from contracting into FMAs
# with a following add), so a fused chain gives the eager chain's bits with one kernel instead of several.
def _pw_sq(x):
    return x.float().pow(2)


def _pw_norm(x, m, weight, eps: float):
    """RMSNorm after its mean: x.float() * rsqrt(m + eps), cast back, times the weight."""
    return weight * (x.float() * torch.rsqrt(m + eps)).to(x.dtype)


def _pw_add_sq(x, y):
    """The residual add, and the squares the next RMSNorm averages."""
    z = x + y
    return z, z.float().pow(2)


def _pw_rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _pw_reglu(up, gate):
    return up * F.relu(gate)


def _pw_acc(y, out, w):
    """The engine's combine step: y + out * weight, each rounded."""
    return y + out * w


POINTWISE = {"sq": _pw_sq, "norm": _pw_norm, "add_sq": _pw_add_sq, "rope": _pw_rope, "reglu": _pw_reglu,
              "acc": _pw_acc}


def emulates_casts() -> bool:
    try:
        import torch._inductor.config as ic
    except Exception:  # noqa: BLE001
        return False
    return hasattr(ic, "emulate_precision_casts")


# ------------------------------------------------------------------ fused (exact=False) layer halves
def fused_pre(x, wr, ln1, wq, wk, wv, cos, sin, slot_row, *, k: int, softmax: bool, eps: float, n_heads: int,
              n_kv: int, head_dim: int, use_rope: bool):
    """Router (raw residual), routing, input norm, q/k/v, rotary. x (1, H) -> q (h, D), k/v (k, D), sorted ids,
    their weights and slots (K,)."""
    sid, w = sorted_route(F.linear(x, wr), k, softmax)
    slots = slot_row.index_select(0, sid)
    h = rms_norm(x, ln1, eps)
    q = F.linear(h, wq).view(n_heads, head_dim)
    kk = F.linear(h, wk).view(n_kv, head_dim)
    v = F.linear(h, wv).view(n_kv, head_dim)
    if use_rope:
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
    return q, kk, v, sid, w, slots


def _expert_weights(arena, slots, mats, compiled: bool):
    """The K selected experts' (gate, up, down) as [K, rows, cols] views of their records. ``arena`` is every slot as
    one [n_slots, record elements] tensor: more elements than an int32 holds on a large model, so inductor indexes
    it with int64 (a [n_slots, F, H] view of the same bytes has fewer elements than its largest offset, and int32
    indexing then overflows). Compiled: indirect loads, nothing copied; eager: the K records gathered."""
    rec = arena[slots] if compiled else arena.index_select(0, slots)  # (K, record elements)
    return [rec[:, off:off + rows * cols].reshape(-1, rows, cols) for off, rows, cols in mats]


def fused_post(x, q, k_buf, v_buf, kpos, pos, wo, ln2, w, slots, arena, *, mats: tuple, eps: float,
               window: int | None, down_hf: bool, compiled: bool):
    """Attention over the static KV slots (positions masked), o_proj, residual, post norm, the K experts read in
    place from their slots (``mats``: element offset, rows, cols of gate, up, down in a record), the weighted
    combine in ascending expert order, residual. x (1, H) -> (1, H)."""
    dtype = x.dtype
    n_kv, D = k_buf.shape[1], k_buf.shape[3]
    qg = q.float().view(n_kv, -1, D) * (1.0 / math.sqrt(D))  # (k, h/k, D)
    kf, vf = k_buf[0].float(), v_buf[0].float()  # (k, C, D)
    valid = (kpos >= 0) & (kpos <= pos)
    if window is not None:
        valid = valid & (pos - kpos < window)
    if compiled:  # reductions inductor fuses (no materialised products)
        s = (qg[:, :, None, :] * kf[:, None, :, :]).sum(-1)  # (k, h/k, C)
    else:
        s = torch.matmul(qg, kf.transpose(1, 2))
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if compiled:
        o = (p[:, :, :, None] * vf[:, None, :, :]).sum(2)  # (k, h/k, D)
    else:
        o = torch.matmul(p, vf)
    x = x + F.linear(o.to(dtype).reshape(1, -1), wo)
    u = rms_norm(x, ln2, eps)  # (1, H)
    wg, wu, wd = _expert_weights(arena, slots, mats, compiled)
    if compiled:  # each weight read once, in place, from its slot (indirect loads), fp32 accumulation
        uf = u.float()
        g = (wg.float() * uf).sum(-1).to(dtype)  # (K, F)
        up = (wu.float() * uf).sum(-1).to(dtype)
        a = (up * F.relu(g)).float()  # (K, F), rounded to bf16 as the model's product is
        if down_hf:
            d = (wd.float() * a[:, None, :]).sum(-1)  # (K, H)
        else:
            d = (wd.float() * a[:, :, None]).sum(1)
    else:  # gather the K experts' matrices, then batched products
        ub = u.expand(slots.shape[0], -1).unsqueeze(-1)  # (K, H, 1)
        g = torch.bmm(wg, ub).squeeze(-1)
        up = torch.bmm(wu, ub).squeeze(-1)
        a = (up * F.relu(g)).unsqueeze(-1)  # (K, F, 1)
        d = torch.bmm(wd, a).squeeze(-1) if down_hf else torch.bmm(wd.transpose(1, 2), a).squeeze(-1)
    o = d.to(dtype) * w[:, None]  # (K, H): out * weight, as the engine
    y = o[0]
    for j in range(1, o.shape[0]):  # the model's combine: ascending expert id, bf16 adds
        y = y + o[j]
    return x + y
