"""Eager vs CUDA-graph decode of the engine with every expert resident, against the HBM bound measured in the same run.

    PYTHONPATH=. python3 benchmarks/gpu_decode_graph.py [--out benchmarks/results] [--scratch /tmp/st_graph]

Builds the benchmark suite's synthetic checkpoint (smallthinker-4b-a0.6b shape, bf16, seed 0, attention output
projections x0.1; ``--preset smallthinker-test`` for a quick run) and its expert bundle, measures the HBM copy
bandwidth (read + write, as the suite), takes the in-memory model's greedy tokens on the suite's prompts (32 prompt
tokens, 32 decode steps), then for each variant of the engine (``memory_limit=None``, every expert read before
timing, as the suite's "every expert resident" row):

- ``eager``: the engine's default decode (exact=True, one host sync per layer);
- ``graph-unfused``: ``cuda_graph=True, exact=True`` with every elementwise op its own eager kernel (the model's
  kernels in per-layer graphs, attention eager in between);
- ``graph``: ``cuda_graph=True, exact=True`` (the same, the model's elementwise chains fused by inductor with its
  precision-cast emulation: the same bits in fewer kernels);
- ``graph-fused``: ``cuda_graph="fused", exact=True`` (one graph per step, torch.compile'd fused kernels; the
  prefill keeps the model's kernels);

checks its greedy tokens against the model's on every prompt (reporting the first position that differs, if any),
times decode (per-token wall clock of generation, as the suite: median over the timed prompts), and counts the GPU
kernels of one decode step with the profiler. Writes ``gpu_decode_graph.json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
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
from benchmarks.ceilings import machine_info, memory_copy_bandwidth  # noqa: E402
from benchmarks.run import synthetic_prompts, versions  # noqa: E402
from smallthinker_lab.model.generate import GenerationStats, stream_tokens  # noqa: E402

VARIANTS = {  # Engine keywords; graph_opts: attributes of the engine's GraphDecoder
    "eager": dict(exact=True),
    "graph-unfused": dict(exact=True, cuda_graph=True, graph_opts={"fuse_pointwise": False}),
    "graph": dict(exact=True, cuda_graph=True),
    "graph-fused": dict(exact=True, cuda_graph="fused"),
    # the Triton decode kernels; checked against the in-memory model decoding with the same kernels
    "graph-kernels": dict(exact=True, cuda_graph="kernels", reference="kernels"),
}
TUNE = {  # candidate tiles per kernel (see smallthinker_lab.kernels.DEFAULT_BLOCKS), tried one kernel at a time
    "pdl": [True, False],
    "pre": [(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8)],
    "oproj": [(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8)],
    "gate_up": [(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8)],
    "down": [(r, w) for r in (2, 4, 8) for w in (2, 4, 8)],
    "attn": [(n, w) for n in (32, 64, 128) for w in (2, 4, 8)],
}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def host_profile(step, n: int = 20, top: int = 14) -> str:
    """cProfile of ``n`` decode steps (host side): the functions with the most own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def kernels_per_step(step, n: int = 3) -> dict | None:
    """GPU kernels (and memory copies / sets) the profiler sees in ``n`` calls of ``step()``, per call."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        kernels = copies = 0
        busy_us, by_name = 0.0, {}
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = ev.name.lower()
            if name.startswith("memcpy") or name.startswith("memset"):
                copies += 1
            else:
                kernels += 1
            us = ev.time_range.end - ev.time_range.start
            busy_us += us
            c = by_name.setdefault(ev.name[:90], [0, 0.0])
            c[0] += 1
            c[1] += us
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
        return {"kernels": kernels / n, "copies": copies / n, "steps": n, "gpu_busy_ms": busy_us / n / 1e3,
                "top": [{"name": k, "calls": c / n, "ms": us / n / 1e3} for k, (c, us) in top]}
    except Exception as e:  # noqa: BLE001  the count is optional
        return {"error": f"{type(e).__name__}: {e}"}


def reference_tokens(ckpt: Path, prompts, new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """The in-memory model's greedy tokens per prompt, and its decode seconds per token on the timed prompts."""
    model = be.load_model(ckpt, device="cuda")
    refs, times = [], []
    with torch.inference_mode():
        for i, pr in enumerate(prompts):
            cache = be.KVCache(model.config, 1, model.dtype, "cuda")
            stats = GenerationStats()
            step = lambda x, cache=cache: model(x, cache=cache).logits  # noqa: E731
            refs.append(list(stream_tokens(step, torch.tensor([pr], device="cuda"), new_tokens, None, [], stats)))
            if i:
                times.extend(stats.decode_token_seconds)
    return refs, times


