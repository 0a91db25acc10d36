"""The GPU suite on the 21B synthetic shape (``python -m benchmarks.run --suite gpu --shape 21b``), whose full
checkpoint (42 GB of bf16) and bundle (40 GB) do not fit the GPU machine's 64 GB disk together.

The model is written straight into the engine's form (smallthinker_lab/engine/synthetic.py): config and non-expert
tensors, and the experts directly into a bf16 bundle and a Q4_0 bundle quantised on the fly from the same values
(both with down in the model's layout, what the Triton decode kernels read), drawn on the GPU. There is no model in
memory to check against, so each precision's reference is the engine with every expert resident (its first row,
"in memory": the experts read once into GPU memory), and the rows under a limit must give its tokens. Rows, in
this order: resident, "8GiB" (the paper's setting) and 60% of the expert bytes, bf16 then Q4_0.

``--synthetic-layers auto`` (the default for this shape) keeps the per-layer shape and takes as many of the 52
layers as the measured disk write and read rates let the run end inside ``--budget-s`` (logged with its inputs);
a number cuts to that many layers, and the row descriptions say how many were kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import bench_engine as be
from .ceilings import storage_read_bandwidth

GiB = 2**30
FULL_LAYERS = 52
LIMIT_8G = "8GiB"
# what the run spends besides writing and reading the experts, and how fast a pinned host copy fills: assumptions
# of the layer estimate (logged), not measurements
FIXED_SECONDS = 200.0
PIN_RATE = 4e9


def big_modes(key: str, q4: bool = True, routing: tuple = (), kernels: bool = True) -> list[be.ModeSpec]:
    """The rows, most wanted first (the budget skips from the end): per precision the resident engine (the
    reference) and "8GiB", bf16 then Q4_0, then 60% of the expert bytes of each; the Triton decode kernels (what
    backend="auto" runs on a GPU; ``kernels=False``: eager, a CPU dry run). Then, per ``routing`` domain, the
    trained model's routing replayed (inside the same kernels), bf16: its resident reference, "8GiB" and 60%."""
    k = {"cuda_graph": "kernels"} if kernels else {}
    quants = (None, "q4_0") if q4 else (None,)
    out = []
    for quant in quants:
        req = quant is None
        out += [be.ModeSpec("engine", key, "in memory", quantization=quant, required=req, reference=True,
                            options=dict(k)),
                be.ModeSpec("engine", key, "full", policy="lru", prefetch=True, quantization=quant, required=req,
                            limit=LIMIT_8G, options=dict(k))]
    out += [be.ModeSpec("engine", key, "full", 0.6, "lru", True, quantization=q, options=dict(k)) for q in quants]
    r = {"backend": "kernels"} if kernels else {"backend": "eager"}
    for d in routing:
        out += [be.ModeSpec("engine", key, "in memory", reference=True, options=dict(r), routing=d),
                be.ModeSpec("engine", key, "full", policy="lru", prefetch=True, limit=LIMIT_8G, options=dict(r),
                            routing=d),
                be.ModeSpec("engine", key, "full", 0.6, "lru", True, options=dict(r), routing=d)]
    return out


