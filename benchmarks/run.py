"""The benchmark suite, one entry point:

    python -m benchmarks.run --suite cpu|gpu|smoke [--out benchmarks/results] [--scratch DIR] [--tokens N]

In one run: measure this machine's ceilings; write a synthetic checkpoint of the real 4B shape (bf16) and convert
it to an expert bundle in a scratch folder (deleted at the end unless ``--keep``); run every mode of the suite
(``benchmarks/bench_engine.py``): the model in memory, the engine with every expert resident and under limits
holding 25% / 60% / 90% of the expert bytes (LRU, LFU, prefetch on/off, the minimum = "no cache"), accelerate's
naive offloading under the same limit, Q4_0 when the budget allows, and the default trained model
(``data/models/smallthinker-tiny``, real routing) in memory vs offloaded, with and without the instruments.
Every mode is checked token for token against the in-memory model first; a mode that differs is an error row and
the exit status is 1. Results: ``<out>/bench_<suite>.json`` (machine, versions, ceilings, settings, every row with
min/median/max, the bounds, the targets, the decode-time profile) and ``bench_<suite>.md``; the cpu and gpu suites
also regenerate the README table (``benchmarks/report_table.py``).

Suites: ``cpu`` (4B on this machine's CPU; few tokens: a 4B decode token takes ~0.5 s here), ``gpu`` (4B on CUDA;
``--device cpu --dry-run`` runs its code path on tiny shapes; ``--shape 21b``: the 21B written straight into its
bundles, no full checkpoint, benchmarks/big_shape.py), ``smoke`` (the "smallthinker-test" preset, seconds;
run by tests/test_benchmarks.py). ``--budget-s``: optional modes are skipped, and repeats reduced, to end in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import bench_engine as be
from .ceilings import machine_info, measure_ceilings, settle_writeback

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAINED = ROOT / "data" / "models" / "smallthinker-tiny"
PROMPTS = ROOT / "data" / "prompts" / "gsm8k.jsonl"
SYNTHETIC_KEY = {"cpu": "4b-synthetic", "gpu": "4b-synthetic", "smoke": "test-synthetic"}
SHAPES = {"4b": "smallthinker-4b-a0.6b", "21b": "smallthinker-21b-a3b"}  # --shape: the synthetic preset


def synthetic_key(suite: str, shape: str = "4b") -> str:
    return SYNTHETIC_KEY[suite] if suite == "smoke" or shape == "4b" else f"{shape}-synthetic"

TRAINED_KEY = "tiny-trained"

DEFAULTS = {  # prompt tokens, new tokens (decode steps + 1), repeats, budget seconds
    "cpu": dict(prompt=16, tokens=9, repeats=3, budget=1380, trained_prompt=32, trained_tokens=33),
    "gpu": dict(prompt=32, tokens=33, repeats=3, budget=420, trained_prompt=32, trained_tokens=65),
    "smoke": dict(prompt=8, tokens=5, repeats=2, budget=600, trained_prompt=8, trained_tokens=5),
}


def _spec(mode, model, variant, share=None, policy=None, prefetch=None, **kw) -> be.ModeSpec:
    return be.ModeSpec(mode=mode, model=model, variant=variant, share=share, policy=policy, prefetch=prefetch, **kw)


def suite_modes(suite: str, gpu: bool, with_trained: bool, q4: bool = True, routing: tuple = (),
                key: str | None = None) -> list[be.ModeSpec]:
    """Modes in the order they run: the required ones first (always run), then the optional ones while the
    budget lasts. ``routing``: domains whose trained routing is replayed on the synthetic shape (rows after the
    trained model's; benchmarks/trained_routing.py)."""
    S, T = key or SYNTHETIC_KEY[suite], TRAINED_KEY
    naive = "accelerate_cpu_offload" if gpu else "accelerate_disk_offload"
    eager = {"backend": "eager"} if gpu else {}  # on a GPU backend="auto" is the kernels: these rows name eager
    req = [
        _spec("in_memory", S, "in memory", required=True),
        _spec("engine", S, "in memory", required=True, options=dict(eager)),
        _spec("engine", S, "full", 0.6, "lru", True, required=True, options=dict(eager)),
        _spec("engine", S, "no prefetch", 0.6, "lru", False, required=True, options=dict(eager)),
        _spec(naive, S, "naive offload", 0.6, required=True),
    ]
    if gpu:
        # decode steps replayed as CUDA graphs (engine/decode/graph.py), the model's kernels: the same tokens
        req.append(_spec("engine", S, "in memory", required=True, options={"cuda_graph": True}))
        # the Triton decode kernels (smallthinker_lab.kernels): the model with them first (their tokens' reference)
        req.append(_spec("in_memory", S, "in memory", required=True, options={"kernels": True}))
        req.append(_spec("engine", S, "in memory", required=True, options={"cuda_graph": "kernels"}))
        req.append(_spec("engine", S, "full", 0.6, "lru", True, required=True, options={"cuda_graph": "kernels"}))
        req.append(_spec("engine", S, "full", 0.6, "lru", True, required=True,
                         options={"cuda_graph": "kernels", "lookahead": True}))
        # what a user gets without choosing anything: Engine.from_pretrained(path, memory_limit=None, device="cuda")
        # (after the kernels' in-memory reference, whose tokens it must give)
        req.append(_spec("engine", S, "default options", required=True, options={"backend": "auto"}))
    trained = []
    if with_trained:
        trained = [
            _spec("in_memory", T, "in memory", required=True),
            # on a GPU the engine rows below run the kernels (backend="auto"): their reference decodes with them
            *([_spec("in_memory", T, "in memory", required=True, options={"kernels": True})] if gpu else []),
            _spec("in_memory", T, "in memory", instruments=True, required=True),
            _spec("engine", T, "in memory", required=True),
            _spec("engine", T, "in memory", instruments=True, required=True),
            _spec("engine", T, "full", 0.6, "lru", True, required=True),
            _spec("engine", T, "full", 0.6, "lru", True, instruments=True),
            _spec("engine", T, "no prefetch", 0.6, "lru", False),
            _spec("engine", T, "full", 0.25, "lru", True),
            _spec("engine", T, "no cache", 0.0, "lru", True),
        ]
    for d in routing:  # the synthetic shape on trained routing: its reference, the engine in memory, offloaded
        trained += [_spec("in_memory", S, "in memory", required=True, routing=d),
                    _spec("engine", S, "in memory", required=True, options=dict(eager), routing=d)]
        trained += [_spec("engine", S, variant, share, policy, prefetch, options=dict(eager) | extra, routing=d)
                    for variant, share, policy, prefetch, extra in (
                        ("full", 0.6, "lru", True, {}), ("no prefetch", 0.6, "lru", False, {}),
                        ("full", 0.6, "lru", True, {"lookahead": True}), ("full", 0.25, "lru", True, {}),
                        ("full", 0.9, "lru", True, {}), ("full", 0.6, "lfu", True, {}))]
        if gpu:  # the Triton kernels route to the trace's experts themselves: their reference, resident, device LRU
            kern = {"backend": "kernels"}
            trained += [_spec("in_memory", S, "in memory", required=True, options={"kernels": True}, routing=d),
                        _spec("engine", S, "in memory", required=True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.6, "lru", True, required=True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.6, "lru", True, options=kern | {"lookahead": True}, routing=d),
                        _spec("engine", S, "full", 0.25, "lru", True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.9, "lru", True, options=dict(kern), routing=d)]
    # (cuda_graph="fused", one graph of inductor kernels, is faster but not bit-identical: on the synthetic 4B its
    # greedy tokens differ from the first decode step, so it is not a row here; benchmarks/gpu_decode_graph.py times it)
    opt = [
        # the full system with the engine's other switches: look-ahead routing (a layer more of lead), checksums off
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": True}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": "early"}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"verify_checksums": False}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": True, "verify_checksums": False}),
    ]
    if not gpu:  # two compute threads: faster on a quiet 2-core machine, stalls when reads compete (engine notes)
        opt += [
            _spec("in_memory", S, "in memory", threads=2),
            _spec("engine", S, "in memory", threads=2),
            _spec("engine", S, "full", 0.6, "lru", True, threads=2),
            _spec("engine", S, "full", 0.6, "lru", True, threads=2,
                  options={"lookahead": True, "verify_checksums": False}),
        ]
    opt += [
        _spec("engine", S, "no cache", 0.0, "lru", True),
        _spec("engine", S, "full", 0.25, "lru", True),
        _spec("engine", S, "full", 0.9, "lru", True),
        _spec("engine", S, "full", 0.6, "lfu", True),
    ]
    if gpu:  # the engine reading storage through pinned staging buffers instead of a pinned host copy
        opt.append(_spec("engine", S, "full", 0.6, "lru", True,
                         options={"host_cache": False, "bypass_page_cache": True}))
    else:
        opt.append(_spec("accelerate_device_map", S, "naive offload", 0.6))
    opt += [
        _spec("engine", S, "no prefetch", 0.25, "lru", False),
        _spec("engine", S, "no prefetch", 0.9, "lru", False),
        _spec("engine", S, "no prefetch", 0.6, "lfu", False),
    ]
    if q4:
        opt += [
            _spec("in_memory", S, "in memory", quantization="q4_0"),
            _spec("engine", S, "in memory", quantization="q4_0"),
            _spec("engine", S, "full", 0.6, "lru", True, quantization="q4_0"),
        ]
    return req + trained + opt


