"""Probe: can the expert kernels read missed experts straight from pinned host memory (zero-copy over PCIe) as fast
as the copy engine moves them? Times the decode kernels' gate/up and down products of the 4B shape with the K
experts' weights in GPU memory, in pinned host memory (addressed from the GPU arena's base by a signed offset), and a
plain DMA copy of the same bytes.

    PYTHONPATH=. python3 benchmarks/zero_copy_probe.py
"""

from __future__ import annotations

import json
import mmap
import sys

import torch

from smallthinker_lab.kernels import _p2
from smallthinker_lab.kernels import triton_decode as tk


def bench(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    H, F, K = 1536, 768, 4
    n = F * H
    rec = 3 * n  # elements per expert record (gate, up, down)
    E = 16  # records on each side (rotated so nothing stays in L2)
    dev = torch.device("cuda")
    arena = torch.randn(E * rec, device=dev).to(torch.bfloat16)
    out = {}
    for kind in ("cudaHostAlloc", "cudaHostRegister"):
        if kind == "cudaHostAlloc":
            host = torch.randn(E * rec).to(torch.bfloat16).pin_memory()
        else:
            m = mmap.mmap(-1, E * rec * 2)
            host = torch.frombuffer(m, dtype=torch.bfloat16)
            host.copy_(torch.randn(E * rec).to(torch.bfloat16))
            rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * 2, 0)
            assert int(rc) == 0, rc
        delta = (host.data_ptr() - arena.data_ptr())
        assert delta % 32 == 0
        delta //= 2
        x = torch.randn(H, device=dev).to(torch.bfloat16)
        ln = torch.ones(H, device=dev, dtype=torch.bfloat16)
        a = torch.empty(K * F, device=dev, dtype=torch.bfloat16)
        xo = torch.empty(H, device=dev, dtype=torch.bfloat16)
        w = torch.full((K,), 0.25, device=dev, dtype=torch.bfloat16)
        it = [0]

        def sel(n_host):
            j0 = (it[0] * K) % E
            it[0] += 1
            offs = []
            for j in range(K):
                r = (j0 + j) % E
                b = r * rec + (delta if j < n_host else 0)
                offs += [b, b + n, b + 2 * n]
            return torch.tensor(offs, device=dev)

        for gr, gw in ((4, 2), (8, 4), (16, 4)):
            for n_host in (0, 1, 2, 4):
                sels = [sel(n_host) for _ in range(8)]
                i = [0]

                def run():
                    so = sels[i[0] % 8]
                    i[0] += 1
                    tk._gate_up_kernel[(K, -(-F // gr))](x, ln, arena, so, a, 1e-6, H=H, F=F, BLOCK_R=gr,
                                                         BLOCK_H=_p2(H), PDL=False, num_warps=gw)
                    tk._down_kernel[(-(-H // 2),)](a, arena, so, w, x, xo, H=H, F=F, K=K, BLOCK_K=_p2(K), BLOCK_R=2,
                                                   BLOCK_F=_p2(F), PDL=False, num_warps=2)
                ms = bench(run)
                # check: the same results as from device copies of the records
                out[f"{kind} gate_up{gr}x{gw} host={n_host}"] = {"ms": ms, "host_GBps": n_host * rec * 2 / ms / 1e6}
                print(kind, gr, gw, n_host, f"{ms:.3f} ms", f"{n_host * rec * 2 / ms / 1e6:.1f} GB/s from host",
                      flush=True)
        # correctness: host-read results equal device-read results for the same values
        arena2 = arena.clone()
        arena2[:rec].copy_(host[:rec])
        so_h = torch.tensor([delta, delta + n, delta + 2 * n] * 1 + [rec * j + m * n for j in (1, 2, 3) for m in range(3)],
                            device=dev)
        so_d = torch.tensor([0, n, 2 * n] + [rec * j + m * n for j in (1, 2, 3) for m in range(3)], device=dev)
        res = []
        for base, so in ((arena, so_h), (arena2, so_d)):
            tk._gate_up_kernel[(K, F // 4)](x, ln, base, so, a, 1e-6, H=H, F=F, BLOCK_R=4, BLOCK_H=_p2(H), PDL=False,
                                            num_warps=2)
            tk._down_kernel[(H // 2,)](a, base, so, w, x, xo, H=H, F=F, K=K, BLOCK_K=_p2(K), BLOCK_R=2, BLOCK_F=_p2(F),
                                       PDL=False, num_warps=2)
            res.append(xo.clone())
        out[f"{kind} equal"] = bool(torch.equal(res[0], res[1]))
        print(kind, "host-read == device-read:", out[f"{kind} equal"], flush=True)
        # DMA copy of the same bytes (one record at a time, K records)
        dst = torch.empty(K * rec, device=dev, dtype=torch.bfloat16)
        for nrec in (1, 2, 4):
            def dma():
                for j in range(nrec):
                    dst[j * rec:(j + 1) * rec].copy_(host[j * rec:(j + 1) * rec], non_blocking=True)
            ms = bench(dma)
            out[f"{kind} dma {nrec}"] = {"ms": ms, "GBps": nrec * rec * 2 / ms / 1e6}
            print(kind, "dma", nrec, f"{ms:.3f} ms {nrec * rec * 2 / ms / 1e6:.1f} GB/s", flush=True)
    json.dump(out, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