def kernel_reference(ckpt: Path, prompts, new_tokens: int, eager_refs, tune: bool, log) -> dict:
    """The in-memory model decoding through the Triton kernels (smallthinker_lab.kernels.KernelRunner, one CUDA
    graph per step): its greedy tokens (the reference of the engine's kernel variant), its decode time, how its
    tokens and first-step logits compare with the eager model's, and (``tune``) the tile sizes that make its step
    fastest, tried one kernel at a time."""
    from smallthinker_lab.kernels import DEFAULT_BLOCKS, DecodeKernels, KernelRunner

    model = be.load_model(ckpt, device="cuda")
    out: dict = {"blocks": dict(DEFAULT_BLOCKS)}
    with torch.inference_mode():
        runner = KernelRunner(model, max_context=256)
        if tune:
            ids = torch.tensor([prompts[0]], device="cuda")

            def step_ms(blocks) -> float:
                runner.reset()
                tok = runner.step(ids)[:, -1].argmax(-1).view(1, 1)
                dk = DecodeKernels(model, runner.kv, runner.kernels.experts, graph=True, blocks=blocks)
                pos = runner.kv.seq_len
                dk.step(tok, pos)  # compile and capture
                torch.cuda.synchronize()
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        dk._graph.replay()  # the same position again: same inputs, same writes
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / 20)
                return 1e3 * statistics.median(times)

            best = dict(DEFAULT_BLOCKS)
            best_ms = step_ms(best)
            trials = [{"blocks": dict(best), "ms": best_ms}]
            for key, cands in TUNE.items():
                for c in cands:
                    if c == best[key]:
                        continue
                    cand = {**best, key: c}
                    try:
                        ms = step_ms(cand)
                    except Exception as exc:  # noqa: BLE001  a tile that does not compile is skipped
                        trials.append({"blocks": cand, "error": f"{type(exc).__name__}: {exc}"[:200]})
                        continue
                    trials.append({"blocks": cand, "ms": ms})
                    if ms < best_ms:
                        best, best_ms = cand, ms
                log(f"tune {key}: best {best[key]} ({best_ms:.3f} ms/step)")
            out.update(blocks=best, tune_trials=trials, tuned_step_ms=best_ms)
            runner = KernelRunner(model, max_context=256, blocks=best)
        refs, times = [], []
        for i, pr in enumerate(prompts):
            stats = GenerationStats()
            runner.reset()
            refs.append(list(stream_tokens(runner.step, torch.tensor([pr], device="cuda"), new_tokens, None, [],
                                           stats)))
            if i:
                times.extend(stats.decode_token_seconds)
        out["first_step_logits"] = kernel_first_step(model, runner, prompts[0])  # kernels vs the eager model
        ids = torch.tensor([prompts[0]], device="cuda")
        diffs = [first_difference(a, b) for a, b in zip(refs, eager_refs)]
        out.update(tokens=refs, decode_ms_per_token=1e3 * statistics.median(times), decode_steps_timed=len(times),
                   eager_first_difference=diffs, tokens_equal_eager=all(d is None for d in diffs))
        tok = [runner.step(ids)[:, -1].argmax(-1).view(1, 1)]

        def step():
            tok[0] = runner.step(tok[0])[:, -1].argmax(-1).view(1, 1)

        step()
        out["profile"] = kernels_per_step(step)
    runner = model = None  # noqa: F841  free the GPU memory
    gc.collect()
    torch.cuda.empty_cache()
    log(f"model in memory, kernels: {out['decode_ms_per_token']:.2f} ms/token, tokens = eager model's: "
        f"{out['tokens_equal_eager']} {diffs}, first step {out['first_step_logits']}")
    return out