# ---------------------------------------------------------------------------------------------- models
def synthetic_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def text_prompts(ckpt: Path, n: int, length: int) -> list[list[int]]:
    from smallthinker_lab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    out = []
    for line in PROMPTS.read_text(encoding="utf-8").splitlines()[:n]:
        out.append(tok(json.loads(line)["text"])["input_ids"][:length])
    return out


def setup_models(suite: str, args, log) -> tuple[dict, dict]:
    scratch = Path(args.scratch)
    small = suite == "smoke" or args.dry_run
    preset = "smallthinker-test" if small else SHAPES[args.shape]
    key = synthetic_key(suite, args.shape)
    if suite == "gpu" and args.shape != "4b":  # no full checkpoint: written straight into its bundles
        from .big_shape import setup_big

        info, setup = setup_big(args, preset, key, small, log)
        if args.routing:  # only the trained model's checkpoint is needed, to record its routing
            trained = be.ModelInfo(TRAINED_KEY, TRAINED, None, torch.bfloat16, []) \
                if (TRAINED / "model.safetensors").exists() else None
            _trained_routing(info, trained, args, setup, False, log)
        return {key: info}, setup
    overrides = {}
    if args.synthetic_layers and not small:  # the per-layer shape kept, fewer layers (a smaller run)
        from smallthinker_lab.model.config import hybrid_layouts

        full = be.SmallThinkerConfig.from_name(preset)
        n = args.synthetic_layers
        rope, swa = (full.rope_layout[:n], full.sliding_window_layout[:n]) if args.shape == "4b" else \
            hybrid_layouts(n)
        overrides = dict(num_hidden_layers=n, rope_layout=list(rope), sliding_window_layout=list(swa))
    n_prompts = args.repeats + 1
    setup: dict = {}
    t0 = time.perf_counter()
    ckpt, spec = be.make_synthetic(scratch / key, preset, dtype="bfloat16", seed=0,
                                   attn_out_scale=args.attn_out_scale, reuse=args.reuse, **overrides)
    setup["synthetic_checkpoint"] = spec | {"seconds": time.perf_counter() - t0, "folder": str(ckpt)}
    log(f"synthetic checkpoint {preset}: {setup['synthetic_checkpoint']['seconds']:.0f} s")
    bundle, secs = be.convert_bundle(ckpt, scratch / f"{key}-bundle")
    setup["synthetic_bundle"] = {"folder": str(bundle), "seconds": secs}
    log(f"bundle: {secs:.0f} s")
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    models = {key: be.ModelInfo(key, ckpt, cfg, torch.bfloat16,
                                synthetic_prompts(cfg.vocab_size, n_prompts, args.prompt_tokens), {None: bundle},
                                description=f"synthetic {preset}" + (f" cut to {cfg.num_hidden_layers} layers"
                                                                     if overrides else "")
                                            + f", bf16, random weights (seed 0), attention output "
                                            f"projections x{args.attn_out_scale}",
                                routing="synthetic (varies token to token, close to uniform)")}
    if args.trained:
        try:
            if small and suite == "smoke":  # a stand-in with the trained section's code path
                t_ckpt, _ = be.make_synthetic(scratch / "trained-standin", "smallthinker-test", dtype="bfloat16",
                                              seed=1, attn_out_scale=args.attn_out_scale, reuse=args.reuse)
                t_cfg = be.SmallThinkerConfig.from_json(t_ckpt / "config.json")
                prompts = synthetic_prompts(t_cfg.vocab_size, n_prompts, args.trained_prompt_tokens, seed=1)
                desc, routing = "stand-in: synthetic smallthinker-test, seed 1 (smoke suite)", "synthetic"
            elif (TRAINED / "model.safetensors").exists():
                t_ckpt = TRAINED
                t_cfg = be.SmallThinkerConfig.from_json(t_ckpt / "config.json")
                prompts = text_prompts(t_ckpt, max(n_prompts, args.trained_repeats + 1), args.trained_prompt_tokens)
                desc, routing = f"trained {TRAINED.name} (data/models), gsm8k prompts", "real (trained router)"
            else:
                t_ckpt = None
                log(f"no trained model at {TRAINED}: its rows are skipped")
            if t_ckpt is not None:
                t_bundle, secs = be.convert_bundle(t_ckpt, scratch / "trained-bundle")
                t_dtype = getattr(torch, t_cfg.torch_dtype)
                models[TRAINED_KEY] = be.ModelInfo(TRAINED_KEY, t_ckpt, t_cfg, t_dtype, prompts, {None: t_bundle},
                                                   description=desc, routing=routing)
                setup["trained_bundle"] = {"folder": str(t_bundle), "seconds": secs}
        except Exception as e:  # noqa: BLE001  the synthetic rows still run
            setup["trained_error"] = f"{type(e).__name__}: {e}"
            log(f"trained model skipped: {setup['trained_error']}")
            models.pop(TRAINED_KEY, None)
    if args.routing:
        _trained_routing(models[key], models.get(TRAINED_KEY), args, setup, suite == "smoke", log)
    return models, setup


