"""Dense vs sparse ReGLU for one expert on CPU: where does skipping inactive neurons start to pay?

For each shape (4B expert H=1536 F=768, the tiny test config H=256 F=64), dtype (fp32, bf16), token count
(1, 4) and union sparsity s in 0..0.98, the gate weights are set so that exactly round((1 - s) F) neurons are
active for some token; ``reglu_dense`` and ``reglu_sparse`` (smallthinker_lab/engine/sparse.py) are timed
alternately (warmup, then repetitions, time.perf_counter per call), in several passes over all points so that a
burst of load from other users of the machine spreads over all of them; min/median/max are recorded.

Two cache states: ``warm`` calls the same weights again and again (they stay in the last-level cache: the 4B
fp32 expert is 14 MB); ``cold`` reads a buffer of twice the last-level cache before each timed call, so the
weights come from DRAM, as in a decode that streams ~0.9 GB of experts per token.
The crossover is the sparsity above which the sparse median stays below the dense median (linear interpolation of
sparse/dense between grid points). Baselines at s=0: ``dense_matmul`` (the product a @ wd_t that an
nn.Linear-minded author would write) and ``dense_linear`` (down kept untransposed (H, F), F.linear).

    python -m benchmarks.sparse_crossover [--threads 2] [--cache warm cold] [--reps 200] [--cold-reps 60]
                                          [--passes 4] [--out benchmarks/results/sparse_crossover.json]
    python -m benchmarks.sparse_crossover --from-json FILE   # summary and tables again, from recorded timings
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import ceilings
from smallthinker_lab.engine.sparse import reglu_dense, reglu_sparse

SHAPES = {"4b": (1536, 768), "tiny": (256, 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENS = (1, 4)
SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def llc_bytes() -> int:
    """Size of the last-level cache from sysfs (64 MiB if unknown)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        best = max(best, int(size.rstrip("KMG")) * mult)
    return best or 64 * 2**20


