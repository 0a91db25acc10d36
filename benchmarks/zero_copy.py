"""Reading missed experts straight from pinned host memory in a kernel (zero-copy over the bus) against the copy
engine, for the byte counts of 1, 2 and 4 missed experts of the 4B shape (one layer's K = 4 experts): the decode
kernels' gate/up and down products with m of the K experts' records in host memory (the engine's device-LRU path),
a plain streaming-read kernel, the same read through TMA descriptors (bulk tensor loads), and a DMA copy.

    PYTHONPATH=. python3 benchmarks/zero_copy.py [--out benchmarks/results]

Writes zero_copy.json and zero_copy.md. Each figure: median of 30 timed runs (CUDA events), GB/s of the host bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ceilings import machine_info  # noqa: E402
from benchmarks.run import versions  # noqa: E402
from smallthinker_lab.kernels import _p2  # noqa: E402
from smallthinker_lab.kernels import triton_decode as tk  # noqa: E402


@triton.jit
def _plain(base_ptr, off, out_ptr, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
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
    tl.store(out_ptr + p * BLOCK_R + tl.arange(0, BLOCK_R), acc)


def median_ms(fn, reps: int = 30) -> float:
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
    return statistics.median(ts)


def measure() -> dict:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    H, F, K = 1536, 768, 4
    n = F * H
    rec = 3 * n  # elements of an expert record (gate, up, down)
    E = 16  # records on each side, rotated so that no run reads what the last one left in L2
    dev = torch.device("cuda")
    arena = torch.randn(E * rec, device=dev).to(torch.bfloat16)
    host = torch.randn(E * rec).to(torch.bfloat16).pin_memory()
    delta = (host.data_ptr() - arena.data_ptr()) // 2  # host records addressed from the arena's base
    x = torch.randn(H, device=dev).to(torch.bfloat16)
    ln = torch.ones(H, device=dev, dtype=torch.bfloat16)
    act = torch.empty(K * F, device=dev, dtype=torch.bfloat16)
    xo = torch.empty(H, device=dev, dtype=torch.bfloat16)
    w = torch.full((K,), 0.25, device=dev, dtype=torch.bfloat16)
    out = torch.empty(K * 3 * F, device="cuda")
    dst = torch.empty(K * rec, dtype=torch.bfloat16, device=dev)
    gr, gw = 4, 2  # the decode kernels' default tiles (smallthinker_lab.kernels.DEFAULT_BLOCKS)
    res: dict = {"shape": {"hidden": H, "ffn": F, "top_k": K, "record_bytes": rec * 2}, "rows": []}

    def kernels(sel_off):
        tk._gate_up_kernel[(K, -(-F // gr))](x, ln, arena, sel_off, act, 1e-6, H=H, F=F, BLOCK_R=gr,
                                             BLOCK_H=_p2(H), PDL=False, num_warps=gw)
        tk._down_kernel[(-(-H // 2),)](act, arena, sel_off, w, x, xo, H=H, F=F, K=K, BLOCK_K=_p2(K), BLOCK_R=2,
                                       BLOCK_F=_p2(F), PDL=False, num_warps=2)

    def selections(m: int) -> list[torch.Tensor]:
        out_ = []
        for r0 in range(0, E, K):
            offs = []
            for j in range(K):
                b = (r0 + j) * rec + (delta if j < m else 0)
                offs += [b, b + n, b + 2 * n]
            out_.append(torch.tensor(offs, device=dev))
        return out_

    base_sel = selections(0)
    t_hbm = median_ms(lambda: [kernels(s) for s in base_sel]) / len(base_sel)
    for m in (1, 2, 4):
        nbytes = m * rec * 2
        row = {"missed_experts": m, "bytes": nbytes}
        sels = selections(m)
        t = median_ms(lambda sels=sels: [kernels(s) for s in sels]) / len(sels)
        row["decode_kernels_ms"] = t
        row["decode_kernels_all_in_gpu_memory_ms"] = t_hbm
        row["decode_kernels_gbps"] = nbytes / t / 1e6  # the host bytes over the kernels' whole time
        rows_ = m * 3 * F
        for br in (4, 8, 16):
            t = median_ms(lambda br=br, rows_=rows_: _plain[(rows_ // br,)](arena, delta, out, H=H, BLOCK_R=br,
                                                                          BLOCK_H=2048, num_warps=4))
            row[f"plain_read_r{br}_gbps"] = nbytes / t / 1e6
        ref = host[:m * rec].view(-1, H).float().sum(1).cuda()
        row["plain_read_correct"] = bool(torch.allclose(out[:rows_], ref, rtol=1e-3, atol=1e-2))
        for br, bc in ((16, 256), (64, 64)):
            try:
                t = median_ms(lambda br=br, bc=bc, rows_=rows_: _tma[(rows_ // br,)](
                    arena, delta, out, rows_, H=H, BLOCK_R=br, BLOCK_C=bc, num_warps=4))
                row[f"tma_read_r{br}_c{bc}_gbps"] = nbytes / t / 1e6
                row[f"tma_read_r{br}_c{bc}_correct"] = bool(torch.allclose(out[:rows_], ref, rtol=1e-3, atol=1e-2))
            except Exception as exc:  # noqa: BLE001  TMA from host memory may be refused
                row[f"tma_read_r{br}_c{bc}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

        def dma(m=m):
            for j in range(m):
                dst[j * rec:(j + 1) * rec].copy_(host[j * rec:(j + 1) * rec], non_blocking=True)

        row["dma_gbps"] = nbytes / median_ms(dma) / 1e6
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    # the same results from host records as from GPU copies of them
    arena[:rec].copy_(host[:rec])
    rest = [rec * j + k * n for j in (1, 2, 3) for k in range(3)]
    so_host = torch.tensor([delta, delta + n, delta + 2 * n] + rest, device=dev)
    so_gpu = torch.tensor([0, n, 2 * n] + rest, device=dev)
    outs = []
    for so in (so_host, so_gpu):
        kernels(so)
        outs.append(xo.clone())
    res["host_read_equals_gpu_read"] = bool(torch.equal(outs[0], outs[1]))
    return res


def render(res: dict) -> str:
    lines = [f"Zero-copy reads of pinned host memory vs the copy engine ({res['machine'].get('gpu', 'GPU')}, "
             f"{res['created']}); GB/s of the host bytes, medians of 30 runs.", "",
             "| missed experts of 4 | MiB | decode kernels (gate/up + down, the other experts in GPU memory) | "
             "plain read kernel (best tile) | TMA read kernel (best) | DMA copy |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        plain = max(v for k, v in r.items() if k.startswith("plain_read_r") and k.endswith("gbps"))
        tma = [v for k, v in r.items() if k.startswith("tma_read") and k.endswith("gbps")]
        tma_s = f"{max(tma):.1f}" if tma else "refused"
        kern = r["bytes"] / r["decode_kernels_ms"] / 1e6
        lines.append(f"| {r['missed_experts']} | {r['bytes'] / 2**20:.1f} | {kern:.1f} | "
                     f"{plain:.1f} | {tma_s} | {r['dma_gbps']:.1f} |")
    lines += ["", f"Decode kernels' output from host records equals that from GPU copies of them: "
              f"{res['host_read_equals_gpu_read']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import datetime as dt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    res = measure()
    res.update(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), machine=machine_info(),
               versions=versions())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_copy.json").write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    (out / "zero_copy.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