def _trained_routing(syn: be.ModelInfo, trained: be.ModelInfo | None, args, setup: dict, smoke: bool, log) -> None:
    """Record the trained model's routing per domain and map it onto the synthetic shape (syn.traces); without a
    trained model the routing rows are skipped (setup says why)."""
    from .trained_routing import record_traces

    if trained is None:
        setup["trained_routing_error"] = "no trained model to record routing from (its rows are skipped)"
        log(setup["trained_routing_error"])
        args.routing = []
        return
    t0 = time.perf_counter()
    try:  # e.g. a dry run's tiny shape, whose 8 experts the trained model's 32 do not map onto
        syn.traces, info = record_traces(trained.ckpt, syn.config, args.routing, len(syn.prompts),
                                         args.prompt_tokens, args.tokens, synthetic_prompts=smoke, log=log)
    except Exception as e:  # noqa: BLE001  the other rows still run
        setup["trained_routing_error"] = f"{type(e).__name__}: {e} (the trained-routing rows are skipped)"
        log(setup["trained_routing_error"])
        args.routing = []
        return
    setup["trained_routing"] = {"domains": info, "seconds": time.perf_counter() - t0,
                                "source": f"the trained model at {trained.ckpt}"}


def ensure_q4(info: be.ModelInfo, scratch: Path, log) -> float:
    if "q4_0" in info.bundles:
        return 0.0
    out, secs = be.convert_bundle(info.ckpt, scratch / f"{info.key}-bundle-q4_0", "q4_0")
    info.bundles["q4_0"] = out
    log(f"Q4_0 bundle: {secs:.0f} s")
    return secs


