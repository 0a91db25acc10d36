"""Per-expert time of the CPU expert products at the 4B expert shape, and the memory-read bandwidth beside them.

One expert = gate and up (F x H = 768 x 1536) and down (H x F), ReGLU. Variants:
- ``bf16_linear``: three ``F.linear`` on bf16 weights (down in the model's [H, F]);
- ``q4_0_dequant_bf16``: today's engine path for a q4_0 bundle when it computes densely: decode the three ggml Q4_0
  matrices to bf16 (``quant.dequantize_q4_0``; down stored transposed [F, H]), then ``sparse.reglu_dense``;
- ``int4_kernel``: ``cpu_kernels.reglu`` on q4_0_cpu operands (``torch._weight_int4pack_mm_for_cpu``);
- ``int8_kernel``: ``cpu_kernels.reglu`` on int8_cpu operands (``torch._weight_int8pack_mm``).
Each variant reads its experts from its own pool (``--pool-mib`` each, several times the last-level cache across
all pools), one expert after the next, so the weights come from DRAM as in a decode that streams experts. The
memory-read bandwidth is a sum over a large fp32 tensor (read only) at the same thread count.

The machine is shared: every round runs every (threads, tokens, variant) once, round-robin, the variant order
rotated per round; each figure is the median over rounds with min, max and the interquartile range.
Writes benchmarks/results/cpu_quant_kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.ceilings import machine_info
from smallthinker_lab.engine import sparse
from smallthinker_lab.engine.cpu_kernels import expert_operands, reglu
from smallthinker_lab.engine.quant import dequantize_q4_0, get_format, int4pack_layout

ROOT = Path(__file__).resolve().parents[1]
H, FF = 1536, 768  # the 4B shape: hidden, expert ffn
VARIANTS = ("bf16_linear", "q4_0_dequant_bf16", "int4_kernel", "int8_kernel")
STORED = {"bf16_linear": "bf16", "q4_0_dequant_bf16": "q4_0", "int4_kernel": "q4_0_cpu", "int8_kernel": "int8_cpu"}


def expert_nbytes(variant: str) -> int:
    """Bytes of weights (and scales) one expert's products read."""
    f = get_format(STORED[variant])
    return 2 * f.nbytes((FF, H)) + f.nbytes((H, FF) if variant != "q4_0_dequant_bf16" else (FF, H))


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


class Pool:
    """``n`` experts of one variant in one flat buffer each matrix, built from a few distinct quantised experts
    (timing does not depend on the values; the copies make the bytes distinct memory)."""

    def __init__(self, variant: str, mib: int, seed: int = 0) -> None:
        self.variant, fmt = variant, STORED[variant]
        codec = get_format(fmt)
        gen = torch.Generator().manual_seed(seed)
        distinct = []
        for _ in range(4):
            wg, wu, wd = (torch.randn(s, generator=gen) * 0.02 for s in ((FF, H), (FF, H), (H, FF)))
            if variant == "q4_0_dequant_bf16":
                wd = wd.t()  # today's bundle: down stored [F, H]
            distinct.append([codec.encode(w.contiguous()) for w in (wg, wu, wd)])
        self.n = max(4, mib * 2**20 // expert_nbytes(variant))
        self.mats = [torch.stack([distinct[i % 4][m] for i in range(self.n)]) for m in range(3)]  # (n, bytes)
        shapes = ((FF, H), (FF, H), (FF, H) if variant == "q4_0_dequant_bf16" else (H, FF))
        if variant == "bf16_linear":
            self.experts = [tuple(self.mats[m][i].view(torch.bfloat16).view(shapes[m]) for m in range(3))
                            for i in range(self.n)]
        elif variant == "q4_0_dequant_bf16":
            self.experts = [tuple(self.mats[m][i] for m in range(3)) for i in range(self.n)]
        else:  # operands built once per expert, as an engine builds them once per cache slot
            self.experts = [expert_operands({"gate": self.mats[0][i], "up": self.mats[1][i],
                                             "down": self.mats[2][i]}, fmt, (FF, H)) for i in range(self.n)]
        self.next = 0

    def run(self, x: torch.Tensor, k: int) -> None:
        for _ in range(k):
            e = self.experts[self.next]
            self.next = (self.next + 1) % self.n
            if self.variant == "bf16_linear":
                wg, wu, wd = e
                F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), wd)
            elif self.variant == "q4_0_dequant_bf16":
                wg, wu, wd_t = (dequantize_q4_0(b, (FF, H), torch.bfloat16) for b in e)
                sparse.reglu_dense(x, wg, wu, wd_t)
            else:
                reglu(x, e)


def read_bandwidth(buf: torch.Tensor) -> float:
    """Bytes per second of one full read (sum) of ``buf``."""
    t0 = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - t0)