def _probe_disk(folder: Path, nbytes: int = GiB) -> dict:
    """Write ``nbytes`` with fsync and read them back with the page cache bypassed: the disk's rates here."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="disk_probe_", dir=folder)
    block = os.urandom(8 << 20)
    try:
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write = nbytes / (time.perf_counter() - t0)
        read = storage_read_bandwidth(path, repeats=1)
    finally:
        os.unlink(path)
    return {"write_bytes_per_s": write, "read_bytes_per_s": read["median"], "read_mode": read.get("mode"),
            "probe_bytes": nbytes}


def _layer_bytes(config, q4: bool) -> tuple[int, int]:
    from smallthinker_lab.engine.bundle import record_layout

    H, F, E = config.hidden_size, config.moe_ffn_hidden_size, config.num_experts
    b16 = E * record_layout(H, F, "bf16", False)[2]
    b4 = E * record_layout(H, F, "q4_0", False)[2] if q4 else 0
    return b16, b4


def choose_layers(config, budget_s: float, probe: dict, q4: bool, free_bytes: int | None = None) -> tuple[int, dict]:
    """The most layers (at most the preset's) whose estimated run fits ``budget_s`` and whose files fit
    ``free_bytes`` (less 3 GiB for the non-expert tensors' share and the suite's own files): per layer its bytes
    written at the measured write rate, read once into GPU memory per precision at the measured read rate (the
    resident rows read with the page cache bypassed), and copied into a pinned host copy by the two limited rows
    of each precision at PIN_RATE; plus FIXED_SECONDS."""
    b16, b4 = _layer_bytes(config, q4)
    per_layer = ((b16 + b4) / probe["write_bytes_per_s"] + (b16 + b4) / probe["read_bytes_per_s"]
                 + 2 * (b16 + b4) / PIN_RATE)
    n = min(config.num_hidden_layers, int((budget_s - FIXED_SECONDS) // per_layer))
    if free_bytes is not None:  # the folder's bytes at n layers: a + n * b (planned_bytes), a 3 GiB margin
        from smallthinker_lab.engine.synthetic import planned_bytes

        fmts = [(None, False)] + ([("q4_0", False)] if q4 else [])
        one, two = (planned_bytes(config.replace(num_hidden_layers=k, rope_layout=config.rope_layout[:k],
                                                 sliding_window_layout=config.sliding_window_layout[:k]),
                                  torch.bfloat16, fmts)["total"] for k in (1, 2))
        n = min(n, int((free_bytes - 3 * GiB - (2 * one - two)) // (two - one)))
    n = max(1, n)
    return n, {"per_layer_seconds": per_layer, "fixed_seconds": FIXED_SECONDS, "pin_rate_assumed": PIN_RATE,
               "layer_bytes_bf16": b16, "layer_bytes_q4_0": b4, "estimated_seconds": FIXED_SECONDS + n * per_layer,
               "budget_s": budget_s, "free_bytes": free_bytes, "layers": n}


def make_synthetic_direct(folder: str | os.PathLike, preset: str, seed: int = 0, attn_out_scale: float = 0.1,
                          q4: bool = True, device: str = "auto", reuse: bool = True, log=print, kernels: bool = True,
                          **overrides) -> tuple[Path, dict, dict]:
    """The synthetic model of ``preset`` written straight into the engine's form (no full checkpoint), with the
    attention output projections scaled as :func:`bench_engine.make_synthetic` scales them (so on the CPU its
    tensors and bundle bytes equal that checkpoint's and its conversion's). Returns (folder, description,
    {quantization: bundle folder}); a folder already made with the same description is reused when ``reuse``.
    Both bundles keep down in the model's layout, what the decode kernels read; ``kernels=False`` (the eager
    rows of a CPU dry run, exact=True) stores Q4_0's down transposed, the layout those read."""
    from smallthinker_lab.engine.synthetic import bundle_name, resolve_device, write_synthetic_engine_folder

    folder = Path(folder)
    bundles = [(None, False)] + ([("q4_0", not kernels)] if q4 else [])
    dev = resolve_device(device).type
    spec = {"preset": preset, "dtype": "bfloat16", "seed": seed, "attn_out_scale": attn_out_scale,
            "overrides": overrides, "bundles": [list(b) for b in bundles], "drawn_on": dev, "version": 1,
            "writer": "straight into the bundles (smallthinker_lab.engine.synthetic)"}
    marker = folder / "bench_synthetic.json"
    dirs = {q: folder / bundle_name(q, dt) for q, dt in bundles}
    if reuse and marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder, spec | {"reused": True}, dirs
    cfg = be.SmallThinkerConfig.from_name(preset, **overrides)
    scale = None if attn_out_scale == 1.0 else (
        lambda f: be.scale_tensors(f, "self_attn.o_proj.weight", attn_out_scale))
    t0 = time.perf_counter()
    _, info = write_synthetic_engine_folder(folder, cfg, seed=seed, bundles=bundles, device=dev,
                                            after_non_experts=scale, log=log, progress=False)  # log lines instead
    marker.write_text(json.dumps(spec))
    return folder, spec | {"reused": False, "write_seconds": time.perf_counter() - t0, "written": info}, dirs


