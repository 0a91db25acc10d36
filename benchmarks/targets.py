"""The suite's targets and bounds on its result rows: each offloaded row's bound against the same engine in
memory (:func:`add_offload_bounds`) and the issue's targets, met or not (:func:`evaluate_targets`). Used by
``benchmarks/run.py`` (which re-exports every name here).
"""

from __future__ import annotations

import math

from .suite_modes import SYNTHETIC_KEY, TRAINED_KEY, synthetic_key


def _options(r) -> dict:
    """A row's options, backend="eager" left out (the GPU suite names it on the rows that were eager by default)."""
    return {k: v for k, v in (r.get("options") or {}).items() if not (k == "backend" and v == "eager")}


def _find(rows, **kw):
    """The first row without error whose fields equal ``kw`` (rows on replayed routing only when ``routing`` is
    asked for)."""
    for r in rows:
        if r.get("error") or (r.get("routing") and "routing" not in kw):
            continue
        if all((_options(r) if k == "options" else r.get(k)) == v for k, v in kw.items()):
            return r
    return None


def _rate(r) -> float:
    return float("nan") if r is None or r.get("decode_tok_s") is None else float(r["decode_tok_s"])


def add_offload_bounds(rows: list[dict]) -> None:
    """The issue's bound for an offloaded row: max(in-memory time of the same engine, T_io) / measured time; the
    same engine is the one with the same decode path (the Triton decode kernels or the eager path). Also against
    the fastest in-memory decode of the engine in the run (``offload_bound_share_fastest``)."""
    for r in rows:
        if r.get("error") or r.get("mode") != "engine" or r.get("memory_limit") is None or \
                (isinstance(r.get("memory_limit"), float) and math.isnan(r["memory_limit"])):
            continue
        kernels = (r.get("options") or {}).get("cuda_graph") == "kernels"
        mem = _find(rows, mode="engine", model=r["model"], device=r["device"], quantization=r["quantization"],
                    variant="in memory", instruments=False, options={"cuda_graph": "kernels"} if kernels else {},
                    routing=r.get("routing"))
        if mem is None or not r.get("decode_tok_s"):
            continue
        t_mem = 1e3 / mem["decode_tok_s"]
        bound = max(t_mem, r.get("t_io_ms") or 0.0)
        r["offload_bound_ms"] = bound
        r["offload_bound_share"] = bound / r["measured_ms"]
        fastest = max([_rate(m) for m in rows if not m.get("error") and m.get("mode") == "engine"
                       and m.get("model") == r["model"] and m.get("device") == r["device"]
                       and m.get("quantization") == r["quantization"] and m.get("variant") == "in memory"
                       and not m.get("instruments") and m.get("routing") == r.get("routing")] or [float("nan")])
        r["offload_bound_share_fastest"] = max(1e3 / fastest, r.get("t_io_ms") or 0.0) / r["measured_ms"]