def measure(rounds: int, pool_mib: int, per_batch: int, threads: list[int], tokens: list[int],
            read_mib: int) -> dict:
    from tqdm.auto import tqdm

    load_before = os.getloadavg()
    pools = {v: Pool(v, pool_mib, seed=i) for i, v in enumerate(tqdm(VARIANTS, desc="building pools", leave=False))}
    big = torch.ones(read_mib * 2**20 // 4, dtype=torch.float32)
    xs = {n: torch.randn(n, H, generator=torch.Generator().manual_seed(n)).bfloat16() for n in tokens}
    times: dict[tuple, list[float]] = {}
    bw: dict[int, list[float]] = {t: [] for t in threads}
    for r in tqdm(range(rounds + 1), desc="rounds (round 0 warms up)"):
        for t in threads:
            torch.set_num_threads(t)
            bw_r = read_bandwidth(big)
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for n in tokens:
                for v in order:
                    t0 = time.perf_counter()
                    pools[v].run(xs[n], per_batch)
                    dt_s = (time.perf_counter() - t0) / per_batch
                    if r:
                        times.setdefault((v, t, n), []).append(dt_s)
            if r:
                bw[t].append(bw_r)
    rows = []
    for (v, t, n), ts in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][2], VARIANTS.index(kv[0][0]))):
        med = statistics.median(ts)
        q1, q3 = _quartiles(ts)
        nbytes = expert_nbytes(v)
        bw_med = statistics.median(bw[t])
        rows.append({"variant": v, "stored_format": STORED[v], "threads": t, "tokens": n,
                     "ms_median": med * 1e3, "ms_min": min(ts) * 1e3, "ms_max": max(ts) * 1e3,
                     "ms_q1": q1 * 1e3, "ms_q3": q3 * 1e3, "rounds": len(ts),
                     "bytes_per_expert": nbytes, "gbps_median": nbytes / med / 1e9,
                     "share_of_read_bandwidth": nbytes / med / bw_med})
    read = {t: {"median_gbps": statistics.median(b) / 1e9, "min_gbps": min(b) / 1e9, "max_gbps": max(b) / 1e9,
                "n": len(b)} for t, b in bw.items()}
    return {"rows": rows, "read_bandwidth": read, "load_average": {"before": load_before, "after": os.getloadavg(),
                                                                    "cores": os.cpu_count()},
            "pool_experts": {v: p.n for v, p in pools.items()},
            "settings": {"rounds": rounds, "pool_mib": pool_mib, "experts_per_batch": per_batch,
                         "read_mib": read_mib, "hidden": H, "expert_ffn": FF,
                         "int4pack_layout": int4pack_layout(),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability()}}


def render(res: dict) -> str:
    s = res["settings"]
    rb = res["read_bandwidth"]
    lines = [f"CPU expert products at the 4B expert shape (gate+up {s['expert_ffn']}x{s['hidden']}, down "
             f"{s['hidden']}x{s['expert_ffn']}), {res['machine']['cpu']}, torch {res['machine']['torch']} "
             f"({s['cpu_capability']}), {res['created']}.",
             f"Per-expert ms: median over {s['rounds']} interleaved rounds [min-max] (IQR); weights streamed from "
             f"pools of {s['pool_mib']} MiB per variant. Memory read bandwidth (sum over {s['read_mib']} MiB fp32, "
             f"same rounds): " + ", ".join(f"{t} thread(s) {v['median_gbps']:.1f} GB/s [{v['min_gbps']:.1f}-"
                                            f"{v['max_gbps']:.1f}]" for t, v in rb.items()) + ".",
             f"Load average (1 min) {res['load_average']['before'][0]:.1f} before, "
             f"{res['load_average']['after'][0]:.1f} after, on {res['load_average']['cores']} cores: with other "
             f"processes on every core, 2-thread rows measure the scheduler (a descheduled thread stalls the "
             f"product's barrier), not the kernels.", "",
             "| variant | threads | tokens | ms/expert | IQR | bytes/expert | GB/s | share of read BW | "
             "vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["threads"], r["tokens"]): r["ms_median"] for r in res["rows"] if r["variant"] == "bf16_linear"}
    for r in res["rows"]:
        speed = base[(r["threads"], r["tokens"])] / r["ms_median"]
        lines.append(f"| {r['variant']} | {r['threads']} | {r['tokens']} | {r['ms_median']:.3f} "
                     f"[{r['ms_min']:.3f}-{r['ms_max']:.3f}] | {r['ms_q1']:.3f}-{r['ms_q3']:.3f} | "
                     f"{r['bytes_per_expert'] / 1e6:.2f} MB | {r['gbps_median']:.1f} | "
                     f"{r['share_of_read_bandwidth']:.2f} | {speed:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pool-mib", type=int, default=512, help="weights per variant, streamed (default 512)")
    p.add_argument("--per-batch", type=int, default=8, help="experts per timed batch")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--read-mib", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="cpu_quant_kernels")
    args = p.parse_args(argv)
    res = measure(args.rounds, args.pool_mib, args.per_batch, [int(t) for t in args.threads.split(",")],
                  [int(n) for n in args.tokens.split(",")], args.read_mib)
    res.update(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), machine=machine_info())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
