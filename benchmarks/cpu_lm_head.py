"""The LM head alone on the CPU at the 4B's shape (151936 x 1536): ms per decode token of each ``lm_head_format``.

Variants (engine/lm_head_quant.py): ``bf16`` (the model's head, ``F.linear``), ``q4_0_cpu`` (torch's int4 kernel,
group 32), ``int8_cpu`` (torch's int8 kernel) and ``screened`` (the int8 screen, then the surviving rows exactly in
bf16; the rows that survive are reported). Random N(0, 0.02) weights, N(0, 1) hidden states (a new one per call),
bf16. Every round times every variant ``--calls`` times, the order rotated per round; the figure is the median over
all calls with min and max, beside the memory-read bandwidth (a sum over 256 MiB fp32) and each variant's bytes.
Also the first open (quantize + write the cache) and a cached open. Pin threads: ``taskset -c 1 python -m
benchmarks.cpu_lm_head --threads 1``. Writes ``--out``/cpu_lm_head.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smallthinker_lab.engine import lm_head_quant as lq

VARIANTS = ("bf16", "q4_0_cpu", "int8_cpu", "screened")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(torch.bfloat16)
    opens, heads = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("q4_0_cpu", "int8_cpu"):
            first = lq.load_or_quantize(w, fmt, d)
            again = lq.load_or_quantize(w, fmt, d)
            opens[fmt] = {"first_seconds": first.open_seconds, "first": first.source,
                          "cached_seconds": again.open_seconds, "cached": again.source, "bytes": again.nbytes}
            heads[fmt] = again
    screened = lq.ScreenedHead(w, heads["int8_cpu"])
    rows: list[int] = []

    def call(name: str, h: torch.Tensor) -> None:
        if name == "bf16":
            F.linear(h, w)
        elif name == "screened":
            rows.append(screened(h)[1])
        else:
            heads[name](h)

    times = {v: [] for v in VARIANTS}
    bw = []
    x = torch.ones(256 * 2**20 // 4)
    for v in VARIANTS:  # warm-up
        call(v, torch.randn(1, args.hidden, generator=gen).to(torch.bfloat16))
    for r in range(args.rounds):
        t0 = time.perf_counter()
        x.sum()
        bw.append(x.numel() * 4 / (time.perf_counter() - t0))
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            for _ in range(args.calls):
                h = torch.randn(1, args.hidden, generator=gen).to(torch.bfloat16)
                t0 = time.perf_counter()
                call(v, h)
                times[v].append(time.perf_counter() - t0)
    nbytes = {"bf16": w.numel() * 2, "q4_0_cpu": heads["q4_0_cpu"].nbytes, "int8_cpu": heads["int8_cpu"].nbytes,
              "screened": heads["int8_cpu"].nbytes}
    out = {"shape": [args.vocab, args.hidden], "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
           "read_bandwidth_GBps_median": statistics.median(bw) / 1e9, "open": opens, "variants": {}}
    bf = statistics.median(times["bf16"])
    for v, ts in times.items():
        med = statistics.median(ts)
        out["variants"][v] = {"ms_median": 1e3 * med, "ms_min": 1e3 * min(ts), "ms_max": 1e3 * max(ts),
                              "MiB": nbytes[v] / 2**20, "GBps_at_median": nbytes[v] / med / 1e9,
                              "speedup_vs_bf16": bf / med}
    out["variants"]["screened"]["rows_exact_median"] = statistics.median(rows)
    out["variants"]["screened"]["rows_exact_max"] = max(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cpu_lm_head.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
