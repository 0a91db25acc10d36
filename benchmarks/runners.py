"""The benchmark's runners: one opened mode that generates greedy tokens and reports its stats, the model in
memory (:class:`ModelRunner`) or the offloading engine (:class:`EngineRunner`), with the helpers they share
(recording instruments, replaying a routing trace, compute threads). Used by ``benchmarks/bench_engine.py``
(which re-exports every name here).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smallthinker_lab.engine.bundle import GPU_KERNEL_FORMATS
from smallthinker_lab.engine.quant import kernel_experts
from smallthinker_lab.model.checkpoint import load_model
from smallthinker_lab.model.generate import GenerationStats, stream_tokens
from smallthinker_lab.model.kv_cache import KVCache

if TYPE_CHECKING:
    from .bench_engine import Context, ModelInfo, ModeSpec


class _Threads:
    def __init__(self, n: int | None) -> None:
        self.n, self.saved = n, None

    def __enter__(self):
        if self.n is not None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class ModelRunner:
    """The model in memory (``load_model``); ``expert_source``: a bundle whose (dequantised) experts replace the
    checkpoint's, the in-memory reference of a quantised engine."""

    kind = "model"

    def __init__(self, info: ModelInfo, device: str, threads: int | None = None, expert_bundle: Path | None = None,
                 instruments: bool = False, kernels: bool = False, lm_head_format: str | None = None,
                 attention_format: str | None = None) -> None:
        self.info, self.device, self.threads, self.instruments = info, device, threads, instruments
        self.model = load_model(info.ckpt, device=device)
        fmt = _bundle_format(expert_bundle, self.model.config) if expert_bundle is not None else None
        table = None
        if kernels and fmt in GPU_KERNEL_FORMATS:
            # the quantized Triton kernels on the bytes the engine's bundle holds: the checkpoint's experts
            # quantized with the same codec (kernel_experts), the model's own set to their dequantised values
            # for the prefill
            table = kernel_experts(self.model, fmt)
        elif expert_bundle is not None:
            _load_dequantised_experts(self.model, expert_bundle)
        self.resident = "every weight (load_model)"
        if lm_head_format is not None:  # the head an engine with this lm_head_format computes with, dequantised
            _load_dequantised_head(self.model, lm_head_format, expert_bundle)
            self.resident += f", LM head dequantised from {lm_head_format}"
        if attention_format is not None:  # the projections an engine with this attention_format computes with
            from smallthinker_lab.engine.attention_quant import dequantize_model

            if attention_format != "q4_0":
                raise ValueError(f"attention formats of a reference model: 'q4_0', not {attention_format!r}")
            with torch.no_grad():
                dequantize_model(self.model)
            self.resident += f", attention q/k/v/o dequantised from {attention_format}"
        self.kernels = None
        if kernels:  # decode through the Triton kernels (smallthinker_lab.kernels), one CUDA graph per step
            from smallthinker_lab.kernels import KernelRunner

            self.kernels = KernelRunner(self.model, experts=table)
            self.resident += ", Triton decode kernels" + (f" ({fmt} experts)" if table is not None else "")

    def generate(self, ids: list[int], n: int, trace=None) -> dict:
        m = self.model
        if self.kernels is not None:
            self.kernels.reset()
            step = self.kernels.step
        else:
            cache = KVCache(m.config, 1, m.dtype, self.device)
            step = lambda x: m(x, cache=cache).logits  # noqa: E731
        stats = GenerationStats()
        x = torch.tensor([ids], device=self.device)
        with _Threads(self.threads), torch.inference_mode(), _replaying(m, trace), _recording(m, self.instruments):
            _sync(self.device)
            tokens = list(stream_tokens(step, x, n, None, [], stats))
            _sync(self.device)
        return {"tokens": tokens, "stats": stats}

    def close(self) -> None:
        self.model = None
        gc.collect()


def _bundle_format(bundle_dir: Path, config) -> str:
    from smallthinker_lab.engine.bundle import open_bundle

    return open_bundle(bundle_dir, config).format


def _load_dequantised_experts(model, bundle_dir: Path) -> None:
    """Replace every expert weight of ``model`` by the bundle's decoded (dequantised) record, in the model's dtype:
    the in-memory model a quantised engine must match token for token."""
    from smallthinker_lab.engine.bundle import open_bundle
    from smallthinker_lab.engine.quant import get_format

    b = open_bundle(bundle_dir, model.config)
    codec = get_format(b.format)
    dtype = model.dtype
    with open(b.data_path, "rb") as f:
        for layer, block in enumerate(model.model.layers):
            for e, expert in enumerate(block.block_sparse_moe.experts):
                f.seek(b.offset(layer, e))
                rec = torch.frombuffer(bytearray(f.read(b.stride)), dtype=torch.uint8)
                mats = {m: rec[sp.offset:sp.offset + sp.nbytes] for m, sp in b.matrices.items()}
                for m in ("gate", "up", "down"):
                    w = codec.decode(mats[m], b.matrices[m].shape, dtype)
                    # down stored [F, H] (rows per neuron) or, in the CPU kernel formats, the model's [H, F]
                    w = w.t() if m == "down" and b.down_transposed else w
                    getattr(expert, m).weight = torch.nn.Parameter(
                        w.contiguous().to(model.device), requires_grad=False)


