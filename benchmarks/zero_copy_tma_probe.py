"""Probe: zero-copy reads of pinned host memory from a kernel, plain loads against TMA (bulk tensor) loads, against
the copy engine, for the byte counts of 1, 2 and 4 missed experts of the 4B shape.

    PYTHONPATH=. python3 benchmarks/zero_copy_tma_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _plain(base_ptr, off, out_ptr, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    p = tl.program_id(0)
    rows = p * BLOCK_R + tl.arange(0, BLOCK_R)
    hh = tl.arange(0, BLOCK_H)
    w = tl.load(base_ptr + off + rows[:, None] * H + hh[None, :], mask=(hh < H)[None, :], other=0.0)
    tl.store(out_ptr + rows, tl.sum(w.to(tl.float32), axis=1))


@triton.jit
def _tma(base_ptr, off, out_ptr, n_rows, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    desc = tl.make_tensor_descriptor(base_ptr + off, shape=[n_rows, H], strides=[H, 1], block_shape=[BLOCK_R, BLOCK_C])
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c in tl.static_range(0, H, BLOCK_C):
        acc += tl.sum(desc.load([p * BLOCK_R, c]).to(tl.float32), axis=1)
    rows = p * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(out_ptr + rows, acc)


def bench(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    H, F = 1536, 768
    rec_rows = 3 * F  # an expert's gate, up, down as rows of H
    n_rec = 16
    host = torch.randn(n_rec * rec_rows, H).to(torch.bfloat16).pin_memory()
    dev = torch.empty(8, dtype=torch.bfloat16, device="cuda")
    off = (host.data_ptr() - dev.data_ptr()) // 2
    out = torch.empty(4 * rec_rows, device="cuda")
    dst = torch.empty(4 * rec_rows, H, dtype=torch.bfloat16, device="cuda")
    ref = host[:4 * rec_rows].float().sum(1).cuda()
    for nrec in (1, 2, 4):
        rows = nrec * rec_rows
        nbytes = rows * H * 2
        res = {}
        for br in (4, 8, 16):
            ms = bench(lambda: _plain[(rows // br,)](dev, off, out, H=H, BLOCK_R=br, BLOCK_H=2048, num_warps=4))
            res[f"plain r{br}"] = nbytes / ms / 1e6
        ok_plain = torch.allclose(out[:rows], ref[:rows], rtol=1e-3, atol=1e-2)
        for br, bc in ((8, 256), (16, 256), (32, 128), (64, 64)):
            try:
                ms = bench(lambda: _tma[(rows // br,)](dev, off, out, rows, H=H, BLOCK_R=br, BLOCK_C=bc, num_warps=4))
                res[f"tma r{br} c{bc}"] = nbytes / ms / 1e6
                res[f"tma r{br} c{bc} ok"] = bool(torch.allclose(out[:rows], ref[:rows], rtol=1e-3, atol=1e-2))
            except Exception as e:  # noqa: BLE001
                res[f"tma r{br} c{bc}"] = f"{type(e).__name__}: {str(e)[:200]}"
        ms = bench(lambda: dst[:rows].copy_(host[:rows], non_blocking=True))
        res["dma"] = nbytes / ms / 1e6
        print(nrec, "experts", f"plain ok {ok_plain}", {k: (round(v, 1) if isinstance(v, float) else v)
                                                         for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
