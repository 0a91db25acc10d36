"""Triton kernels for the expert products of a decode step over quantized experts: int8 and ggml Q4_0.

The same two products as ``_gate_up_kernel`` and ``_down_kernel`` of triton_decode.py (RMSNorm, gate and up of the
K chosen experts, ReGLU; down, the weighted combine in ascending expert id, the residual), with the same bf16
roundings, but the weights are read as their quantized bytes and dequantised in registers: a decode token reads
~2x (int8) or ~3.6x (Q4_0) fewer expert bytes than in bf16. Experts are addressed as in the bf16 kernels,
``base + offset``, but ``base`` is a flat uint8 tensor and the offsets are byte offsets (multiples of 16).

A matrix of R rows (output features) and C columns (the dot-product dimension) is stored as
* int8: R fp32 scales, then R x C int8 (row-major); weight = q * scale[row]. The bundle's ``int8`` format.
* Q4_0: R x C/32 ggml ``block_q4_0`` (an fp16 scale d, then 16 bytes: byte k holds element k of the block in its
  low nibble and element k + 16 in its high nibble); weight = d * (q - 8), computed in fp32 as ggml does. The
  bundle's ``q4_0`` format, and a GGUF's Q4_0 bytes (whose down matrix has its blocks along F, as here).
gate and up are [F, H] (C = H), down is [H, F] (C = F), the model's layouts.

Several decode rows (tokens) per launch: ``x`` is [M, H], each row with its own K experts (``sel_off`` [M, K, 3],
``sel_w`` [M, K]), ``a`` [M, K, F], ``out`` [M, H]; M = 1 is the decode step's buffers as they are.

How a product is computed: a Q4_0 tile is loaded as [rows, blocks, 16] bytes and [rows, blocks] scales; the
activation's two halves of each block (elements k and k + 16) are loaded as [blocks, 16]; per block the sum of
(q - 8) * x over its 32 elements, times d, summed over the blocks, all fp32. int8: the sum of q * x over the row,
times the row's scale. These are the dequantised weights' products up to fp32 reassociation (the scale factored
out of the block or row sum), so outputs equal a dequantise-then-multiply reference up to fp32 accumulation order,
then the same bf16 roundings (tests/test_quant_kernels.py states the tolerance).

``WRITE``: as in the bf16 kernels, an expert read from host memory (``dst_off`` >= 0) is also written into its
cache slot, its bytes as read (scales and quants).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import _after_previous

QK = tl.constexpr(32)  # weights per Q4_0 block (a constexpr global: compiled kernels may read it)
QB = tl.constexpr(18)  # bytes per Q4_0 block


@triton.jit
def _norm_at(x_ptr, ln_ptr, idx, mask, rstd):
    """RMSNorm's output at element indices ``idx`` (any shape), rounded as the model (bf16 cast, bf16 product)."""
    xv = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lw = tl.load(ln_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return (lw * (xv * rstd).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)


@triton.jit
def _rstd(x_ptr, H: tl.constexpr, BLOCK_H: tl.constexpr, eps):
    hh = tl.arange(0, BLOCK_H)
    xf = tl.load(x_ptr + hh, mask=hh < H, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)


@triton.jit
def _q4_dot(qs, d, vlo, vhi, AXIS: tl.constexpr):
    """Q4_0 products: nibble bytes ``qs`` [..., blocks, 16], fp32 scales ``d`` [..., blocks], the vector's low and
    high halves of each block broadcast to ``qs``'s shape; sums over the last two axes (AXIS is the bytes' axis)."""
    lo = (qs & 15).to(tl.float32) - 8.0
    hi = (qs >> 4).to(tl.float32) - 8.0
    part = tl.sum(lo * vlo + hi * vhi, axis=AXIS)
    return tl.sum(part * d, axis=AXIS - 1)


@triton.jit
def _gate_up_int8_kernel(x_ptr, ln_ptr, base_ptr, sel_off_ptr, a_ptr, eps, H: tl.constexpr, F: tl.constexpr,
                         K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
                         dst_off_ptr=None, WRITE: tl.constexpr = False):
    """Program (m * K + j, row block): RMSNorm of x[m], gate and up rows of its chosen expert j (int8), ReGLU."""
    pj = tl.program_id(0)
    m = pj // K
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < F
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < H
    og = tl.multiple_of(tl.load(sel_off_ptr + pj * 3), 16)
    ou = tl.multiple_of(tl.load(sel_off_ptr + pj * 3 + 1), 16)
    idx = rows[:, None] * H + hh[None, :]
    m2 = rmask[:, None] & hmask[None, :]
    sg_ptr = (base_ptr + og).to(tl.pointer_type(tl.float32)) + rows
    su_ptr = (base_ptr + ou).to(tl.pointer_type(tl.float32)) + rows
    qg_ptr = (base_ptr + og + F * 4).to(tl.pointer_type(tl.int8)) + idx
    qu_ptr = (base_ptr + ou + F * 4).to(tl.pointer_type(tl.int8)) + idx
    sg = tl.load(sg_ptr, mask=rmask, other=0.0)
    su = tl.load(su_ptr, mask=rmask, other=0.0)
    wg = tl.load(qg_ptr, mask=m2, other=0)
    wu = tl.load(qu_ptr, mask=m2, other=0)
    _after_previous(PDL)
    if WRITE:
        dg = tl.load(dst_off_ptr + pj * 3)
        if dg >= 0:
            du = tl.load(dst_off_ptr + pj * 3 + 1)
            tl.store((base_ptr + dg).to(tl.pointer_type(tl.float32)) + rows, sg, mask=rmask)
            tl.store((base_ptr + du).to(tl.pointer_type(tl.float32)) + rows, su, mask=rmask)
            tl.store((base_ptr + dg + F * 4).to(tl.pointer_type(tl.int8)) + idx, wg, mask=m2)
            tl.store((base_ptr + du + F * 4).to(tl.pointer_type(tl.int8)) + idx, wu, mask=m2)
    xr = x_ptr + m * H
    u = _norm_at(xr, ln_ptr, hh, hmask, _rstd(xr, H, BLOCK_H, eps))
    g = (tl.sum(wg.to(tl.float32) * u[None, :], axis=1) * sg).to(tl.bfloat16).to(tl.float32)
    up = (tl.sum(wu.to(tl.float32) * u[None, :], axis=1) * su).to(tl.bfloat16).to(tl.float32)
    tl.store(a_ptr + pj * F + rows, (up * tl.maximum(g, 0.0)).to(tl.bfloat16), mask=rmask)


@triton.jit
def _gate_up_q4_0_kernel(x_ptr, ln_ptr, base_ptr, sel_off_ptr, a_ptr, eps, H: tl.constexpr, F: tl.constexpr,
                         K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
                         PDL: tl.constexpr, dst_off_ptr=None, WRITE: tl.constexpr = False):
    """Program (m * K + j, row block): RMSNorm of x[m], gate and up rows of its chosen expert j (Q4_0), ReGLU."""
    NB: tl.constexpr = H // QK
    pj = tl.program_id(0)
    m = pj // K
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < F
    b = tl.arange(0, BLOCK_B)
    k = tl.arange(0, 16)
    og = tl.multiple_of(tl.load(sel_off_ptr + pj * 3), 16)
    ou = tl.multiple_of(tl.load(sel_off_ptr + pj * 3 + 1), 16)
    blk = rows[:, None] * NB + b[None, :]  # [R, B] block ids in the matrix
    m2 = rmask[:, None] & (b < NB)[None, :]
    m3 = m2[:, :, None]
    qidx = blk[:, :, None] * QB + 2 + k[None, None, :]  # [R, B, 16] nibble bytes
    qg = tl.load(base_ptr + og + qidx, mask=m3, other=0)
    qu = tl.load(base_ptr + ou + qidx, mask=m3, other=0)
    dg_ptr = (base_ptr + og + blk * QB).to(tl.pointer_type(tl.float16))
    du_ptr = (base_ptr + ou + blk * QB).to(tl.pointer_type(tl.float16))
    dg = tl.load(dg_ptr, mask=m2, other=0.0)
    du = tl.load(du_ptr, mask=m2, other=0.0)
    _after_previous(PDL)
    if WRITE:
        tg = tl.load(dst_off_ptr + pj * 3)
        if tg >= 0:
            tu = tl.load(dst_off_ptr + pj * 3 + 1)
            tl.store(base_ptr + tg + qidx, qg, mask=m3)
            tl.store(base_ptr + tu + qidx, qu, mask=m3)
            tl.store((base_ptr + tg + blk * QB).to(tl.pointer_type(tl.float16)), dg, mask=m2)
            tl.store((base_ptr + tu + blk * QB).to(tl.pointer_type(tl.float16)), du, mask=m2)
    xr = x_ptr + m * H
    rstd = _rstd(xr, H, BLOCK_H, eps)
    el = b[:, None] * QK + k[None, :]  # [B, 16]: element k of each block (low nibbles); + 16: the high ones
    bm = (b < NB)[:, None] & (k < 16)[None, :]
    ulo = _norm_at(xr, ln_ptr, el, bm, rstd)[None, :, :]
    uhi = _norm_at(xr, ln_ptr, el + 16, bm, rstd)[None, :, :]
    g = _q4_dot(qg, dg.to(tl.float32), ulo, uhi, 2).to(tl.bfloat16).to(tl.float32)
    up = _q4_dot(qu, du.to(tl.float32), ulo, uhi, 2).to(tl.bfloat16).to(tl.float32)
    tl.store(a_ptr + pj * F + rows, (up * tl.maximum(g, 0.0)).to(tl.bfloat16), mask=rmask)


@triton.jit
def _combine(d, sel_w_ptr, x_ptr, out_ptr, m, rows, rmask, jj, jmask, H: tl.constexpr, K: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """The K experts' down outputs ``d`` [K, rows] (bf16-rounded), weighted and added in ascending expert id with
    bf16 adds as the model, plus the residual x[m]: out[m]."""
    wj = tl.load(sel_w_ptr + m * K + jj, mask=jmask, other=0.0).to(tl.float32)
    y = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in tl.static_range(K):
        dj = tl.sum(tl.where(jj[:, None] == j, d, 0.0), axis=0)
        w_j = tl.sum(tl.where(jj == j, wj, 0.0), axis=0)
        y = (y + (dj * w_j).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    x = tl.load(x_ptr + m * H + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * H + rows, (x + y).to(tl.bfloat16), mask=rmask)


@triton.jit
def _down_int8_kernel(a_ptr, base_ptr, sel_off_ptr, sel_w_ptr, x_ptr, out_ptr, H: tl.constexpr, F: tl.constexpr,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                      PDL: tl.constexpr, dst_off_ptr=None, WRITE: tl.constexpr = False):
    """Program (m, row block): down rows of row m's K experts (int8), the combine, plus the residual."""
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < H
    jj = tl.arange(0, BLOCK_K)
    jmask = jj < K
    ff = tl.arange(0, BLOCK_F)
    fmask = ff < F
    od = tl.multiple_of(tl.load(sel_off_ptr + (m * K + jj) * 3 + 2, mask=jmask, other=0), 16)
    idx = rows[None, :, None] * F + ff[None, None, :]
    m3 = jmask[:, None, None] & rmask[None, :, None] & fmask[None, None, :]
    ms = jmask[:, None] & rmask[None, :]
    s_ptr = (base_ptr + od).to(tl.pointer_type(tl.float32))[:, None] + rows[None, :]
    q_ptr = (base_ptr + od + H * 4).to(tl.pointer_type(tl.int8))[:, None, None] + idx
    s = tl.load(s_ptr, mask=ms, other=0.0)  # [K, rows]
    w = tl.load(q_ptr, mask=m3, other=0)  # [K, rows, F]
    _after_previous(PDL)
    if WRITE:
        dd = tl.load(dst_off_ptr + (m * K + jj) * 3 + 2, mask=jmask, other=-1)
        dv = dd >= 0
        dst = base_ptr + tl.maximum(dd, 0)
        tl.store(dst.to(tl.pointer_type(tl.float32))[:, None] + rows[None, :], s, mask=ms & dv[:, None])
        tl.store((dst + H * 4).to(tl.pointer_type(tl.int8))[:, None, None] + idx, w, mask=m3 & dv[:, None, None])
    a = tl.load(a_ptr + (m * K + jj)[:, None] * F + ff[None, :], mask=jmask[:, None] & fmask[None, :], other=0.0)
    d = tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2) * s  # [K, rows]
    _combine(d.to(tl.bfloat16).to(tl.float32), sel_w_ptr, x_ptr, out_ptr, m, rows, rmask, jj, jmask, H, K, BLOCK_R)


@triton.jit
def _down_q4_0_kernel(a_ptr, base_ptr, sel_off_ptr, sel_w_ptr, x_ptr, out_ptr, H: tl.constexpr, F: tl.constexpr,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
                      PDL: tl.constexpr, dst_off_ptr=None, WRITE: tl.constexpr = False):
    """Program (m, row block): down rows of row m's K experts (Q4_0, blocks along F), the combine, the residual.
    The K experts' rows are one axis of BLOCK_K * BLOCK_R (expert-major), so tiles stay 3-D."""
    NB: tl.constexpr = F // QK
    KR: tl.constexpr = BLOCK_K * BLOCK_R
    m = tl.program_id(0)
    t = tl.arange(0, KR)
    j = t // BLOCK_R  # [KR] the expert of each lane's row
    rows = tl.program_id(1) * BLOCK_R + t % BLOCK_R
    tmask = (j < K) & (rows < H)
    b = tl.arange(0, BLOCK_B)
    k = tl.arange(0, 16)
    bmask = b < NB
    od = tl.multiple_of(tl.load(sel_off_ptr + (m * K + j) * 3 + 2, mask=j < K, other=0), 16)
    boff = od[:, None] + (rows[:, None] * NB + b[None, :]) * QB  # [KR, B]: byte offset of each block from base
    m2 = tmask[:, None] & bmask[None, :]
    m3 = m2[:, :, None]
    qidx = boff[:, :, None] + 2 + k[None, None, :]  # [KR, B, 16] nibble bytes
    qs = tl.load(base_ptr + qidx, mask=m3, other=0)
    dsc = tl.load((base_ptr + boff).to(tl.pointer_type(tl.float16)), mask=m2, other=0.0)
    _after_previous(PDL)
    if WRITE:
        dd = tl.load(dst_off_ptr + (m * K + j) * 3 + 2, mask=j < K, other=-1)
        dv = dd >= 0
        shift = (tl.maximum(dd, 0) - od)[:, None]  # from the source's offsets to the slot's
        tl.store(base_ptr + qidx + shift[:, :, None], qs, mask=m3 & dv[:, None, None])
        tl.store((base_ptr + boff + shift).to(tl.pointer_type(tl.float16)), dsc, mask=m2 & dv[:, None])
    el = (m * K + j)[:, None, None] * F + b[None, :, None] * QK + k[None, None, :]  # [KR, B, 16] of a
    am = ((j < K)[:, None] & bmask[None, :])[:, :, None]
    alo = tl.load(a_ptr + el, mask=am, other=0.0).to(tl.float32)
    ahi = tl.load(a_ptr + el + 16, mask=am, other=0.0).to(tl.float32)
    d = tl.reshape(_q4_dot(qs, dsc.to(tl.float32), alo, ahi, 2), (BLOCK_K, BLOCK_R))  # [K, rows]
    jj = tl.arange(0, BLOCK_K)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    _combine(d.to(tl.bfloat16).to(tl.float32), sel_w_ptr, x_ptr, out_ptr, m, rr, rr < H, jj, jj < K, H, K, BLOCK_R)