def _load_dequantised_head(model, fmt: str, folder: Path | None) -> None:
    """The model's LM head replaced by the weights of its ``fmt`` copy (engine/lm_head_quant.py, the engine's
    cache file in ``folder`` when there), in the model's dtype; a tied head is untied (the embedding stays)."""
    from smallthinker_lab.engine.lm_head_quant import dequantized_head

    w = model.lm_head.weight
    head = dequantized_head(w.detach().cpu(), fmt, w.dtype, folder)
    model.lm_head.weight = torch.nn.Parameter(head.to(w.device), requires_grad=False)


class _recording:
    """``record(target)`` with the default kinds, or nothing."""

    def __init__(self, target, on: bool) -> None:
        self.target, self.on, self.ctx = target, on, None

    def __enter__(self):
        if self.on:
            from smallthinker_lab.instruments import record

            self.ctx = record(self.target)
            return self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)


class _replaying:
    """``replay(target, trace)`` (forced routing from a recorded trace), or nothing when ``trace`` is None."""

    def __init__(self, target, trace) -> None:
        self.ctx = None
        if trace is not None:
            from smallthinker_lab.interventions import replay

            self.ctx = replay(target, trace)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


class EngineRunner:
    kind = "engine"

    def __init__(self, info: ModelInfo, ctx: Context, spec: ModeSpec, memory_limit: int | None) -> None:
        from smallthinker_lab.engine import Engine

        from .bench_engine import bundle_for

        self.info, self.device, self.spec = info, ctx.device, spec
        cuda = torch.device(ctx.device).type == "cuda"
        kw = dict(memory_limit=memory_limit, device=ctx.device, policy=spec.policy or "lru",
                  prefetch=True if spec.prefetch is None else spec.prefetch, quantization=spec.quantization,
                  bundle_dir=bundle_for(info, spec.quantization, spec.options), bypass_page_cache=ctx.bypass_page_cache,
                  compute_threads=None if cuda else (spec.threads or ctx.compute_threads), exact=True, progress=False)
        if cuda:
            kw["host_cache"] = ctx.host_cache and memory_limit is not None
            if kw["host_cache"]:
                kw["bypass_page_cache"] = False  # the pinned host copy is read once at open; the link is H2D
        kw.update(spec.options)
        self.options = {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}
        self.engine = Engine.from_pretrained(info.ckpt, **kw)
        self.preload_seconds = 0.0
        if memory_limit is None:  # "in memory": every expert read once now, not on first use
            t0 = time.perf_counter()
            _preload(self.engine)
            self.preload_seconds = time.perf_counter() - t0
        plan = self.engine.memory_plan()
        self.resident = (f"non-expert weights, KV cache, workspace and {plan['capacity_experts']} expert slots "
                         f"({plan['cached_fraction']:.0%} of the expert bytes)")
        g = self.engine.decoder  # the offloaded kernel decode with its LRU cache resolved on the device
        self.device_lru = bool(g is not None and g.kernels and plan["cached_fraction"] < 1 and g.device_lru())

    def generate(self, ids: list[int], n: int, trace=None) -> dict:
        e = self.engine
        stats = GenerationStats()
        tokens, snaps = [], []
        replays0 = getattr(e.decoder, "replays", 0)
        with _replaying(e, trace), _recording(e, self.spec.instruments):
            _sync(self.device)
            for i, t in enumerate(e.stream(ids, n, stop_tokens=[], stats=stats)):
                if i == 0:
                    _sync(self.device)
                    snaps.append(e.stats())  # after the prefill, before the first decode step
                tokens.append(t)
            _sync(self.device)
            snaps.append(e.stats())
        a, b = snaps
        d = {k: b[k] - a[k] for k in ("requests", "hits", "misses", "bytes_read", "io_wait_seconds",
                                        "router_seconds", "attention_seconds", "moe_seconds", "lm_head_seconds",
                                        "decode_seconds", "prefetch_wasted", "wasted_bytes", "speculative_reads")}
        d["prefill_requests"], d["prefill_hits"] = a["requests"], a["hits"]
        d["backend_steps"] = getattr(e.decoder, "replays", 0) - replays0  # decode steps the chosen decoder ran
        return {"tokens": tokens, "stats": stats, "engine": d, "neuron_sparsity": b["neuron_sparsity"]}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        gc.collect()


def _preload(engine) -> None:
    """Read every expert into the cache (an engine with no memory limit holds them all)."""
    cache, cfg = engine.cache, engine.config
    keys = [(layer, e) for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_experts)]
    batch = max(1, engine.io_threads * 2)
    for i in range(0, len(keys), batch):
        entries = [cache.request(k) for k in keys[i:i + batch]]
        for entry in entries:
            cache.wait(entry)
            cache.release(entry)
    if engine.transfer is not None:
        torch.cuda.synchronize()
    engine.reset_stats()