def trained_agreement(new_tokens: int, n_prompts: int, log) -> dict:
    """The trained default model (real routing): greedy tokens of the eager model and of the kernel decode on
    gsm8k prompts, and the first decode step's logits of both from the same prefill."""
    from benchmarks.run import TRAINED, text_prompts
    from smallthinker_lab.kernels import KernelRunner

    model = be.load_model(TRAINED, device="cuda")
    prompts = text_prompts(TRAINED, n_prompts, 32)
    runner = KernelRunner(model, max_context=256)
    out = {"model": TRAINED.name, "prompts": len(prompts), "new_tokens": new_tokens, "rows": []}
    with torch.inference_mode():
        for pr in prompts:
            ref = model.generate(pr, new_tokens, stop_tokens=[])
            got = list(stream_tokens(runner.step, torch.tensor([pr], device="cuda"), new_tokens, None, []))
            first = kernel_first_step(model, runner, pr)
            out["rows"].append({"first_difference": first_difference(got, ref),
                                "first_step_max_abs_diff": first["max_abs_diff"],
                                "logit_std": first["ref_logit_std"]})
    diffs = [r["first_difference"] for r in out["rows"]]
    out["tokens_equal"] = sum(d is None for d in diffs)
    log(f"trained model, kernels vs eager: {out['tokens_equal']} of {len(diffs)} prompts equal, first "
        f"differences {diffs}, max |diff| first step "
        f"{max(r['first_step_max_abs_diff'] for r in out['rows']):.3g}")
    runner = model = None  # noqa: F841  free the GPU memory
    gc.collect()
    torch.cuda.empty_cache()
    return out