def setup_big(args, preset: str, key: str, small: bool, log) -> tuple[be.ModelInfo, dict]:
    """Write (or reuse) the direct synthetic model of the GPU suite's big shape; its ModelInfo and setup record."""
    from .run import synthetic_prompts

    scratch = Path(args.scratch)
    setup: dict = {"disk_before": _disk(scratch)}
    full = be.SmallThinkerConfig.from_name(preset)
    overrides: dict = {}
    layers = args.synthetic_layers
    if not small:
        if layers in (None, "auto"):
            probe = _probe_disk(scratch)
            setup["disk_probe"] = probe
            layers, est = choose_layers(full, args.budget_s_effective, probe, args.q4, _disk(scratch)["free"])
            setup["layer_estimate"] = est
            log(f"disk here: write {probe['write_bytes_per_s'] / 1e9:.2f} GB/s, read "
                f"{probe['read_bytes_per_s'] / 1e9:.2f} GB/s ({probe['read_mode']}); {layers} of "
                f"{full.num_hidden_layers} layers fit the budget and the disk (estimate "
                f"{est['estimated_seconds']:.0f} s of {est['budget_s']:.0f}: {est['per_layer_seconds']:.1f} s per "
                f"layer + {FIXED_SECONDS:.0f} s fixed)")
        layers = int(layers)
        if layers < full.num_hidden_layers:
            from smallthinker_lab.model.config import hybrid_layouts

            rope, swa = hybrid_layouts(layers)
            overrides = dict(num_hidden_layers=layers, rope_layout=list(rope), sliding_window_layout=list(swa))
    t0 = time.perf_counter()
    ckpt, spec, bundles = make_synthetic_direct(scratch / key, preset, seed=0, attn_out_scale=args.attn_out_scale,
                                                q4=args.q4, device="auto", reuse=args.reuse, log=log,
                                                kernels=args.kernels,
                                                **overrides)
    secs = time.perf_counter() - t0
    w = spec.get("written") or {}
    setup["synthetic_direct"] = spec | {"seconds": secs, "folder": str(ckpt)}
    setup["disk_after"] = _disk(scratch)
    if w:
        log(f"synthetic {preset} straight into its bundles ({w['device']}): {w['bytes'] / 1e9:.1f} GB of experts + "
            f"{w['non_expert_bytes'] / 1e9:.1f} GB non-expert in {secs:.0f} s ({w['rate_bytes_per_s'] / 1e9:.2f} GB/s "
            f"for the bundles, fsync {w['fsync_seconds']:.0f} s); disk free after: "
            f"{setup['disk_after']['free'] / 1e9:.1f} GB")
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    cut = (f" CUT to {cfg.num_hidden_layers} of its {full.num_hidden_layers} layers (per-layer shape kept; "
           f"{LIMIT_8G} then holds a larger share of the experts than on the full 21B: see each row's share)"
           if cfg.num_hidden_layers < full.num_hidden_layers and not small else "")
    desc = (f"synthetic {preset}{cut}, bf16, random weights (seed 0, drawn on {spec['drawn_on']}), attention output "
            f"projections x{args.attn_out_scale}; written straight into a bf16{' and a Q4_0' if args.q4 else ''} "
            f"expert bundle (no full "
            f"checkpoint: it and its bundle do not fit the disk together); the 'in memory' rows are the ENGINE with "
            f"every expert resident (the model in memory needs a full checkpoint), the reference of each "
            f"precision's rows")
    info = be.ModelInfo(key, ckpt, cfg, torch.bfloat16,
                        synthetic_prompts(cfg.vocab_size, args.repeats + 1, args.prompt_tokens), bundles,
                        description=desc, routing="synthetic (varies token to token, close to uniform)")
    return info, setup


def _disk(folder: Path) -> dict:
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    u = shutil.disk_usage(p)
    return {"path": str(p), "total": u.total, "free": u.free}


def targets_big(rows: list[dict], key: str, add) -> None:
    """The 21B rows' targets: offloaded rows' share of their bound (the resident engine's time, or the bytes over
    the bus); llama.cpp's rows beside them are the peer path's."""
    for r in rows:
        if r.get("error") or r.get("model") != key or r.get("mode") != "engine" or r.get("variant") == "in memory":
            continue
        where = r["name"].split(" engine ", 1)[-1]
        add(f"GPU 21B: offloaded ({where}) share of max(resident engine time, bytes read / H2D)",
            r.get("offload_bound_share"), 0.80)