def evaluate_targets(rows: list[dict], suite: str, gpu: bool, key: str | None = None) -> list[dict]:
    S = key or SYNTHETIC_KEY[suite]
    out = []
    in_mem_model = _find(rows, mode="in_memory", model=S, quantization="none", instruments=False,
                         options={})  # the reference
    best_mem = max([_rate(r) for r in rows if not r.get("error") and r.get("model") == S
                    and r.get("variant") == "in memory" and r.get("quantization") == "none"
                    and not r.get("instruments") and not r.get("routing")] or [float("nan")])
    eng_mem = _find(rows, mode="engine", model=S, variant="in memory", quantization="none", instruments=False,
                    spec_threads=None, options={})
    full = _find(rows, mode="engine", model=S, share_target=0.6, policy="lru", prefetch=True, quantization="none",
                 instruments=False, options={}, spec_threads=None)
    nopf = _find(rows, mode="engine", model=S, share_target=0.6, policy="lru", prefetch=False, quantization="none",
                 options={})
    variants = [r for r in rows if not r.get("error") and r.get("mode") == "engine" and r.get("model") == S
                and r.get("share_target") == 0.6 and r.get("prefetch") and r.get("quantization") == "none"
                and (r.get("options") or r.get("spec_threads")) and not r.get("routing")]
    naive = _find(rows, mode="accelerate_cpu_offload" if gpu else "accelerate_disk_offload", model=S)
    devmap = _find(rows, mode="accelerate_device_map", model=S)

    def add(name, value, target, higher=True, note=""):
        ok = None if value is None or (isinstance(value, float) and math.isnan(value)) else (
            value >= target if higher else value <= target)
        out.append({"target": name, "value": value, "threshold": target, "met": ok, "note": note})

    if gpu and S == synthetic_key("gpu", "21b"):  # benchmarks/big_shape.py's rows
        from .big_shape import targets_big

        targets_big(rows, S, add)
        return out
    if not gpu:
        add("CPU 4B: offloaded decode (60% of expert bytes, LRU, prefetch) / best in-memory decode",
            _rate(full) / best_mem, 0.67,
            note="best in-memory: the fastest of the model in memory (1 or 2 threads) and the engine with every "
                 "expert resident")
        if eng_mem is not None:
            add("CPU 4B: offloaded decode (60%, prefetch) / the same engine in memory (1 compute thread each)",
                _rate(full) / _rate(eng_mem), 0.67)
        if full is not None:
            add("CPU 4B: I/O wait share of decode time at 60% with prefetch", full.get("io_wait_share"), 0.10,
                higher=False)
        for la in (True, "early"):  # the prefetch pipeline's look-ahead (issue item 4), one compute thread
            r = _find(rows, mode="engine", model=S, share_target=0.6, policy="lru", prefetch=True,
                      quantization="none", instruments=False, options={"lookahead": la}, spec_threads=None)
            if r is not None:
                what = "look-ahead" + (" (early)" if la == "early" else "")
                add(f"CPU 4B: I/O wait share of decode time at 60% with prefetch + {what}", r.get("io_wait_share"),
                    0.10, higher=False)
                add(f"CPU 4B: offloaded decode (60%, prefetch + {what}) / the same engine in memory (1 compute "
                    f"thread each)", _rate(r) / _rate(eng_mem), 0.67)
        add("CPU 4B: offloaded decode (60%, prefetch) / accelerate disk_offload decode", _rate(full) / _rate(naive),
            5.0, note="disk_offload keeps nothing resident")
        if devmap is not None:
            add("CPU 4B: offloaded decode (60%, prefetch) / accelerate device_map under the same limit",
                _rate(full) / _rate(devmap), 5.0)
        if nopf is not None:
            add("CPU 4B: prefetch on / off at 60% (the overlap; no target)", _rate(full) / _rate(nopf), 1.0)
        for v in variants:
            opts = ", ".join([f"{k}={x}" for k, x in (v.get("options") or {}).items()]
                             + ([f"{v['spec_threads']} compute threads"] if v.get("spec_threads") else []))
            add(f"CPU 4B: offloaded decode (60%, prefetch, {opts}) / best in-memory decode", _rate(v) / best_mem,
                0.67)
    else:
        graphs = [r for r in rows if not r.get("error") and r.get("mode") == "engine" and r.get("model") == S
                  and r.get("variant") == "in memory" and (r.get("options") or {}).get("cuda_graph")]
        for r in graphs:
            kind = (r.get("options") or {}).get("cuda_graph")
            what = {"fused": ", fused kernels", "kernels": ", Triton decode kernels"}.get(kind, "")
            add(f"GPU 4B bf16: in-memory decode share of the HBM bound (engine, CUDA graph{what})",
                r.get("bound_share"), 0.40)
        km = [r for r in rows if not r.get("error") and r.get("mode") == "in_memory" and r.get("model") == S
              and (r.get("options") or {}).get("kernels")]
        for r in km:
            add("GPU 4B bf16: in-memory decode share of the HBM bound (model, Triton decode kernels)",
                r.get("bound_share"), 0.40)
        for r, what in ((eng_mem, "engine"), (in_mem_model, "model (load_model)")):
            if r is not None:
                add(f"GPU 4B bf16: in-memory decode share of the HBM bound ({what})", r.get("bound_share"), 0.40)
        if full is not None:
            add("GPU 4B bf16: offloaded (60%, prefetch) share of max(in-memory time of the same decode path, "
                "missed bytes / H2D)", full.get("offload_bound_share"), 0.80)
            add("GPU 4B bf16: offloaded (60%, prefetch) share of max(fastest in-memory time, missed bytes / H2D)",
                full.get("offload_bound_share_fastest"), 0.80)
        for opts, what in (({"cuda_graph": "kernels"}, ""), ({"cuda_graph": "kernels", "lookahead": True},
                                                               " + look-ahead")):
            kfull = _find(rows, mode="engine", model=S, share_target=0.6, policy="lru", prefetch=True,
                          quantization="none", instruments=False, options=opts)
            if kfull is None:
                continue
            add(f"GPU 4B bf16: offloaded with the Triton decode kernels (60%, prefetch{what}) share of max(in-memory "
                f"time of the same decode path, bytes read / H2D)", kfull.get("offload_bound_share"), 0.80)
            add(f"GPU 4B bf16: offloaded with the Triton decode kernels (60%, prefetch{what}) / accelerate "
                f"cpu_offload decode", _rate(kfull) / _rate(naive), 5.0)
        add("GPU 4B bf16: offloaded decode (60%, prefetch) / accelerate cpu_offload decode", _rate(full) / _rate(naive),
            5.0)
        default = _find(rows, mode="engine", model=S, variant="default options", instruments=False)
        kernel_rows = [r for r in rows if not r.get("error") and r.get("mode") == "engine" and r.get("model") == S
                       and r.get("variant") == "in memory" and (r.get("options") or {}).get("cuda_graph") == "kernels"]
        if default is not None and kernel_rows:
            add("GPU 4B bf16: engine with default options (backend auto) / best Triton-kernel engine row, in memory",
                _rate(default) / max(_rate(r) for r in kernel_rows), 0.90)
    T = TRAINED_KEY
    a = _find(rows, mode="in_memory", model=T, instruments=False)
    b = _find(rows, mode="in_memory", model=T, instruments=True)
    c = _find(rows, mode="engine", model=T, variant="in memory", instruments=False)
    d = _find(rows, mode="engine", model=T, variant="in memory", instruments=True)
    for x, y, what in ((a, b, "model in memory"), (c, d, "engine in memory")):
        if x is not None and y is not None:
            add(f"default model ({what}): decode with instruments / without (the instruments' 5% budget)",
                _rate(y) / _rate(x), 0.95)
    return out