def first_step_logits(e, prompt: list[int]) -> dict:
    """The first decode step's logits of the graph against the engine's eager step (exact=True: the model's bits)
    from the same KV state: bit-equal or not, how many differ, the largest difference, the reference's top-1/top-2
    margin."""
    e.kv.reset()
    tok = e.forward(torch.tensor([prompt], device="cuda"))[:, -1].argmax(-1).view(1, 1)
    snap = [(kv.k.clone(), kv.v.clone(), kv.pos.clone(), kv.length) for kv in e.kv.layers]
    graph, e.decoder = e.decoder, None
    try:
        ref = e.forward(tok).float().flatten()
    finally:
        e.decoder = graph
    for kv, (k, v, p, n) in zip(e.kv.layers, snap):
        kv.k.copy_(k), kv.v.copy_(v), kv.pos.copy_(p)
        kv.length = n
    got = e.forward(tok).float().flatten()
    return compare_logits(ref, got)


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Two logit rows (fp32, flat): bit-equal or not, how many differ, the largest difference, the reference's
    top-1/top-2 margin and std, whether the argmax agrees."""
    top = ref.topk(2).values
    return {"bit_equal": bool(torch.equal(ref, got)), "differing": int((ref != got).sum()), "vocab": ref.numel(),
            "max_abs_diff": float((ref - got).abs().max()), "ref_top2_margin": float(top[0] - top[1]),
            "ref_logit_std": float(ref.std()), "argmax_equal": bool(ref.argmax() == got.argmax())}


def kernel_first_step(model, runner, prompt: list[int]) -> dict:
    """The first decode step after ``prompt``: the eager model's logits against the kernel decode's
    (``runner``, a KernelRunner of ``model``), from the same prefill (the model's own, in both)."""
    dev = model.device
    ids = torch.tensor([prompt], device=dev)
    cache = be.KVCache(model.config, 1, model.dtype, dev, capacity=runner.max_context)
    tok = model(ids, cache=cache).logits[:, -1].argmax(-1).view(1, 1)
    ref = model(tok, cache=cache).logits.float().flatten()
    runner.reset()
    runner.step(ids)
    got = runner.step(tok).float().flatten()
    runner.reset()
    return compare_logits(ref, got)


def run_engine(name: str, opts: dict, ckpt: Path, bundle: Path, prompts, new_tokens: int, refs, log) -> dict:
    from smallthinker_lab.engine import Engine

    row: dict = {"variant": name, "options": opts}
    opts = dict(opts)
    graph_opts = opts.pop("graph_opts", {})
    opts.pop("reference", None)
    t0 = time.perf_counter()
    e = Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", bundle_dir=bundle, progress=False, **opts)
    for k, v in graph_opts.items():
        setattr(e.decoder, k, v)
    try:
        be._preload(e)  # every expert resident before timing (the suite's "in memory" row)
        row["open_seconds"] = time.perf_counter() - t0
        per_token, tokens, diffs = [], [], []
        for i, p in enumerate(prompts):
            stats = GenerationStats()
            torch.cuda.synchronize()
            out = list(e.stream(p, new_tokens, stop_tokens=[], stats=stats))
            torch.cuda.synchronize()
            tokens.append(out)
            diffs.append(first_difference(out, refs[i]))
            if i == 0:  # the check run: the graphs are built at its first decode step
                row["first_decode_step_seconds"] = stats.decode_token_seconds[0]
            else:
                per_token.extend(stats.decode_token_seconds)
        st = e.stats()
        row.update(
            tokens_equal=all(d is None for d in diffs), first_difference=diffs,
            decode_ms_per_token=1e3 * statistics.median(per_token),
            decode_ms_per_token_mean=1e3 * sum(per_token) / len(per_token),
            decode_steps_timed=len(per_token),
            hits=st["hits"], requests=st["requests"], misses_after_preload=st["misses"],
            graph_replays=e.decoder.replays if e.decoder is not None else 0,
            compiled=getattr(e.decoder, "compiled", None), compile_error=getattr(e.decoder, "compile_error", None))
        if e.decoder is not None:
            row["first_step_logits"] = first_step_logits(e, prompts[0])
        # one decode step in isolation, for the profiler: prefill the check prompt, then steps of greedy tokens
        e.kv.reset()
        ids = torch.tensor([prompts[0]], device="cuda")
        tok = [e.forward(ids)[:, -1].argmax(-1).view(1, 1)]

        def step():
            tok[0] = e.forward(tok[0])[:, -1].argmax(-1).view(1, 1)

        step()
        row["profile"] = kernels_per_step(step)
        row["host_profile"] = host_profile(lambda: int(step() or tok[0]))
        prof = {k: v for k, v in (row["profile"] or {}).items() if k != "top"}
        print(row["host_profile"][-2500:], flush=True)
        log(f"{name}: {row['decode_ms_per_token']:.2f} ms/token, tokens equal {row['tokens_equal']} "
            f"{diffs}, per step {prof}, compiled {row['compiled']} {row['compile_error'] or ''}")
    finally:
        e.close()
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--scratch", default="/tmp/smallthinker_bench", help="the gpu suite's (its checkpoint is reused)")
    p.add_argument("--preset", default="smallthinker-4b-a0.6b")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=33, help="new tokens per generation (decode steps + 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed prompts (after the check prompt)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tune", action="store_true", help="sweep the decode kernels' tile sizes first")
    args = p.parse_args(argv)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    scratch = Path(args.scratch)
    key = "4b-synthetic" if args.preset == "smallthinker-4b-a0.6b" else args.preset  # the suite's folder names
    ckpt, spec = be.make_synthetic(scratch / key, args.preset, dtype="bfloat16", seed=0, attn_out_scale=0.1)
    bundle, secs = be.convert_bundle(ckpt, scratch / f"{key}-bundle")
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    log(f"checkpoint and bundle ready ({secs:.0f} s for the bundle)")
    hbm = memory_copy_bandwidth(2 * 2**30, 10, "cuda")
    log(f"HBM copy {hbm['median'] / 1e9:.0f} GB/s")
    prompts = synthetic_prompts(cfg.vocab_size, args.repeats + 1, args.prompt_tokens)

    # the in-memory model: the reference tokens, and its decode time
    refs, model_times = reference_tokens(ckpt, prompts, args.tokens)
    gc.collect()
    torch.cuda.empty_cache()
    log(f"model in memory: {1e3 * statistics.median(model_times):.2f} ms/token")

    expert_nbytes = be.runner_expert_nbytes(be.ModelInfo("x", ckpt, cfg, torch.bfloat16, prompts), None)
    context = args.prompt_tokens + args.tokens / 2  # the suite's average context
    mem = be.decode_memory_bytes(cfg, 2, expert_nbytes, context)
    bound_ms = 1e3 * mem["total"] / hbm["median"]
    rows = [{"variant": "model in memory", "decode_ms_per_token": 1e3 * statistics.median(model_times),
             "tokens_equal": True, "first_difference": None}]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    kref = None
    if any(VARIANTS[n].get("reference") == "kernels" for n in names):
        kref = kernel_reference(ckpt, prompts, args.tokens, refs, args.tune, log)
        try:
            trained = trained_agreement(args.tokens, 8, log)
        except Exception as exc:  # noqa: BLE001
            trained = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append({"variant": "model in memory, kernels", "decode_ms_per_token": kref["decode_ms_per_token"],
                     "tokens_equal": kref["tokens_equal_eager"], "first_difference": kref["eager_first_difference"],
                     "first_step_logits": kref["first_step_logits"], "profile": kref["profile"],
                     "blocks": kref["blocks"], "tune_trials": kref.get("tune_trials")})
    for name in names:
        try:
            opts = dict(VARIANTS[name])
            variant_refs = refs
            if opts.get("reference") == "kernels":
                variant_refs = kref["tokens"]
                opts["graph_opts"] = {**opts.get("graph_opts", {}), "kernel_blocks": kref["blocks"]}
            rows.append(run_engine(name, opts, ckpt, bundle, prompts, args.tokens, variant_refs, log))
            rows[-1]["reference"] = opts.get("reference", "eager")
        except Exception as exc:  # noqa: BLE001  a row with the error, the others still run
            import traceback

            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=8)})
            log(f"{name}: ERROR {rows[-1]['error']}")
    for r in rows:
        if r.get("decode_ms_per_token"):
            r["tok_s"] = 1e3 / r["decode_ms_per_token"]
            r["bound_share"] = bound_ms / r["decode_ms_per_token"]
    result = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:],
              "machine": machine_info(), "versions": versions(), "checkpoint": spec | {"preset": args.preset},
              "prompt_tokens": args.prompt_tokens, "decode_steps": args.tokens - 1, "timed_prompts": args.repeats,
              "hbm_copy": hbm, "memory_bytes_per_token": mem, "bound_ms": bound_ms, "rows": rows,
              "trained_kernels_vs_eager": trained if kref is not None else None,
              "wall_seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode_graph.json").write_text(json.dumps(be.as_jsonable(result), indent=1) + "\n")
    md = render(result)
    (out / "gpu_decode_graph.md").write_text(md)
    print(md)
    return 0 if all(not r.get("error") for r in rows) else 1


