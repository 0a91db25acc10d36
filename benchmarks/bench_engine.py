"""The modes the benchmark runs, how each is checked against the in-memory model, timed and bounded.

A *mode* is one way of running one model on one device: the model in memory (``load_model``), the offloading
engine (every expert resident, or under a memory limit holding a share of the expert bytes, LRU or LFU, prefetch on
or off, bf16 or Q4_0), or a naive offloading baseline built with accelerate (``benchmarks/baselines.py``).

For every mode, :func:`measure_mode`

1. opens it (weights loaded, bundle opened; an engine with no limit also reads every expert once, so that "in
   memory" means resident, not read on first use);
2. CHECKS it: greedy generation of the check prompt must give exactly the in-memory model's tokens, else the mode
   becomes an error row and is not timed (a mode computing something else must not be reported as faster);
3. times ``repeats`` generations, each on a different prompt (so that the expert cache meets new routing, as it
   would in a session, rather than replaying the previous repeat) and each checked again against the reference;
   the engine's cache stays warm from one generation to the next;
4. reports prefill and decode tokens/s (min / median / max over the repeats), the decode hit rate, the bytes read
   per decode token from storage (or copied host-to-GPU), the bytes read from memory per decode token, the
   physical bound of ``performance.md`` and the share of it reached, and where the decode time went.

The bound (per decode token): ``T_mem = B_mem / BW_mem`` with B_mem the resident weights, KV cache and the
selected experts' bytes, BW_mem the measured memory (CPU) or HBM (GPU) copy bandwidth; ``T_io = link bytes per
token / BW_link`` with BW_link the measured storage read (CPU) or pinned host-to-GPU (GPU) bandwidth;
``bound = max(T_mem, T_io)`` and ``bound_share = bound / measured seconds per token``.
The runners (the model in memory, the engine) are in ``benchmarks/runners.py``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import struct
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from smallthinker_lab.model.checkpoint import load_model, write_synthetic_checkpoint  # noqa: F401  re-exported
from smallthinker_lab.model.config import SmallThinkerConfig
from smallthinker_lab.model.generate import GenerationStats, stream_tokens  # noqa: F401  re-exported
from smallthinker_lab.model.kv_cache import KVCache  # noqa: F401  re-exported

from .runners import (  # noqa: F401  re-exported: callers use these as bench_engine.<name>
    EngineRunner,
    ModelRunner,
    _load_dequantised_experts,
    _preload,
    _recording,
    _replaying,
    _sync,
    _Threads,
)

MiB = 2**20


# ---------------------------------------------------------------------------------------------- checkpoints
def scale_tensors(folder: str | os.PathLike, suffix: str, scale: float) -> int:
    """Multiply, in place in the safetensors files of ``folder``, every tensor whose name ends with ``suffix``.
    Returns how many tensors were scaled."""
    n = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "r+b") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
            base = 8 + size
            for name, entry in header.items():
                if name == "__metadata__" or not name.endswith(suffix):
                    continue
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[entry["dtype"]]
                begin, end = entry["data_offsets"]
                fh.seek(base + begin)
                raw = bytearray(fh.read(end - begin))
                t = torch.frombuffer(raw, dtype=dtype).float().mul_(scale).to(dtype)
                fh.seek(base + begin)
                fh.write(t.view(torch.uint8).numpy().tobytes())
                n += 1
    return n


def make_synthetic(folder: str | os.PathLike, preset: str, dtype: str = "bfloat16", seed: int = 0,
                   attn_out_scale: float = 0.1, reuse: bool = True, **overrides) -> tuple[Path, dict]:
    """A synthetic checkpoint of ``preset`` (random weights streamed to disk), with the attention output
    projections scaled by ``attn_out_scale``.

    Why the scale: with every matrix N(0, 0.02), the attention outputs (near-uniform attention over the context)
    dominate the residual stream, which then barely changes from token to token; the routers, which read the raw
    residual, pick nearly the same experts at every step (a 60% cache hits ~97%) and greedy decoding repeats one
    token. Scaling o_proj by 0.1 lets each token's own embedding and MoE output steer the residual: routing then
    changes from token to token (on the 4B shape close to uniform: an LRU cache of 60% of the experts hits about
    60% at decode), the pessimistic end of real routing. Returns (folder, description); a folder already made
    with the same description is reused when ``reuse``.
    """
    folder = Path(folder)
    spec = {"preset": preset, "dtype": dtype, "seed": seed, "attn_out_scale": attn_out_scale,
            "overrides": overrides, "version": 1}
    marker = folder / "bench_synthetic.json"
    if reuse and marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder, spec | {"reused": True}
    marker.unlink(missing_ok=True)
    cfg = SmallThinkerConfig.from_name(preset, **overrides) if overrides else SmallThinkerConfig.from_name(preset)
    t0 = time.perf_counter()
    write_synthetic_checkpoint(folder, cfg, seed=seed, dtype=dtype)
    if attn_out_scale != 1.0:
        scale_tensors(folder, "self_attn.o_proj.weight", attn_out_scale)
    marker.write_text(json.dumps(spec))
    return folder, spec | {"reused": False, "write_seconds": time.perf_counter() - t0}


def convert_bundle(ckpt: Path, bundle_dir: Path, quantization: str | None = None,
                   down_transposed: bool | None = None) -> tuple[Path, float]:
    """The expert bundle of ``ckpt`` in ``bundle_dir`` (converted unless current); (folder, seconds).
    ``down_transposed`` None: the rows' default, the model's layout for raw formats (every engine row runs
    exact=True: no transpose per read), transposed for the quantized ones (the eager path's)."""
    from smallthinker_lab.engine.conversion import ensure_bundle

    t0 = time.perf_counter()
    if down_transposed is None:
        down_transposed = quantization not in (None, "bf16", "fp16", "fp32")
    out = ensure_bundle(Path(ckpt), Path(bundle_dir), quantization, progress=False, down_transposed=down_transposed)
    return out, time.perf_counter() - t0


def kernel_layout(quantization: str | None, options: dict | None) -> bool:
    """Whether a row's engine runs the GPU decode kernels over quantized experts, which read down in the model's
    [H, F] layout: such a row needs its own bundle (``bundle_for``), the suite's quantized bundles store down
    transposed for the eager path."""
    from smallthinker_lab.engine.bundle import GPU_KERNEL_FORMATS

    o = options or {}
    return quantization in GPU_KERNEL_FORMATS and (o.get("cuda_graph") == "kernels" or o.get("backend") == "kernels")


def bundle_for(info: ModelInfo, quantization: str | None, options: dict | None = None) -> Path:
    """The bundle folder a row's engine opens: the suite's bundle of its format, or for the quantized decode kernels
    one with down in the model's layout beside it (converted on first use, then reused)."""
    if not kernel_layout(quantization, options):
        return info.bundles[quantization]
    key = f"{quantization}-kernels"
    if key not in info.bundles:
        base = Path(info.bundles[quantization])
        info.bundles[key] = convert_bundle(info.ckpt, base.parent / f"{base.name}-kernels", quantization,
                                           down_transposed=False)[0]
    return info.bundles[key]


# ---------------------------------------------------------------------------------------------- bytes per token
def decode_memory_bytes(config: SmallThinkerConfig, itemsize: int, expert_nbytes: int, context: float,
                        lm_head_rows: int | None = None, lm_head_nbytes: int | None = None,
                        attention_nbytes: int | None = None) -> dict:
    """Bytes one decode token reads from memory (performance.md): resident weights B_res (attention, router,
    norms, one embedding row, the LM head), the KV cache B_kv at ``context`` cached positions and the selected
    experts B_exp (top-k x layers x ``expert_nbytes``, the stored record size: bf16 or Q4_0). ``lm_head_nbytes``:
    the LM head's bytes when it is not ``lm_head_rows`` rows in ``itemsize`` (a quantized copy, engine
    ``lm_head_format``); ``attention_nbytes``: every layer's q/k/v/o weight bytes when they are not in
    ``itemsize`` (a quantized copy, engine ``attention_format``); the split's ``lm_head`` and ``attention`` say what
    was counted."""
    c = config
    H, D, L = c.hidden_size, c.head_dim, c.num_hidden_layers
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    per_layer = (c.num_experts * H + 2 * H) * itemsize  # router, two norms
    attn = L * (q * H + 2 * kv * H + H * q) * itemsize if attention_nbytes is None else attention_nbytes
    rows = c.vocab_size if lm_head_rows is None else lm_head_rows
    head = rows * H * itemsize if lm_head_nbytes is None else lm_head_nbytes
    res = L * per_layer + attn + (H + H) * itemsize + head  # + embedding row + final norm + LM head
    kv_bytes = 0.0
    for i in range(L):
        keys = min(context, c.sliding_window_size) if c.is_sliding(i) else context
        kv_bytes += 2 * c.num_key_value_heads * D * keys * itemsize
    exp = L * c.top_k * expert_nbytes
    return {"resident": res, "kv": kv_bytes, "experts": exp, "total": res + kv_bytes + exp, "lm_head": head,
            "attention": attn}


# ---------------------------------------------------------------------------------------------- modes
@dataclass
class ModeSpec:
    """One row of the benchmark. ``share``: the expert share the memory limit holds (None: unlimited, every
    expert resident; 0.0: the minimum, top-k slots, "no cache")."""

    mode: str  # "in_memory" | "engine" | "accelerate_disk_offload" | "accelerate_cpu_offload" | ...
    model: str  # key of the model (checkpoint) in the suite
    variant: str  # ablation name: "in memory", "full", "no prefetch", "no cache", "naive offload"
    share: float | None = None
    policy: str | None = None
    prefetch: bool | None = None
    quantization: str | None = None
    instruments: bool = False
    threads: int | None = None  # torch threads while it runs (None: the suite's default)
    required: bool = False
    options: dict = field(default_factory=dict)  # extra Engine / baseline keywords
    routing: str | None = None  # None: the model's own routers; a domain: that domain's recorded trained routing
    limit: str | None = None  # a memory limit as given ("8GiB"), instead of a share of the expert bytes
    reference: bool = False  # its tokens are the reference of its (model, quantization, kernels): an engine row where
    # the model in memory cannot be loaded (a folder without a full checkpoint, benchmarks/big_shape.py)

    @property
    def name(self) -> str:
        parts = [self.model, self.mode]
        if self.quantization:
            parts.append(self.quantization)
        if self.limit is not None:
            parts.append(self.limit)
        if self.share is not None:
            parts.append("min" if self.share == 0 else f"{self.share:.0%}")
        if self.policy:
            parts.append(self.policy)
        if self.prefetch is not None:
            parts.append("prefetch" if self.prefetch else "no-prefetch")
        if self.instruments:
            parts.append("instruments")
        if self.threads:
            parts.append(f"{self.threads}thr")
        parts += [f"{k}={v}" for k, v in self.options.items()]
        if self.routing:
            parts.append(f"routing={self.routing}")
        return " ".join(parts)

    @property
    def family(self) -> str:
        return "engine" if self.mode == "engine" else "model"


@dataclass
class ModelInfo:
    """A checkpoint the suite runs: its config, dtype, bundle folders, prompts."""

    key: str
    ckpt: Path
    config: SmallThinkerConfig
    dtype: torch.dtype
    prompts: list[list[int]]  # [0] is the check prompt, [1:] the timed repeats
    bundles: dict = field(default_factory=dict)  # quantization (None for as stored) -> bundle folder
    description: str = ""
    routing: str = ""
    # domain -> one RoutingTrace per prompt (index as prompts), recorded on the trained model, mapped onto this shape
    traces: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every mode needs: device, settings, ceilings, references, the time budget."""

    device: str
    new_tokens: int
    repeats: int
    ceilings: dict
    models: dict[str, ModelInfo]
    scratch: Path
    deadline: float = math.inf
    compute_threads: int | None = None
    model_threads: int | None = None
    bypass_page_cache: bool = True
    host_cache: bool = True  # CUDA: the offloaded engine loads from a pinned host copy (the link is host-to-GPU)
    references: dict = field(default_factory=dict)  # (model, quantization) -> {prompt index: tokens}
    log: Callable[[str], None] = print


class TokensDiffer(AssertionError):
    pass


# ---------------------------------------------------------------------------------------------- limits
def engine_limits(info: ModelInfo, device: str, quantization: str | None, exact: bool = True,
                  options: dict | None = None) -> dict:
    """The engine's fixed bytes (everything but the expert cache), the slot size and the number of experts, from
    the MemoryLimitError of a 1-byte limit (nothing is loaded). ``exact`` and ``options`` (the row's Engine
    keywords): as the row is timed (the CPU kernel formats run with exact=False; the decode kernels' workspace)."""
    from smallthinker_lab.engine import Engine, MemoryLimitError

    cuda = torch.device(device).type == "cuda"
    kw = ({"host_cache": True} if cuda else {}) | dict(options or {})
    try:
        Engine.from_pretrained(info.ckpt, memory_limit=1, device=device, quantization=quantization,
                               bundle_dir=bundle_for(info, quantization, options), progress=False, exact=exact,
                               **kw)  # as timed
    except MemoryLimitError as e:
        minimum = e.minimum_bytes
    else:  # pragma: no cover
        raise RuntimeError("a 1-byte memory limit was accepted")
    from smallthinker_lab.engine.bundle import open_bundle

    b = open_bundle(bundle_for(info, quantization, options), info.config)
    k = info.config.top_k
    n = info.config.num_hidden_layers * info.config.num_experts
    return {"minimum": minimum, "fixed": minimum - k * b.stride, "stride": b.stride, "experts": n,
            "expert_nbytes": b.payload_nbytes, "format": b.format}


def limit_for_share(lim: dict, share: float, top_k: int) -> tuple[int, float]:
    """(memory limit in bytes, share of the expert bytes its cache holds) for a target share (0: the minimum)."""
    slots = max(top_k, round(share * lim["experts"]))
    return lim["fixed"] + slots * lim["stride"], slots / lim["experts"]


# ---------------------------------------------------------------------------------------------- measuring
def _stat3(xs: Sequence[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def _check(tokens: list[int], want: list[int] | None, what: str) -> None:
    if want is None:
        return
    if tokens != want:
        i = next((j for j, (a, b) in enumerate(zip(tokens, want)) if a != b), min(len(tokens), len(want)))
        raise TokensDiffer(f"{what}: generated tokens differ from the in-memory model's at position {i}: "
                           f"got {tokens[i:i + 4]}..., want {want[i:i + 4]}...")


def open_runner(spec: ModeSpec, ctx: Context) -> tuple[object, dict]:
    """The runner of a mode and the row fields that describe its configuration."""
    info = ctx.models[spec.model]
    fields: dict = {"memory_limit": float("nan"), "limit_share_of_expert_bytes": float("nan")}
    if spec.mode == "in_memory":
        bundle = info.bundles.get(spec.quantization) if spec.quantization else None
        runner = ModelRunner(info, ctx.device, spec.threads or ctx.model_threads, bundle, spec.instruments,
                             kernels=bool(spec.options.get("kernels")))
        fields["limit_share_of_expert_bytes"] = 1.0
    elif spec.mode == "engine":
        limit = None
        if spec.limit is not None:
            from smallthinker_lab.engine.memory import parse_memory_limit

            limit = parse_memory_limit(spec.limit)
            fields["memory_limit"] = limit
        elif spec.share is not None:
            lim = engine_limits(info, ctx.device, spec.quantization, options=spec.options)
            limit, share = limit_for_share(lim, spec.share, info.config.top_k)
            fields.update(memory_limit=limit, limit_share_of_expert_bytes=share)
        else:
            fields["limit_share_of_expert_bytes"] = 1.0
        runner = EngineRunner(info, ctx, spec, limit)
        if spec.limit is not None:  # the share of the expert bytes this limit's cache holds
            fields["limit_share_of_expert_bytes"] = runner.engine.memory_plan()["cached_fraction"]
        fields["engine_options"] = runner.options
        fields["backend"] = runner.engine.backend  # what the engine runs (backend="auto" chooses it)
        fields["preload_seconds"] = runner.preload_seconds
    else:
        from . import baselines

        limit = None
        if spec.share is not None:  # the same limit as the engine row it is compared with
            lim = engine_limits(info, ctx.device, None)
            limit, _ = limit_for_share(lim, spec.share, info.config.top_k)
            fields["memory_limit"] = limit
        runner = baselines.open_baseline(spec.mode, info, ctx.device, ctx.scratch, limit,
                                         threads=spec.threads or ctx.model_threads)
        fields["limit_share_of_expert_bytes"] = runner.expert_share
    fields["resident"] = runner.resident
    fields["device_lru"] = getattr(runner, "device_lru", False)
    return runner, fields


def measure_mode(spec: ModeSpec, ctx: Context) -> dict:
    """One row: open, check, time, bound. Errors (tokens that differ, exceptions) become error rows."""
    info = ctx.models[spec.model]
    row: dict = {"name": spec.name, "mode": spec.mode, "model": spec.model, "device": torch.device(ctx.device).type,
                 "variant": spec.variant, "policy": spec.policy, "prefetch": spec.prefetch,
                 "quantization": spec.quantization or "none", "instruments": spec.instruments,
                 "threads": spec.threads or (ctx.compute_threads if spec.mode == "engine" else ctx.model_threads),
                 "prompt_tokens": len(info.prompts[0]), "decode_tokens": ctx.new_tokens - 1, "error": None,
                 "routing": spec.routing}
    t_open = time.perf_counter()
    runner = None
    is_reference = (spec.mode == "in_memory" or spec.reference) and not spec.instruments and not spec.threads
    try:
        runner, fields = open_runner(spec, ctx)
        row.update(fields)
        row["open_seconds"] = time.perf_counter() - t_open
        # the Triton decode kernels' rows have their own reference: the in-memory model decoding with the same
        # kernels. An engine row is checked against the reference of the backend it runs (backend="auto" chooses
        # it; with the instruments' hooks its decode steps run eager)
        kernels = (runner.engine.backend == "kernels" if spec.mode == "engine"
                   else bool(spec.options.get("kernels"))) and not spec.instruments
        ref_key = (spec.model, spec.quantization) + (("kernels",) if kernels else ()) + (
            (f"routing={spec.routing}",) if spec.routing else ())
        refs = ctx.references.setdefault(ref_key, {})
        # the check: greedy tokens of the check prompt, before any timing
        t0 = time.perf_counter()
        traces = _traces(spec, info, ctx.new_tokens)
        out = _generate(runner, info.prompts[0], ctx.new_tokens, traces[0])
        check_seconds = time.perf_counter() - t0
        if is_reference and 0 not in refs:
            refs[0] = out["tokens"]
            refs["by"] = "the resident engine's" if spec.mode == "engine" else "the in-memory model's"
        if 0 not in refs:
            raise RuntimeError(f"no in-memory reference for {ref_key}: the in-memory mode must run first")
        _check(out["tokens"], refs[0], spec.name)
        row["checked"] = "the reference itself" if is_reference else f"tokens equal to {refs['by']}" + (
            " (decoding with the same kernels)" if kernels else "")
        row["check_seconds"] = check_seconds
        # timed repeats, as many as the budget allows (at least one)
        left = ctx.deadline - time.perf_counter()
        n_rep = max(1, min(ctx.repeats, int(left / max(check_seconds, 1e-3)) if math.isfinite(left) else ctx.repeats))
        n_rep = min(n_rep, len(info.prompts) - 1)
        runs = []
        for r in range(1, n_rep + 1):
            out = _generate(runner, info.prompts[r], ctx.new_tokens, traces[r])
            if is_reference and r not in refs:
                refs[r] = out["tokens"]
            _check(out["tokens"], refs.get(r), f"{spec.name} (prompt {r})")
            runs.append(out)
        row.update(_summarise(runs, spec, info, ctx, runner))
    except TokensDiffer as e:
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001  an error row, the suite goes on
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception as e:  # noqa: BLE001
                row.setdefault("close_error", repr(e))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - t_open
    return row


def _generate(runner, ids: list[int], n: int, trace) -> dict:
    """One generation of the runner; under forced routing when ``trace`` (the model and the engine runners)."""
    return runner.generate(ids, n) if trace is None else runner.generate(ids, n, trace)


def _traces(spec: ModeSpec, info: ModelInfo, new_tokens: int) -> list:
    """The routing trace of each prompt of a row (None each for the model's own routing), checked to cover the
    generation (prompt + new_tokens - 1 positions)."""
    if not spec.routing:
        return [None] * len(info.prompts)
    traces = info.traces.get(spec.routing)
    if traces is None:
        raise RuntimeError(f"no recorded {spec.routing!r} routing for {info.key} (the suite records it at setup)")
    if len(traces) < len(info.prompts):
        raise RuntimeError(f"{len(traces)} {spec.routing} traces for {len(info.prompts)} prompts of {info.key}")
    for p, t in zip(info.prompts, traces):
        if t.num_positions < len(p) + new_tokens - 1:
            raise RuntimeError(f"the {spec.routing} trace covers {t.num_positions} positions, a generation of "
                               f"{new_tokens} tokens from {len(p)} needs {len(p) + new_tokens - 1}")
    return list(traces)


def _summarise(runs: list[dict], spec: ModeSpec, info: ModelInfo, ctx: Context, runner) -> dict:
    prefill = [r["stats"].prompt_tokens / r["stats"].prefill_seconds for r in runs]
    decode = [len(r["stats"].decode_token_seconds) / sum(r["stats"].decode_token_seconds) for r in runs]
    steps = sum(len(r["stats"].decode_token_seconds) for r in runs)
    wall = sum(sum(r["stats"].decode_token_seconds) for r in runs)
    d3, p3 = _stat3(decode), _stat3(prefill)
    out = {"repeats": len(runs), "prefill_tok_s": p3["median"], "prefill_tok_s_min": p3["min"],
           "prefill_tok_s_max": p3["max"], "decode_tok_s": d3["median"], "decode_tok_s_min": d3["min"],
           "decode_tok_s_max": d3["max"],
           "decode_ms_per_token_p50": 1e3 * statistics.median(t for r in runs for t in r["stats"].decode_token_seconds)}
    # link bytes and hit rate at decode
    link = "storage"
    if runner.kind == "engine":
        e = [r["engine"] for r in runs]
        req, hits = sum(x["requests"] for x in e), sum(x["hits"] for x in e)
        out["hit_rate"] = hits / req if req else float("nan")
        pre_req, pre_hits = sum(x["prefill_requests"] for x in e), sum(x["prefill_hits"] for x in e)
        out["prefill_hit_rate"] = pre_hits / pre_req if pre_req else float("nan")
        # the share of decode steps the chosen backend's decoder ran (1.0; below: steps fell back to eager)
        out["decode_steps_on_backend"] = (sum(x["backend_steps"] for x in e) / steps
                                          if steps and runner.engine.decoder is not None else float("nan"))
        out["bytes_read_per_token"] = sum(x["bytes_read"] for x in e) / steps
        out["wasted_bytes_per_token"] = sum(x["wasted_bytes"] for x in e) / steps
        out["neuron_sparsity"] = runs[-1]["neuron_sparsity"]
        if torch.device(ctx.device).type == "cuda":
            link = "h2d" if runner.options.get("host_cache") else "storage"
        # where the decode time went, ms per token
        fwd = sum(x["decode_seconds"] for x in e)
        parts = {"attention": sum(x["attention_seconds"] for x in e), "router": sum(x["router_seconds"] for x in e),
                 "io_wait": sum(x["io_wait_seconds"] for x in e),
                 "lm_head": sum(x["lm_head_seconds"] for x in e)}
        parts["expert_compute"] = sum(x["moe_seconds"] for x in e) - parts["io_wait"]
        parts["sampling"] = max(0.0, wall - fwd)
        parts["python_other"] = fwd - sum(v for k, v in parts.items() if k != "sampling")
        out["time_split_ms"] = {k: 1e3 * v / steps for k, v in parts.items()}
        out["io_wait_share"] = parts["io_wait"] / wall if wall else float("nan")
    elif runner.kind == "baseline":
        out["hit_rate"] = float("nan")
        out["bytes_read_per_token"] = sum(r["link_bytes_decode"] for r in runs) / steps
        link = runner.link
    else:
        out["hit_rate"] = float("nan")
        out["bytes_read_per_token"] = 0.0
        out["time_split_ms"] = {"total": 1e3 * wall / steps}
    out["link"] = link
    # the bound
    cfg = info.config
    fmt_bytes = runner_expert_nbytes(info, spec.quantization)
    context = len(info.prompts[0]) + (ctx.new_tokens) / 2
    qhead = getattr(runner.engine.state, "lm_head_quant", None) if runner.kind == "engine" else None
    if qhead is not None:  # the engine's LM head in a CPU kernel format (lm_head_format): its bytes, not bf16's
        out["lm_head_format"] = qhead.fmt
    # the engine's attention projections in Q4_0 (attention_format): their bytes, not bf16's
    aquant = getattr(runner.engine.state, "attention_quant", None) if runner.kind == "engine" else None
    if aquant is not None:
        out["attention_format"] = aquant["format"]
    mem = decode_memory_bytes(cfg, info.dtype.itemsize, fmt_bytes, context,
                              lm_head_nbytes=None if qhead is None else qhead.nbytes,
                              attention_nbytes=None if aquant is None else aquant["nbytes"])
    out["memory_bytes_per_token"] = mem["total"]
    out["memory_bytes_split"] = mem
    bw_mem, bw_link = bandwidths(ctx.ceilings, ctx.device, link)
    t_mem = mem["total"] / bw_mem
    t_io = out["bytes_read_per_token"] / bw_link if bw_link else float("nan")
    measured = 1.0 / out["decode_tok_s"]
    bound = max(t_mem, t_io if not math.isnan(t_io) else 0.0)
    out.update(t_mem_ms=1e3 * t_mem, t_io_ms=1e3 * t_io, bound_ms=1e3 * bound, measured_ms=1e3 * measured,
               bound_share=bound / measured, bw_mem=bw_mem, bw_link=bw_link)
    return out


def runner_expert_nbytes(info: ModelInfo, quantization: str | None) -> int:
    """Bytes of one expert's three matrices as the mode reads them (stored precision or the quantised record)."""
    from smallthinker_lab.engine.bundle import down_transposed_for, record_layout

    c = info.config
    fmt = quantization or {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[info.dtype]
    _, payload, _ = record_layout(c.hidden_size, c.moe_ffn_hidden_size, fmt, down_transposed_for(fmt))
    return payload


def bandwidths(ceilings: dict, device: str, link: str) -> tuple[float, float]:
    """(memory bandwidth, link bandwidth) in bytes/s for the bound: the medians measured in this run; for the
    host-to-GPU link the fastest of its copies (the link is shared with other tenants of the host, and a copy slowed
    by their traffic would loosen the bound: one run measured a median of 25 GB/s between copies at 54)."""
    cuda = torch.device(device).type == "cuda"
    mem = ceilings["hbm_copy"]["median"] if cuda else ceilings["memory_copy"]["median"]
    if link == "h2d":
        bw = ceilings["host_to_gpu"]["max"]
    elif link == "memory":  # a GPU baseline dry-run on a CPU: its "copies" are memory copies
        bw = ceilings["memory_copy"]["median"]
    else:
        bw = max(ceilings["storage_read"]["median"], ceilings.get("expert_reads", {}).get("median", 0.0))
    return mem, bw


def as_jsonable(x):
    """Rows and settings as JSON: NaN kept as null, paths and dtypes as strings."""
    if isinstance(x, dict):
        return {str(k): as_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_jsonable(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, (Path, torch.dtype)):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return as_jsonable(asdict(x))
    return x