def machine_info() -> dict:
    info = ceilings.machine_info()
    info.update({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "llc_bytes": llc_bytes(),
                 "loadavg_start": os.getloadavg(),
                 "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    return info


def expert(hidden: int, ffn: int, n: int, sparsity: float, dtype: torch.dtype, seed: int = 0):
    """x (n, H) and weights with exactly round((1 - sparsity) * F) neurons active for some token.

    Column 0 of x is 1 and column 0 of the gate is +-100, which dominates the rest of the gate product
    (|rest| ~ 1), so the sign of each gate row's column 0 decides whether the neuron is active in the union.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen)
    x[:, 0] = 1.0
    wg, wu, wd_t = (torch.randn(ffn, hidden, generator=gen) * hidden**-0.5 for _ in range(3))
    n_active = round((1.0 - sparsity) * ffn)
    sign = torch.full((ffn,), -1.0)
    sign[torch.randperm(ffn, generator=gen)[:n_active]] = 1.0
    wg[:, 0] = 100.0 * sign
    return x.to(dtype), wg.to(dtype), wu.to(dtype), wd_t.to(dtype), n_active


def _stats(ts: list[float]) -> dict:
    us = [t * 1e6 for t in ts]
    return {"median_us": statistics.median(us), "min_us": min(us), "max_us": max(us), "n": len(us)}


def candidates(x, wg, wu, wd_t, baselines: bool) -> dict:
    """The callables timed at one point; the baselines do not depend on sparsity (timed at s = 0 only)."""
    fns = {"dense": lambda: reglu_dense(x, wg, wu, wd_t), "sparse": lambda: reglu_sparse(x, wg, wu, wd_t)}
    if baselines:
        wd = wd_t.t().contiguous()  # (H, F), the nn.Linear layout
        fns["dense_matmul"] = lambda: (F.linear(x, wu) * F.relu(F.linear(x, wg))) @ wd_t
        fns["dense_linear"] = lambda: F.linear(F.linear(x, wu) * F.relu(F.linear(x, wg)), wd)
    return fns


def time_alternating(fns: dict, reps: int, warmup: int, times: dict, before=None) -> None:
    """Append ``reps`` timings of each callable to ``times``, interleaved so that machine noise hits them alike;
    ``before()`` (untimed) runs before each timed call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(reps):
        for k, f in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            f()
            times.setdefault(k, []).append(time.perf_counter() - t0)


def crossover(points: list[dict]) -> dict:
    """Smallest grid sparsity from which sparse stays faster (median ratio < 1), and the linear interpolation of
    the ratio below it. A single slower point between two faster neighbours is taken as noise (listed in
    ``outliers``): the shared machine throws such spikes."""
    pts = sorted(points, key=lambda p: p["sparsity"])
    ratio = [p["sparse"]["median_us"] / p["dense"]["median_us"] for p in pts]
    below = [r < 1.0 for r in ratio]
    outliers = [pts[i]["sparsity"] for i in range(1, len(pts) - 1) if not below[i] and below[i - 1] and below[i + 1]]
    below = [b or p["sparsity"] in outliers for b, p in zip(below, pts)]
    first = len(pts)
    while first > 0 and below[first - 1]:
        first -= 1
    out = {"outliers": outliers}
    if first == len(pts):
        return out | {"grid": None, "interpolated": None, "note": "sparse never faster on the grid"}
    if first == 0:
        return out | {"grid": pts[0]["sparsity"], "interpolated": pts[0]["sparsity"], "note": "sparse always faster"}
    s0, s1, r0, r1 = pts[first - 1]["sparsity"], pts[first]["sparsity"], ratio[first - 1], ratio[first]
    interp = s0 + (r0 - 1.0) / (r0 - r1) * (s1 - s0)
    return out | {"grid": s1, "interpolated": round(interp, 3), "note": ""}


def run(caches: list[str], reps: dict[str, int], warmup: int, passes: int) -> list[dict]:
    """All points; each pass times every point reps / passes times, so a burst of load spreads over all points."""
    keys = [(c, shape, dtype, n, s) for c in caches for shape in SHAPES for dtype in DTYPES for n in TOKENS
            for s in SPARSITIES]
    flush_buf = torch.ones(2 * llc_bytes() // 4)  # fp32, read (not written) to evict the weights

    def flush() -> None:
        flush_buf.sum()

    points = {}
    for p in range(passes):
        for key in keys:
            cache, shape, dtype_name, n, s = key
            hidden, ffn = SHAPES[shape]
            x, wg, wu, wd_t, n_active = expert(hidden, ffn, n, s, DTYPES[dtype_name])
            if p == 0:
                y_d, k_d = reglu_dense(x, wg, wu, wd_t)
                y_s, k_s = reglu_sparse(x, wg, wu, wd_t)
                assert k_d == k_s == n_active, (k_d, k_s, n_active)
                points[key] = {"cache": cache, "shape": shape, "hidden": hidden, "ffn": ffn, "dtype": dtype_name,
                               "n": n, "sparsity": s, "n_active": n_active,
                               "max_abs_diff": float((y_d.float() - y_s.float()).abs().max()), "times": {}}
            fns = candidates(x, wg, wu, wd_t, baselines=s == 0.0)
            time_alternating(fns, -(-reps[cache] // passes), warmup, points[key]["times"],
                             before=flush if cache == "cold" else None)
    out = []
    for point in points.values():
        times = point.pop("times")
        out.append(point | {k: _stats(v) for k, v in times.items()})
    return out


def _config(p: dict) -> tuple:
    return p["cache"], p["shape"], p["dtype"], p["n"]


def summarise(points: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys(_config(p) for p in points):
        pts = [p for p in points if _config(p) == key]
        base = next(p for p in pts if p["sparsity"] == 0.0)
        best = min(pts, key=lambda p: p["sparse"]["median_us"] / p["dense"]["median_us"])
        out.append(dict(zip(("cache", "shape", "dtype", "n"), key)) | {
            "crossover": crossover(pts),
            "dense_median_us": base["dense"]["median_us"],
            "dense_matmul_median_us": base["dense_matmul"]["median_us"],
            "dense_linear_median_us": base["dense_linear"]["median_us"],
            "speedup_at_0.98": round(pts[-1]["dense"]["median_us"] / pts[-1]["sparse"]["median_us"], 2),
            "best_speedup": round(best["dense"]["median_us"] / best["sparse"]["median_us"], 2)})
    return out


def markdown(points: list[dict], summary: list[dict]) -> str:
    """The points and the crossovers, two tables (benchmarks/report_table.table)."""
    from .report_table import table

    head = ["cache", "shape", "dtype", "n"]
    cols = [*head, "sparsity", "dense us (median)", "sparse us (median)", "sparse/dense"]
    rows = []
    for p in points:
        d, s = p["dense"]["median_us"], p["sparse"]["median_us"]
        rows.append(dict(zip(cols, [*(str(p[k]) for k in head), f"{p['sparsity']:.2f}", f"{d:.1f}", f"{s:.1f}",
                                    f"{s / d:.2f}"])))
    cols2 = [*head, "crossover (grid)", "crossover (interp.)", "dense us", "a@wd_t us", "F.linear(down) us",
             "speedup at 0.98"]
    rows2 = [dict(zip(cols2, [*(str(r[k]) for k in head), str(r["crossover"]["grid"]),
                              str(r["crossover"]["interpolated"]), f"{r['dense_median_us']:.1f}",
                              f"{r['dense_matmul_median_us']:.1f}", f"{r['dense_linear_median_us']:.1f}",
                              str(r["speedup_at_0.98"])])) for r in summary]
    return table(rows, cols) + "\n" + table(rows2, cols2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    ap.add_argument("--reps", type=int, default=200, help="timed calls per point, warm")
    ap.add_argument("--cold-reps", type=int, default=60, help="timed calls per point, cold (each after a flush)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per point and pass")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/sparse_crossover.json")
    ap.add_argument("--from-json", help="recompute the summary and tables of an earlier result file, no timing")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["summary"] = summarise(result["points"])
        Path(args.from_json).write_text(json.dumps(result, indent=1))
        print(markdown(result["points"], result["summary"]))
        return
    torch.set_num_threads(args.threads)
    info = machine_info()
    t0 = time.perf_counter()
    points = run(args.cache, {"warm": args.reps, "cold": args.cold_reps}, args.warmup, args.passes)
    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = round(time.perf_counter() - t0, 1)
    summary = summarise(points)
    result = {"machine": info, "reps": args.reps, "cold_reps": args.cold_reps, "warmup": args.warmup,
              "passes": args.passes, "summary": summary, "points": points}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(points, summary))
    print(f"\nwrote {args.out} ({info['seconds']} s, load average {info['loadavg_start']} -> {info['loadavg_end']})")


if __name__ == "__main__":
    main()