def render(res: dict) -> str:
    m = res["machine"]
    mem = res["memory_bytes_per_token"]
    lines = [
        f"## CUDA-graph decode, engine with every expert resident: {m.get('gpu', '?')}, {res['created']}",
        "",
        f"torch {res['versions'].get('torch')}, commit {str(res['versions'].get('git_commit'))[:10]}"
        f"{' (dirty)' if res['versions'].get('git_dirty') else ''}. Checkpoint: synthetic "
        f"{res['checkpoint']['preset']}, "
        f"bf16, seed 0, o_proj x0.1 (the gpu suite's). Prompt {res['prompt_tokens']} tokens, "
        f"{res['decode_steps']} decode steps, median over {res['timed_prompts']} timed prompts after a check prompt.",
        "",
        f"Bound: {mem['total'] / 2**20:.0f} MiB read per decode token (resident {mem['resident'] / 2**20:.0f}, "
        f"KV {mem['kv'] / 2**20:.1f}, experts {mem['experts'] / 2**20:.0f}) / HBM copy "
        f"{res['hbm_copy']['median'] / 1e9:.0f} GB/s measured in this run = **{res['bound_ms']:.3f} ms/token**.",
        "",
        "Greedy tokens are compared with the eager in-memory model's, except the engine's kernel variant "
        "(`graph-kernels`), whose reference is the in-memory model decoding with the same kernels (`model in "
        "memory, kernels`); that row is itself compared with the eager model.",
        "",
        "| variant | ms/token | tok/s | share of HBM bound | greedy tokens = reference | kernels/step | copies/step | "
        "GPU busy ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['variant']} | error: {r['error'][:80]} | | | | | | |")
            continue
        prof = r.get("profile") or {}
        diff = r.get("first_difference")
        eq = "yes" if r.get("tokens_equal") else f"no (first difference per prompt: {diff})"
        k = prof.get("kernels")
        c, busy = prof.get("copies"), prof.get("gpu_busy_ms")
        lines.append(f"| {r['variant']} | {r['decode_ms_per_token']:.2f} | {r['tok_s']:.1f} | "
                     f"{100 * r['bound_share']:.1f}% | {eq} | {'' if k is None else f'{k:.0f}'} | "
                     f"{'' if c is None else f'{c:.0f}'} | {'' if busy is None else f'{busy:.2f}'} |")
    extra = [r for r in res["rows"] if r.get("first_decode_step_seconds") is not None]
    if extra:
        lines += ["", "First decode step of the check prompt (graph build, compile and capture included): " + ", ".join(
            f"{r['variant']} {r['first_decode_step_seconds']:.2f} s" for r in extra) + "."]
    for r in res["rows"]:
        if r.get("variant", "").startswith("graph") and not r.get("error"):
            lines.append(f"{r['variant']} ran {'inductor kernels' if r.get('compiled') else 'eager kernels only'}"
                         f"{'; compile error: ' + r['compile_error'] if r.get('compile_error') else ''}.")
    for r in res["rows"]:
        d = r.get("first_step_logits")
        if d:
            lines.append(f"{r['variant']}, first decode step of the check prompt vs the eager (model's) logits: "
                         f"bit-equal {d['bit_equal']}, {d['differing']} of {d['vocab']} differ, max |diff| "
                         f"{d['max_abs_diff']:.3g} (logit std {d['ref_logit_std']:.3g}), reference top-1/top-2 margin "
                         f"{d['ref_top2_margin']:.3g}, argmax equal {d['argmax_equal']}.")
    t = res.get("trained_kernels_vs_eager")
    if t and not t.get("error"):
        diffs = [r["first_difference"] for r in t["rows"]]
        lines.append(f"Trained default model ({t['model']}, real routing), {t['prompts']} gsm8k prompts x "
                     f"{t['new_tokens']} greedy tokens: the kernel decode gives the eager model's tokens on "
                     f"{t['tokens_equal']} of {len(diffs)} prompts (first differences {diffs}); first decode step "
                     f"max |diff| {max(r['first_step_max_abs_diff'] for r in t['rows']):.3g} (logit std "
                     f"{t['rows'][0]['logit_std']:.3g}).")
    elif t:
        lines.append(f"Trained default model, kernels vs eager: error {t['error']}.")
    for r in res["rows"]:
        if r.get("blocks"):
            lines.append(f"Kernel tiles ({'tuned in this run' if r.get('tune_trials') else 'defaults'}): "
                         f"{r['blocks']}.")
    lines += ["", "GPU busy: the sum of the profiled kernels' and copies' durations per step (kernels, not gaps)."]
    for r in res["rows"]:
        top = (r.get("profile") or {}).get("top")
        if top:
            lines += ["", f"Top kernels of `{r['variant']}` per step: " + "; ".join(
                f"{t['name'][:60]} x{t['calls']:.0f} {t['ms']:.3f} ms" for t in top[:6])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