# ---------------------------------------------------------------------------------------------- targets
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


# ---------------------------------------------------------------------------------------------- the run
def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("accelerate", "numpy", "pandas", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    try:
        import smallthinker_lab

        out["smallthinker_lab"] = smallthinker_lab.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    if os.environ.get("BENCH_GIT_COMMIT"):  # a copy of the tree whose .git is absent or stale (a lent machine)
        out["git_commit"], out["git_dirty"] = os.environ["BENCH_GIT_COMMIT"], None
        return out
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        out["git_commit"] = commit if len(commit) == 40 else None
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "smallthinker_lab", "benchmarks"],
                                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        pass
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("cpu", "gpu", "smoke"), required=True)
    p.add_argument("--out", default=str(RESULTS), help="folder for bench_<suite>.json / .md")
    p.add_argument("--scratch", default=None,
                   help="checkpoints, bundles, offload files (default /tmp/smallthinker_bench)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per generation (decode steps + 1)")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed generations per mode (at most)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the suite's)")
    p.add_argument("--dry-run", action="store_true", help="the suite's modes on tiny shapes (test a code path)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole run")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--reuse", action="store_true", help="reuse a synthetic checkpoint already in the scratch folder")
    p.add_argument("--no-trained", dest="trained", action="store_false", help="skip the default trained model")
    p.add_argument("--no-q4", dest="q4", action="store_false", help="skip the Q4_0 modes")
    p.add_argument("--only", default=None, help="comma-separated substrings (=NAME: exactly): run only the modes "
                   "whose name matches one, and the in-memory reference")
    p.add_argument("--no-readme", dest="readme", action="store_false")
    p.add_argument("--attn-out-scale", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads of the engine and the model in memory")
    p.add_argument("--routing", default=None, help="comma-separated prompt sets (gsm8k, humaneval, wiki-en, zh-news; "
                   "'all'): rows of the synthetic shape on the trained model's routing of each, replayed "
                   "(benchmarks/trained_routing.py); default: gsm8k,zh-news on the gpu suite, gsm8k on smoke, none on "
                   "cpu; '' none")
    p.add_argument("--shape", choices=tuple(SHAPES), default="4b", help="the synthetic checkpoint's preset shape")
    p.add_argument("--synthetic-layers", type=lambda x: x if x == "auto" else int(x), default=None,
                   help="cut the synthetic shape to this many layers (per-layer shape kept; trained routing: layer l "
                   "takes layer l mod 8); 'auto' (the gpu 21b default): as many as the measured disk lets the budget")
    g = p.add_argument_group("peer", "--suite cpu --peer llama.cpp: llama.cpp beside the engine, round-robin "
                             "(benchmarks/peer_llamacpp.py; results bench_cpu_peer.json / .md); --suite gpu --peer "
                             "llama.cpp: its CUDA build's rows interleaved with the suite's (benchmarks/"
                             "peer_llamacpp_gpu.py; in bench_gpu.json / .md); the options below are the CPU peer's")
    g.add_argument("--peer", choices=("llama.cpp",), default=None)
    g.add_argument("--layers", type=int, default=8, help="layers of the 4B shape (of 32; per-layer shape kept)")
    g.add_argument("--rounds", type=int, default=5, help="round-robin rounds in memory")
    g.add_argument("--limited-rounds", type=int, default=3, help="rounds at 60%% of expert bytes (0: skip)")
    g.add_argument("--peer-threads", default="1,2", help="comma-separated thread counts")
    g.add_argument("--build-peer", action="store_true", help="build llama.cpp into the cache when not found")
    g.add_argument("--peer-cache", default=None, help="llama.cpp build cache (default ~/.cache/smallthinker-lab/"
                   "llama.cpp; $LLAMA_CPP_DIR is looked at first)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars of checkpoint writing in the logs
    args = parse_args(argv)
    if args.peer and args.suite != "gpu":  # the CPU peer is its own run; the GPU peer's rows join the suite's
        return _peer(args)
    suite = args.suite
    d = DEFAULTS[suite]
    big = suite == "gpu" and args.shape != "4b"  # benchmarks/big_shape.py: fewer tokens and repeats (the budget)
    if big and args.peer:  # the peer's GGUF is exported from a full checkpoint, which this shape has not
        raise SystemExit(f"--peer llama.cpp needs a full checkpoint to export its GGUF; --shape {args.shape} is "
                         f"written straight into expert bundles (and a 42 GB bf16 GGUF would not fit beside them)")
    if args.synthetic_layers == "auto" and not big:
        raise SystemExit("--synthetic-layers auto is for --suite gpu --shape 21b (give a number of layers)")
    if big:
        args.tokens, args.repeats = args.tokens or 17, args.repeats or 2
    args.prompt_tokens = args.prompt_tokens or d["prompt"]
    args.tokens = args.tokens or d["tokens"]
    args.repeats = args.repeats or d["repeats"]
    args.trained_prompt_tokens = d["trained_prompt"] if not args.dry_run else d["prompt"]
    args.trained_tokens = d["trained_tokens"] if not args.dry_run else args.tokens
    args.trained_repeats = max(args.repeats, 5) if suite != "smoke" else args.repeats
    from .trained_routing import parse_domains

    args.routing = parse_domains({"gpu": "gsm8k,zh-news", "smoke": "gsm8k"}.get(suite, "")
                                 if args.routing is None else args.routing)
    device = args.device or ("cuda" if suite == "gpu" else "cpu")
    cuda = torch.device(device).type == "cuda"
    budget = args.budget_s or d["budget"]
    args.budget_s_effective = budget - 30  # what the big shape's layer choice may plan for
    args.kernels = cuda  # the big shape's rows decode with the Triton kernels on a GPU (eager on a CPU dry run)
    start = time.perf_counter()
    deadline = start + budget - 20
    scratch = Path(args.scratch or "/tmp/smallthinker_bench")
    own_scratch = not scratch.exists()
    scratch.mkdir(parents=True, exist_ok=True)
    args.scratch = str(scratch)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (f"bench_{suite}" + (f"_{args.shape}" if big else "")  # bench_gpu_21b: beside the 4B's bench_gpu
            + ("_dryrun" if args.dry_run and suite != "smoke" else ""))
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    result = {"suite": suite, "dry_run": args.dry_run, "device": device,
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine_info(), "versions": versions(),
              "partial": True, "synthetic_key": synthetic_key(suite, args.shape)}
    rows: list[dict] = []
    peer = None  # --suite gpu --peer llama.cpp (benchmarks/peer_llamacpp_gpu.py): its build starts now
    try:
        if args.peer:
            from .peer_llamacpp_gpu import GpuPeer

            peer = GpuPeer(args, scratch, log)
        models, setup = setup_models(suite, args, log)
        result["setup"] = setup
        syn = models[synthetic_key(suite, args.shape)]
        from smallthinker_lab.engine.bundle import open_bundle

        b = open_bundle(syn.bundles[None], syn.config)
        offsets = [b.offset(layer, e) for layer in range(b.num_layers) for e in range(b.num_experts)]
        step = max(1, len(offsets) // 64)
        if peer is not None:  # GGUFs, and the build waited for: nothing is timed while it compiles
            peer.prepare(syn, deadline)
        log("ceilings ...")
        ceilings = measure_ceilings(device="cuda" if cuda else "cpu", quick=suite == "smoke" or args.dry_run,
                                    scratch=str(scratch), expert_file=b.data_path, expert_offsets=offsets[::step],
                                    expert_nbytes=b.stride)
        result["ceilings"] = ceilings
        log("ceilings: memory copy {:.1f} GB/s, storage {:.2f} GB/s, expert reads {:.2f} GB/s{}".format(
            ceilings["memory_copy"]["median"] / 1e9, ceilings["storage_read"]["median"] / 1e9,
            ceilings.get("expert_reads", {}).get("median", float("nan")) / 1e9,
            (", HBM {:.0f} GB/s, H2D {:.1f} GB/s".format(ceilings["hbm_copy"]["median"] / 1e9,
                                                         ceilings["host_to_gpu"]["max"] / 1e9) if cuda else "")))
        ctx = be.Context(device=device, new_tokens=args.tokens, repeats=args.repeats, ceilings=ceilings,
                         models=models, scratch=scratch, deadline=deadline,
                         compute_threads=None if cuda else args.threads, model_threads=None if cuda else args.threads,
                         log=log)
        result["settings"] = {
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens, "decode_steps": args.tokens - 1,
            "repeats": args.repeats, "trained_prompt_tokens": args.trained_prompt_tokens,
            "trained_new_tokens": args.trained_tokens, "trained_repeats": args.trained_repeats,
            "budget_s": budget, "torch_threads_cpu": None if cuda else args.threads,
            "bypass_page_cache": ctx.bypass_page_cache, "cuda_host_cache": ctx.host_cache if cuda else None,
            "engine_exact": True, "scratch": str(scratch),
            "models": {k: {"description": v.description, "routing": v.routing, "checkpoint": str(v.ckpt),
                           "dtype": str(v.dtype), "prompt_tokens": [len(p) for p in v.prompts],
                           "preset_shape": {"hidden": v.config.hidden_size, "layers": v.config.num_hidden_layers,
                                            "experts": v.config.num_experts, "top_k": v.config.top_k,
                                            "ffn": v.config.moe_ffn_hidden_size, "vocab": v.config.vocab_size}}
                       for k, v in models.items()},
            "check": "greedy tokens of the check prompt equal to the in-memory model's before timing, and of every "
                     "timed prompt after; the engine runs with exact=True (the model's kernels)",
        }
        if big:
            result["settings"]["check"] = ("greedy tokens of the check prompt equal to the resident engine's (each "
                                           "precision's first row: no model in memory without a full checkpoint) "
                                           "before timing, and of every timed prompt after")
        modes = suite_modes(suite, suite == "gpu", TRAINED_KEY in models, args.q4, tuple(args.routing),
                            key=syn.key)  # gpu: also on --device cpu
        if big:
            from .big_shape import big_modes

            modes = big_modes(syn.key, args.q4, tuple(args.routing), kernels=cuda)
        if args.only:
            keys = [k.strip() for k in args.only.split(",") if k.strip()]
            picked = [m for m in modes if any((m.name == k[1:]) if k.startswith("=") else (k in m.name) for k in keys)]
            modes = [m for m in modes if m in picked or
                     ((m.mode == "in_memory" and not m.quantization or m.reference) and not m.instruments
                      and not m.threads and (not m.routing or any(x.routing == m.routing for x in picked)))]
        if peer is not None:  # its rows: in memory, one -ncmoe per engine limit of these modes, all on the CPU
            peer.plan(modes, syn.key)
        skipped, durations = [], []
        for i_mode, spec in enumerate(modes):
            info = models.get(spec.model)
            if info is None:
                continue
            now = time.perf_counter()
            est = statistics.median(durations) if durations else 0.0
            if spec.quantization == "q4_0" and "q4_0" not in info.bundles:
                est += 120.0 if not (suite == "smoke" or args.dry_run) else 1.0
            if not spec.required and now + est > deadline:
                skipped.append({"name": spec.name,
                                "reason": f"budget: {deadline - now:.0f} s left, ~{est:.0f} s needed"})
                log(f"skip {spec.name} (budget)")
                continue
            if spec.quantization == "q4_0":
                try:
                    result.setdefault("setup", {})["q4_0_bundle_seconds"] = ensure_q4(info, scratch, log)
                except Exception as e:  # noqa: BLE001
                    rows.append({"name": spec.name, "mode": spec.mode, "model": spec.model,
                                 "error": f"Q4_0 convert: {e}"})
                    continue
            ctx.repeats = args.trained_repeats if spec.model == TRAINED_KEY else args.repeats
            ctx.new_tokens = args.trained_tokens if spec.model == TRAINED_KEY else args.tokens
            log(f"{spec.name} ...")
            if spec.model != TRAINED_KEY and not (suite == "smoke" or args.dry_run):
                settle_writeback(60.0)  # files just written (a Q4_0 bundle, offload folders) flushed before timing
            row = be.measure_mode(spec, ctx)
            row["share_target"] = spec.share
            row["host_cache_override"] = spec.options.get("host_cache") if spec.options else None
            row["options"] = dict(spec.options)
            row["spec_threads"] = spec.threads
            row["required"] = spec.required
            rows.append(row)
            if spec.model != TRAINED_KEY:
                durations.append(row["seconds"])
            if row.get("error"):
                log(f"  ERROR {row['error']}")
            else:
                log(f"  decode {row['decode_tok_s']:.3g} tok/s [{row['decode_tok_s_min']:.3g}, "
                    f"{row['decode_tok_s_max']:.3g}], prefill {row['prefill_tok_s']:.3g} tok/s, hit "
                    f"{row.get('hit_rate', float('nan')):.2f}, {row['bytes_read_per_token'] / 2**20:.0f} MiB/token "
                    f"read, bound share {row['bound_share']:.2f} ({row['seconds']:.0f} s)")
            _finish(result, rows, skipped, suite, cuda, json_path, md_path, start, partial=True, peer=peer)
            if peer is not None:  # its share of the llama-bench runs, between the engine's rows
                peer.step(len(modes) - i_mode - 1, deadline)
        if peer is not None:
            peer.finish(deadline)
        result["skipped"] = skipped
    except Exception as e:  # noqa: BLE001  the setup failed: still write what there is
        import traceback

        result["fatal"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        log(f"FATAL {result['fatal']}")
    finally:
        if peer is not None:
            peer.close()
        _finish(result, rows, result.get("skipped", []), suite, cuda, json_path, md_path, start, partial=False,
                peer=peer)
        if not args.keep and own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        elif not args.keep:  # a folder given or left over: remove what this run made in it
            for p in ("accelerate_disk_offload", "accelerate_device_map"):
                for q in scratch.glob(f"{p}*"):
                    shutil.rmtree(q, ignore_errors=True)
    errors = [r for r in rows if r.get("error")]
    log(f"wrote {json_path} ({len(rows)} rows, {len(errors)} errors)")
    if suite in ("cpu", "gpu") and args.readme and not args.dry_run and Path(args.out).resolve() == RESULTS.resolve():
        from .report_table import update_readme

        update_readme()
        log("README table regenerated")
    print(Path(md_path).read_text(encoding="utf-8"))
    return 1 if errors or result.get("fatal") else 0


def _peer(args) -> int:
    """``--peer llama.cpp``: the peer comparison instead of the suite's modes (benchmarks/peer_llamacpp.py)."""
    from . import peer_llamacpp

    if args.suite != "cpu":
        raise SystemExit(f"--peer llama.cpp runs with --suite cpu or gpu (got --suite {args.suite})")
    args.prompt_tokens = args.prompt_tokens or 32  # llama-bench pp32
    args.tokens = args.tokens or 17  # tg16: 16 decode steps
    args.peer_threads = [int(x) for x in str(args.peer_threads).split(",") if x.strip()]
    args.peer_cache = args.peer_cache or str(peer_llamacpp.CACHE)
    start = time.perf_counter()
    code = peer_llamacpp.main(args, log=lambda m: print(f"[{time.perf_counter() - start:7.1f}s] {m}", flush=True))
    if args.readme and not args.dry_run and Path(args.out).resolve() == RESULTS.resolve():
        from .report_table import update_readme

        update_readme()
    return code


def _finish(result, rows, skipped, suite, cuda, json_path: Path, md_path: Path, start, partial: bool,
            peer=None) -> None:
    add_offload_bounds(rows)
    result["rows"] = rows
    result["skipped"] = skipped
    result["targets"] = evaluate_targets(rows, suite, suite == "gpu", result.get("synthetic_key"))
    from .profile_decode import profile_rows

    result["profile"] = profile_rows(rows)
    result["errors"] = sum(1 for r in rows if r.get("error"))
    result["wall_seconds"] = time.perf_counter() - start
    result["partial"] = partial
    if peer is not None:  # llama.cpp's rows and engine / llama.cpp (benchmarks/peer_llamacpp_gpu.py)
        result |= peer.results(rows, result.get("ceilings"), result.get("synthetic_key"))
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(be.as_jsonable(result), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    from .report_table import render_result

    md_path.write_text(render_result(be.as_jsonable(result)), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
