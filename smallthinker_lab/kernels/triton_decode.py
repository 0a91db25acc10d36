"""Triton kernels for one decode token of a SmallThinker layer: five launches per layer.

A decode token (batch 1) reads every resident weight once and does little arithmetic with it, so its speed is
set by memory traffic and by the number of kernel launches. The model's eager step runs dozens of small ATen
kernels and cuBLAS one-row products per layer; these kernels do a layer in five, each a fused one-row product
(GEMV) over bf16 weights with fp32 accumulation:

1. ``_pre_kernel``       RMSNorm of the residual, then q/k/v of the normalised residual and the router logits of
                         the raw residual (the pre-attention router), as one launch over all their rows.
2. ``_rope_attn_route_kernel`` per query head: rotary on q and k, the new K/V written into the KV cache at the
                         position's slot, attention over the cached keys and the new one (online softmax,
                         positions masked: causal, and the sliding window); and routing: top-k of the router
                         logits, their weights (sigmoid renormalised or softmax), the chosen experts sorted by id,
                         with the element offsets of their gate/up/down matrices.
3. ``_oproj_kernel``     the output projection plus the residual.
4. ``_gate_up_kernel``   RMSNorm, then gate and up of the K chosen experts read in place (no copy), ReGLU.
5. ``_down_kernel``      down of the K experts, the weighted combine in ascending expert id, plus the residual.

Each product kernel loads its whole tile of weights (a program's rows, all columns) first, then waits for the
previous kernel (``_after_previous``): launched with programmatic dependent launch, the weight reads of a kernel
overlap the previous kernel, and the launch gaps of the graph close.

Experts are addressed as ``base + offset``: one flat tensor (the engine's slot arena, or a layer's packed experts
in the in-memory model) and an [L, E, 3] table of element offsets of gate [F, H], up [F, H] and down [H, F]. The
in-memory model and the engine therefore run the same kernels over the same layouts, and give the same bits.

The roundings of the model are kept where it rounds to bf16 (each product's output, RMSNorm's cast, ReGLU, the
combine), but reductions run in another order than cuBLAS and flash attention, so logits differ from the eager
model's in the last bits: see ``smallthinker_lab.kernels`` for what that means for tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _after_previous(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL), a kernel starts while the previous one runs: what it reads before
    this point must not depend on the previous kernel (weights; what kernels two or more back wrote), and it writes
    nothing before it. Here it waits for the previous kernel to complete, then lets the next one start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _dot_rows(v_ptr, w_ptr, rows, rmask, N: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """``rows`` of w ([*, N] row-major) times the vector v, fp32. The weight tile loads before the wait for the
    previous kernel (``_after_previous``), v after it."""
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    w = tl.load(w_ptr + rows[:, None] * N + nn[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    _after_previous(PDL)
    v = tl.load(v_ptr + nn, mask=nmask, other=0.0).to(tl.float32)
    return tl.sum(w.to(tl.float32) * v[None, :], axis=1)


@triton.jit
def _gemv_rows(x_ptr, w_ptr, out_ptr, r0, n, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
               PDL: tl.constexpr):
    """Rows r0.. of w (n rows of H) times the raw vector x, bf16 out."""
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < n
    y = _dot_rows(x_ptr, w_ptr, rows, rmask, H, BLOCK_H, PDL)
    tl.store(out_ptr + rows, y.to(tl.bfloat16), mask=rmask)


@triton.jit
def _pre_kernel(x_ptr, ln_ptr, wq_ptr, wk_ptr, wv_ptr, wr_ptr, out_ptr, eps,
                H: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NE: tl.constexpr,
                NBQ: tl.constexpr, NBK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                PDL: tl.constexpr, wn_ptr=None, NBE: tl.constexpr = 0):
    """q/k/v of the normalised residual and the router logits of the raw residual; with ``wn_ptr`` (look-ahead),
    programs past the first NBQ + 2 NBK + NBE also apply the next layer's router to this raw residual, written
    after this layer's logits."""
    pid = tl.program_id(0)
    if NBE > 0:
        if pid >= NBQ + 2 * NBK + NBE:  # the look-ahead rows
            _gemv_rows(x_ptr, wn_ptr, out_ptr + NQ + 2 * NK + NE, (pid - NBQ - 2 * NBK - NBE) * BLOCK_R, NE, H,
                       BLOCK_R, BLOCK_H, PDL)
            return
    # which matrix this program's rows belong to: q, k, v (of the normalised residual) or the router (raw)
    if pid < NBQ:
        w_ptr = wq_ptr
        r0 = pid * BLOCK_R
    elif pid < NBQ + NBK:
        w_ptr = wk_ptr
        r0 = (pid - NBQ) * BLOCK_R
    elif pid < NBQ + 2 * NBK:
        w_ptr = wv_ptr
        r0 = (pid - NBQ - NBK) * BLOCK_R
    else:
        w_ptr = wr_ptr
        r0 = (pid - NBQ - 2 * NBK) * BLOCK_R
    n = tl.where(pid < NBQ, NQ, tl.where(pid < NBQ + 2 * NBK, NK, NE))
    o = tl.where(pid < NBQ, 0, tl.where(pid < NBQ + NBK, NQ, tl.where(pid < NBQ + 2 * NBK, NQ + NK, NQ + 2 * NK)))
    norm = pid < NBQ + 2 * NBK
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < n
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < H
    w = tl.load(w_ptr + rows[:, None] * H + hh[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
    lw = tl.load(ln_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
    _after_previous(PDL)
    xb = tl.load(x_ptr + hh, mask=hmask, other=0.0)
    xf = xb.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    hk = (lw * (xf * rstd).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    inp = tl.where(norm, hk, xf)
    y = tl.sum(w.to(tl.float32) * inp[None, :], axis=1)
    tl.store(out_ptr + o + rows, y.to(tl.bfloat16), mask=rmask)


@triton.jit
def _rope_attn_route_kernel(proj_ptr, pos_ptr, inv_freq_ptr, kc_ptr, vc_ptr, kpos_ptr, o_ptr, table_ptr,
                            sel_off_ptr, sel_w_ptr, ids_ptr, C, window, scale,
                            NQH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, NE: tl.constexpr,
                            BLOCK_E: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                            USE_ROPE: tl.constexpr, SOFTMAX: tl.constexpr, PDL: tl.constexpr,
                            owner_ptr=None, stamp_ptr=None, clock_ptr=None, src_ptr=None, slot_ptr=None,
                            dst_off_ptr=None, layer=0, stride=0, S: tl.constexpr = 1, BLOCK_S: tl.constexpr = 1,
                            OG: tl.constexpr = 0, OU: tl.constexpr = 0, OD: tl.constexpr = 0,
                            LRU: tl.constexpr = False, force_ptr=None, FORCED: tl.constexpr = False):
    """One program per query head: rotary on its query and on its kv head's new key; the first program of each kv
    head writes the new K/V into the cache slot of the position; attention over the cached keys (positions below
    the current one, masked: causal and the sliding window) plus the new key, online softmax. One more program
    (the last) routes (``_route``, or ``_route_lru`` with the device's LRU cache)."""
    h = tl.program_id(0)
    _after_previous(PDL)
    if h == NQH:  # the last program routes, beside the attention programs
        lg_ptr = proj_ptr + NQH * D + 2 * NKV * D
        if LRU:
            _route_lru(lg_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, owner_ptr, stamp_ptr, clock_ptr, src_ptr, slot_ptr,
                       dst_off_ptr, layer, stride, NE, BLOCK_E, K, SOFTMAX, S, BLOCK_S, OG, OU, OD, force_ptr,
                       FORCED)
        else:
            _route(lg_ptr, table_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, NE, BLOCK_E, K, SOFTMAX, force_ptr, FORCED)
        return
    G: tl.constexpr = NQH // NKV
    kvh = h // G
    pos = tl.load(pos_ptr)
    slot = pos % C
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    q = tl.load(proj_ptr + h * D + d).to(tl.float32)
    k_off = NQH * D + kvh * D
    k = tl.load(proj_ptr + k_off + d).to(tl.float32)
    v = tl.load(proj_ptr + k_off + NKV * D + d)
    if USE_ROPE:  # x * cos + rotate_half(x) * sin, each product and the sum rounded as the model's
        partner = (d + HALF) % D
        sign = tl.where(d < HALF, -1.0, 1.0)
        ang = pos.to(tl.float32) * tl.load(inv_freq_ptr + (d % HALF))
        cos = tl.cos(ang).to(tl.bfloat16).to(tl.float32)
        sin = tl.sin(ang).to(tl.bfloat16).to(tl.float32)
        qp = tl.load(proj_ptr + h * D + partner).to(tl.float32)
        q = ((q * cos).to(tl.bfloat16).to(tl.float32) + ((sign * qp) * sin).to(tl.bfloat16).to(tl.float32))
        kp = tl.load(proj_ptr + k_off + partner).to(tl.float32)
        k = ((k * cos).to(tl.bfloat16).to(tl.float32) + ((sign * kp) * sin).to(tl.bfloat16).to(tl.float32))
    q = q.to(tl.bfloat16).to(tl.float32)
    k = k.to(tl.bfloat16)
    if h % G == 0:
        tl.store(kc_ptr + (kvh * C + slot) * D + d, k)
        tl.store(vc_ptr + (kvh * C + slot) * D + d, v)
        if h == 0:
            tl.store(kpos_ptr + slot, pos)
    # the new key first, then the cached ones (a slot another program is writing holds a masked position)
    s_new = tl.sum(q * k.to(tl.float32), axis=0) * scale
    m_i = tl.full([1], 0.0, tl.float32) + s_new
    l_i = tl.full([1], 1.0, tl.float32)
    acc = v.to(tl.float32)
    n_scan = tl.minimum(pos, C)
    start = pos * 0
    while start < n_scan:
        n = start + tl.arange(0, BLOCK_N)
        nm = n < n_scan
        kpos = tl.load(kpos_ptr + n, mask=nm, other=-1)
        valid = nm & (kpos >= 0) & (kpos < pos) & ((window <= 0) | (pos - kpos < window))
        base = (kvh * C + n[:, None]) * D + d[None, :]
        kt = tl.load(kc_ptr + base, mask=nm[:, None], other=0.0).to(tl.float32)  # issued beside kpos's load
        s = tl.sum(kt * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        vt = tl.load(vc_ptr + base, mask=nm[:, None], other=0.0).to(tl.float32)
        vt = tl.where(valid[:, None], vt, 0.0)  # a slot being written may hold any bits: 0 * NaN must not happen
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        start += BLOCK_N
    tl.store(o_ptr + h * D + d, (acc / l_i).to(tl.bfloat16))


@triton.jit
def _top_k(lg_ptr, NE: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr):
    """The NE logits (fp32) and the mask of their top K, ties to the lower id."""
    e = tl.arange(0, BLOCK_E)
    emask = e < NE
    lg = tl.load(lg_ptr + e, mask=emask, other=float("-inf")).to(tl.float32)
    sel = e < 0
    for _ in tl.static_range(K):
        cand = tl.where(sel | (~emask), float("-inf"), lg)
        m = tl.max(cand, axis=0)
        first = tl.min(tl.where(cand == m, e, BLOCK_E), axis=0)
        sel = sel | (e == first)
    return lg, sel


@triton.jit
def _forced(lg_ptr, force_ptr, NE: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr):
    """The NE logits (fp32) and the mask of the K experts named at ``force_ptr`` (forced routing: a replayed
    trace), whatever the logits say."""
    e = tl.arange(0, BLOCK_E)
    emask = e < NE
    lg = tl.load(lg_ptr + e, mask=emask, other=float("-inf")).to(tl.float32)
    sel = e < 0
    for j in tl.static_range(K):
        sel = sel | (e == tl.load(force_ptr + j))
    return lg, sel


@triton.jit
def _choose(lg_ptr, sel_w_ptr, ids_ptr, NE: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr,
            SOFTMAX: tl.constexpr, force_ptr=None, FORCED: tl.constexpr = False):
    """Top-k of the router logits (ties to the lower id), or with FORCED the K experts at ``force_ptr``, and their
    weights from their logits (softmax, or sigmoid renormalised as the model: bf16 sigmoid, bf16 sum, bf16
    quotient), stored in ascending expert id. Returns the ids' lane index, the mask of the chosen and each lane's
    rank among them."""
    e = tl.arange(0, BLOCK_E)
    if FORCED:
        lg, sel = _forced(lg_ptr, force_ptr, NE, BLOCK_E, K)
    else:
        lg, sel = _top_k(lg_ptr, NE, BLOCK_E, K)
    if SOFTMAX:
        mx = tl.max(tl.where(sel, lg, float("-inf")), axis=0)
        pe = tl.where(sel, tl.exp(lg - mx), 0.0)
        w = (pe / tl.sum(pe, axis=0)).to(tl.bfloat16)
    else:
        sg = (1.0 / (1.0 + tl.exp(-lg))).to(tl.bfloat16).to(tl.float32)
        total = tl.sum(tl.where(sel, sg, 0.0), axis=0).to(tl.bfloat16).to(tl.float32)
        w = (sg / total).to(tl.bfloat16)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(ids_ptr + rank, e.to(tl.int64), mask=sel)
    tl.store(sel_w_ptr + rank, w, mask=sel)
    return e, sel, rank


@triton.jit
def _route(lg_ptr, table_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, NE: tl.constexpr, BLOCK_E: tl.constexpr,
           K: tl.constexpr, SOFTMAX: tl.constexpr, force_ptr=None, FORCED: tl.constexpr = False):
    """Routing (``_choose``), then the chosen experts' matrix offsets from the layer's [E, 3] table."""
    e, sel, rank = _choose(lg_ptr, sel_w_ptr, ids_ptr, NE, BLOCK_E, K, SOFTMAX, force_ptr, FORCED)
    for m3 in tl.static_range(3):
        off = tl.load(table_ptr + e * 3 + m3, mask=sel, other=0)
        tl.store(sel_off_ptr + rank * 3 + m3, off, mask=sel)


@triton.jit
def _route_lru(lg_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, owner_ptr, stamp_ptr, clock_ptr, src_ptr, slot_ptr,
               dst_off_ptr, layer, stride, NE: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr,
               SOFTMAX: tl.constexpr, S: tl.constexpr, BLOCK_S: tl.constexpr, OG: tl.constexpr,
               OU: tl.constexpr, OD: tl.constexpr, force_ptr=None, FORCED: tl.constexpr = False):
    """Routing (``_choose``), then an LRU expert cache of S slots resolved here, on the device, as the engine's
    ExpertCache would (see smallthinker_lab.kernels.ExpertLRU): the K chosen experts in ascending id; a resident
    one (``owner[slot]`` is its key, layer * NE + id) is a hit, read from its slot; a missed one takes the least
    recently used slot (free slots carry negative stamps, in the order the host would take them), is read from
    its record in host memory (``src[key]``, an element offset from the slot arena's base: zero-copy over the
    bus) and written through into that slot by the expert kernels (``dst_off``; -1: a hit, nothing to write).
    Each use stamps the slot with the next clock value. ``slot`` gets the slot of each (a miss as -1 - slot)
    for the host's accounting."""
    e, sel, rank = _choose(lg_ptr, sel_w_ptr, ids_ptr, NE, BLOCK_E, K, SOFTMAX, force_ptr, FORCED)
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    owner = tl.load(owner_ptr + s, mask=smask, other=-1)
    stamp = tl.load(stamp_ptr + s, mask=smask, other=1 << 62)
    clock = tl.load(clock_ptr)
    for j in tl.static_range(K):
        key = layer * NE + tl.sum(tl.where(sel & (rank == j), e, 0), axis=0)
        held = tl.max(tl.where(owner == key, s, -1), axis=0)
        hit = held >= 0
        oldest = tl.min(stamp, axis=0)
        victim = tl.min(tl.where(stamp == oldest, s, BLOCK_S), axis=0)
        slot = tl.where(hit, held, victim)
        clock += 1
        owner = tl.where(s == slot, key, owner)
        stamp = tl.where(s == slot, clock, stamp)
        rec = slot.to(tl.int64) * stride
        src = tl.where(hit, rec, tl.load(src_ptr + key))
        tl.store(sel_off_ptr + j * 3, src + OG)
        tl.store(sel_off_ptr + j * 3 + 1, src + OU)
        tl.store(sel_off_ptr + j * 3 + 2, src + OD)
        tl.store(dst_off_ptr + j * 3, tl.where(hit, -1, rec + OG))
        tl.store(dst_off_ptr + j * 3 + 1, tl.where(hit, -1, rec + OU))
        tl.store(dst_off_ptr + j * 3 + 2, tl.where(hit, -1, rec + OD))
        tl.store(slot_ptr + j, tl.where(hit, slot, -1 - slot).to(tl.int64))
    tl.store(owner_ptr + s, owner, mask=smask)
    tl.store(stamp_ptr + s, stamp, mask=smask)
    tl.store(clock_ptr, clock)


@triton.jit
def _route_kernel(lg_ptr, table_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, NE: tl.constexpr, BLOCK_E: tl.constexpr,
                  K: tl.constexpr, SOFTMAX: tl.constexpr, PDL: tl.constexpr, pred_ptr=None,
                  LOOKAHEAD: tl.constexpr = False, force_ptr=None, FORCED: tl.constexpr = False):
    """Routing alone; with LOOKAHEAD also the top-k ids of the next layer's router logits (after this layer's in
    ``lg``), ascending, into ``pred_ptr``."""
    _after_previous(PDL)
    _route(lg_ptr, table_ptr, sel_off_ptr, sel_w_ptr, ids_ptr, NE, BLOCK_E, K, SOFTMAX, force_ptr, FORCED)
    if LOOKAHEAD:
        e = tl.arange(0, BLOCK_E)
        _, sel = _top_k(lg_ptr + NE, NE, BLOCK_E, K)
        rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(pred_ptr + rank, e.to(tl.int64), mask=sel)


@triton.jit
def _oproj_kernel(a_ptr, w_ptr, x_ptr, out_ptr, H: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < H
    y = _dot_rows(a_ptr, w_ptr, rows, rmask, HD, BLOCK_D, PDL).to(tl.bfloat16).to(tl.float32)
    x = tl.load(x_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (x + y).to(tl.bfloat16), mask=rmask)


@triton.jit
def _gate_up_kernel(x_ptr, ln_ptr, base_ptr, sel_off_ptr, a_ptr, eps, H: tl.constexpr, F: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr, dst_off_ptr=None,
                    WRITE: tl.constexpr = False):
    """RMSNorm, then gate and up rows of the chosen expert j, ReGLU. ``WRITE``: an expert read from host memory
    (``dst_off`` >= 0) is also written into its cache slot (``_route_lru``)."""
    j = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < F
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < H
    # the chosen experts' offsets were written two kernels back (routing): readable before the wait
    og = tl.multiple_of(tl.load(sel_off_ptr + j * 3), 16)
    ou = tl.multiple_of(tl.load(sel_off_ptr + j * 3 + 1), 16)
    idx = rows[:, None] * H + hh[None, :]
    m2 = rmask[:, None] & hmask[None, :]
    wg = tl.load(base_ptr + og + idx, mask=m2, other=0.0)
    wu = tl.load(base_ptr + ou + idx, mask=m2, other=0.0)
    lw = tl.load(ln_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
    _after_previous(PDL)
    if WRITE:
        dg = tl.load(dst_off_ptr + j * 3)
        if dg >= 0:
            du = tl.multiple_of(tl.load(dst_off_ptr + j * 3 + 1), 16)
            tl.store(base_ptr + tl.multiple_of(dg, 16) + idx, wg, mask=m2)
            tl.store(base_ptr + du + idx, wu, mask=m2)
    xf = tl.load(x_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    u = (lw * (xf * rstd).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    g = tl.sum(wg.to(tl.float32) * u[None, :], axis=1).to(tl.bfloat16).to(tl.float32)
    up = tl.sum(wu.to(tl.float32) * u[None, :], axis=1).to(tl.bfloat16).to(tl.float32)
    a = up * tl.maximum(g, 0.0)
    tl.store(a_ptr + j * F + rows, a.to(tl.bfloat16), mask=rmask)


@triton.jit
def _down_kernel(a_ptr, base_ptr, sel_off_ptr, sel_w_ptr, x_ptr, out_ptr, H: tl.constexpr, F: tl.constexpr,
                 K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                 PDL: tl.constexpr, dst_off_ptr=None, WRITE: tl.constexpr = False):
    """down rows of the K chosen experts, the weighted combine in ascending expert id, plus the residual.
    ``WRITE``: as ``_gate_up_kernel``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < H
    jj = tl.arange(0, BLOCK_K)
    jmask = jj < K
    ff = tl.arange(0, BLOCK_F)
    fmask = ff < F
    # the K chosen experts' down rows of this program, [K, rows, F] (offsets written three kernels back)
    od = tl.multiple_of(tl.load(sel_off_ptr + jj * 3 + 2, mask=jmask, other=0), 16)
    idx = rows[None, :, None] * F + ff[None, None, :]
    m3 = jmask[:, None, None] & rmask[None, :, None] & fmask[None, None, :]
    w = tl.load(base_ptr + od[:, None, None] + idx, mask=m3, other=0.0)
    _after_previous(PDL)
    if WRITE:
        dd = tl.load(dst_off_ptr + jj * 3 + 2, mask=jmask, other=-1)
        dm = m3 & (dd >= 0)[:, None, None]
        tl.store(base_ptr + tl.multiple_of(tl.maximum(dd, 0), 16)[:, None, None] + idx, w, mask=dm)
    a = tl.load(a_ptr + jj[:, None] * F + ff[None, :], mask=jmask[:, None] & fmask[None, :], other=0.0)
    d = tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2)  # [K, rows]
    d = d.to(tl.bfloat16).to(tl.float32)
    wj = tl.load(sel_w_ptr + jj, mask=jmask, other=0.0).to(tl.float32)
    y = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in tl.static_range(K):  # the experts in ascending id: the model's combine order, bf16 adds
        dj = tl.sum(tl.where(jj[:, None] == j, d, 0.0), axis=0)
        w_j = tl.sum(tl.where(jj == j, wj, 0.0), axis=0)
        y = (y + (dj * w_j).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    x = tl.load(x_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (x + y).to(tl.bfloat16), mask=rmask)


@triton.jit
def _embed_kernel(tok_ptr, emb_ptr, x_ptr, H: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    _after_previous(PDL)
    tok = tl.load(tok_ptr)
    hh = tl.arange(0, BLOCK_H)
    m = hh < H
    tl.store(x_ptr + hh, tl.load(emb_ptr + tok * H + hh, mask=m, other=0.0), mask=m)


@triton.jit
def _norm_kernel(x_ptr, ln_ptr, out_ptr, eps, H: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    _after_previous(PDL)
    hh = tl.arange(0, BLOCK_H)
    m = hh < H
    x = tl.load(x_ptr + hh, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    lw = tl.load(ln_ptr + hh, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + hh, (lw * (x * rstd).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16), mask=m)
