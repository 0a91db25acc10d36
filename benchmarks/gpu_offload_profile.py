"""Where the time of an offloaded kernel decode step goes on the GPU: per kernel, against the step's wall time and
the bound max(in-memory time, missed bytes / host-to-GPU bandwidth), for tile-size variants of the expert kernels.

    PYTHONPATH=. python3 benchmarks/gpu_offload_profile.py [--share 0.6] [--variants default,gu8x4,...]

Uses the GPU suite's synthetic 4B checkpoint and bundle (built if missing, in --scratch), the engine with
``cuda_graph="kernels"``, ``host_cache=True`` and the LRU policy (the cache resolved on the device: missed experts
read by the expert kernels from the pinned host copy). For each variant: greedy tokens checked against the first
variant's, decode ms/token (median over the timed prompts), hit rate and bytes read per token, then the profiler's
kernels of a few decode steps (time per step by kernel). Writes gpu_offload_profile.json and .md in --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_engine as be  # noqa: E402
from benchmarks.ceilings import host_to_device_bandwidth, machine_info, memory_copy_bandwidth  # noqa: E402
from benchmarks.gpu_decode_graph import kernels_per_step  # noqa: E402
from benchmarks.run import synthetic_prompts, versions  # noqa: E402
from smallthinker_lab.model.generate import GenerationStats  # noqa: E402

VARIANTS = {  # kernel tile overrides (smallthinker_lab.kernels.DEFAULT_BLOCKS); engine keywords
    "default": {},
    "gu8x4": {"blocks": {"gate_up": (8, 4)}},
    "gu16x8": {"blocks": {"gate_up": (16, 8)}},
    "dn4x4": {"blocks": {"down": (4, 4)}},
    "gu8x4-dn4x4": {"blocks": {"gate_up": (8, 4), "down": (4, 4)}},
    "nopdl": {"blocks": {"pdl": False}},
    "attn64x4": {"blocks": {"attn": (64, 4)}},
    "lookahead-host": {"engine": {"lookahead": True}},
}


@torch.inference_mode()
def device_step(kern, lru, stride: int, n: int = 20) -> dict:
    """The step's graph replayed alone (no host work between replays): once to learn its experts (all resident
    then), then from that state with the first ``m`` of each layer's K experts evicted, put back before each replay,
    so that every replay reads m experts per layer from host memory; m = 0, 1, 2, K."""
    tok_pos = [kern.tok.clone(), kern.pos.clone()]  # the graph advances the token and position: put back each time
    kern._graph.replay()
    torch.cuda.synchronize()
    slots = kern.slots.clone()
    live = (lru.owner, lru.stamp, lru.clock, kern.tok, kern.pos)
    base = [t.clone() for t in live[:3]] + tok_pos
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = {}
    K = slots.shape[1]
    for m in sorted({0, 1, 2, K}):
        owner = base[0].clone()
        owner[slots[:, :m].flatten()] = -1
        state = (owner, *base[1:])
        ms = []
        for _ in range(n):
            for t, saved in zip(live, state):
                t.copy_(saved)
            a.record()
            kern._graph.replay()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        misses = int((kern.slots < 0).sum())
        t = statistics.median(ms)
        out[f"device_step_{m}_missed_per_layer"] = {"ms": t, "misses": misses, "gbps": misses * stride * 2 / t / 1e6}
    return out


def run_variant(name, spec, ckpt, bundle, limit, prompts, tokens, ref, log) -> dict:
    from smallthinker_lab.engine import Engine

    row = {"variant": name, **spec}
    e = Engine.from_pretrained(ckpt, memory_limit=limit, device="cuda", bundle_dir=bundle, progress=False, exact=True,
                               host_cache=True, cuda_graph="kernels", **spec.get("engine", {}))
    e.decoder.kernel_blocks = spec.get("blocks")
    try:
        row["device_lru"] = e.decoder.device_lru()
        outs, per_token = [], []
        for i, p in enumerate(prompts):
            stats = GenerationStats()
            if i == 1:
                e.reset_stats()
            torch.cuda.synchronize()
            outs.append(list(e.stream(p, tokens, stop_tokens=[], stats=stats)))
            if i:
                per_token.extend(stats.decode_token_seconds)
        row["tokens_equal_first_variant"] = ref is None or outs == ref
        st = e.stats()
        row.update(decode_ms_per_token=1e3 * statistics.median(per_token), hit_rate=st["hit_rate"],
                   decode_bytes_per_token=st["decode_bytes_read_per_token"])
        e.kv.reset()
        tok = [e.forward(torch.tensor([prompts[0]], device="cuda"))[:, -1].argmax(-1).view(1, 1)]

        def step():
            tok[0] = e.forward(tok[0])[:, -1].argmax(-1).view(1, 1)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(8):
            step()
        torch.cuda.synchronize()
        row["isolated_step_ms"] = (time.perf_counter() - t0) / 8 * 1e3
        row["profile"] = kernels_per_step(step, 4)
        o = e.decoder._lru
        if row["device_lru"] and o is not None and o["kern"]._graph is not None:
            row["device_alone"] = device_step(o["kern"], o["lru"], e.bundle.stride // 2)
            for k, v in row["device_alone"].items():
                log(f"    device alone, {k}: {v['ms']:.3f} ms per step, {v['misses']} misses, {v['gbps']:.1f} GB/s "
                    f"of missed bytes")
        log(f"{name}: {row['decode_ms_per_token']:.2f} ms/token (isolated {row['isolated_step_ms']:.2f}), hit rate "
            f"{row['hit_rate']:.3f}, {row['decode_bytes_per_token'] / 2**20:.0f} MiB/token, device LRU "
            f"{row['device_lru']}, tokens equal {row['tokens_equal_first_variant']}")
        prof = row["profile"] or {}
        for k in prof.get("top", [])[:8]:
            log(f"    {k['ms']:7.3f} ms  {k['calls']:6.1f}x  {k['name'][:70]}")
        log(f"    GPU busy {prof.get('gpu_busy_ms', float('nan')):.3f} ms per step")
        return row, outs
    finally:
        e.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--scratch", default="/tmp/smallthinker_bench")
    p.add_argument("--share", type=float, default=0.6)
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="default,gu8x4,dn4x4,gu8x4-dn4x4,nopdl")
    args = p.parse_args(argv)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    scratch = Path(args.scratch)
    ckpt, spec = be.make_synthetic(scratch / "4b-synthetic", "smallthinker-4b-a0.6b", dtype="bfloat16", seed=0,
                                   attn_out_scale=0.1)
    bundle, _ = be.convert_bundle(ckpt, scratch / "4b-synthetic-bundle")
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    prompts = synthetic_prompts(cfg.vocab_size, args.repeats + 1, 32)
    info = be.ModelInfo("4b-synthetic", ckpt, cfg, torch.bfloat16, prompts)
    info.bundles = {None: bundle}
    lim = be.engine_limits(info, "cuda", None)
    limit, share = be.limit_for_share(lim, args.share, cfg.top_k)
    h2d = host_to_device_bandwidth()
    hbm = memory_copy_bandwidth(2 * 2**30, 10, "cuda")
    log(f"limit {limit / 2**30:.2f} GiB ({share:.0%} of the expert bytes); H2D {h2d['median'] / 1e9:.1f} GB/s, "
        f"HBM {hbm['median'] / 1e9:.0f} GB/s")
    rows, ref = [], None
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            row, outs = run_variant(name, VARIANTS[name], ckpt, bundle, limit, prompts, args.tokens, ref, log)
            ref = outs if ref is None else ref
            row["t_io_ms"] = 1e3 * row["decode_bytes_per_token"] / h2d["max"]  # the fastest copy, as the suite
            row["bound_share_io"] = row["t_io_ms"] / row["decode_ms_per_token"]
            rows.append(row)
        except Exception as exc:  # noqa: BLE001
            import traceback

            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})
            log(f"{name}: ERROR {rows[-1]['error']}")
    res = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
           "versions": versions(), "checkpoint": spec, "share": share, "memory_limit": limit, "h2d": h2d,
           "hbm_copy": hbm, "rows": rows, "wall_seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_offload_profile.json").write_text(json.dumps(be.as_jsonable(res), indent=1) + "\n")
    lines = ["| variant | device LRU | ms/token | isolated step ms | hit rate | MiB/token | T_io ms | share of bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | ERROR {r['error'][:80]} |")
            continue
        lines.append(f"| {r['variant']} | {r['device_lru']} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['isolated_step_ms']:.2f} | {r['hit_rate']:.3f} | {r['decode_bytes_per_token'] / 2**20:.0f} | "
                     f"{r['t_io_ms']:.2f} | {r['bound_share_io']:.2f} |")
    (out / "gpu_offload_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
