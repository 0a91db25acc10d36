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
The suites' modes are listed in ``benchmarks/suite_modes.py``, their targets in ``benchmarks/targets.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from .suite_modes import (  # noqa: F401  re-exported: callers import these from benchmarks.run
    DEFAULTS,
    SHAPES,
    SYNTHETIC_KEY,
    TRAINED_KEY,
    _spec,
    suite_modes,
    synthetic_key,
)
from .targets import _find, _options, _rate, add_offload_bounds, evaluate_targets  # noqa: F401  re-exported

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAINED = ROOT / "data" / "models" / "smallthinker-tiny"
PROMPTS = ROOT / "data" / "prompts" / "gsm8k.jsonl"


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
