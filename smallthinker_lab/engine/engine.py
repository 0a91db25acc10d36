"""The offloading engine: experts on storage, one shared expert cache under a memory limit, pre-attention prefetch.

Per layer (decode and prefill), with x the residual entering the layer:

1. router logits from the raw x (the model's own ``primary_router``), top-k: one host sync to read the ids;
2. prefetch on: the layer's experts are requested at once (misses start reading in the I/O threads);
3. attention (the model's modules and KV cache) runs while they load;
4. look-ahead (decode): layer l+1's router on layer l's post-attention residual names experts to read a layer
   early (speculative; accuracy and wasted bytes are counted); ``lookahead="early"`` applies it to layer l's
   input instead, before attention, for the attention's time more of lead;
5. MoE: prefetch off requests the experts only now (a conventional post-attention router); experts are computed
   as they become ready, resident ones first, then in the order their reads land; outputs are combined in
   ascending expert order (as the model's loop does), so results do not depend on I/O timing.

Checksums (CPU): an expert is computed as soon as its bytes land in its slot; its checksum runs meanwhile in the I/O
thread, and the forward waits for every such checksum before it returns: a mismatch raises there (naming layer and
expert) and no logits computed from the bad bytes leave the engine; the slot is not reused before its check ends.

Prefill routes all tokens of a chunk; if the union of their experts exceeds the cache, experts stream through
it in chunks (resident ones first; half the cache per chunk so the next chunk loads while one computes).
Only the non-expert weights are materialised from the checkpoint (a SmallThinkerForCausalLM built on the meta
device); attention, norms, rotary, router and KV cache are the model's code. Shape letters: N tokens, H hidden,
E experts, K active experts, F expert ffn size, V vocabulary.

CUDA: cache slots live in GPU memory and are filled on a separate stream (from a pinned host copy of the bundle
with ``host_cache=True``, else from storage through pinned staging buffers); the compute stream waits on one
event per expert. Decode needs one host sync per layer, to read the router's top-k ids (what to load); the
expert computation itself is sync-free (dense ReGLU on CUDA).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace

import torch

from ..model.checkpoint import CONFIG_FILE, check_finite_tensors, expected_tensors, resolve_path
from ..model.hooks import HookRegistry
from ..model.kv_cache import KVCache, kv_cache_bytes
from . import native
from .attention_quant import attention_nbytes
from .attention_quant import load_or_quantize as quantize_attention
from .attention_quant import resolve_format as resolve_attention_format
from .bundle import (
    _ST_FORMAT,
    FORMAT_DTYPE,
    GPU_KERNEL_FORMATS,
    RAW_FORMATS,
    BundleError,
    bundle_only_names,
    checkpoint_tensors,
    is_expert_tensor,
    open_bundle,
)
from .cache import Entry, ExpertCache, SlotArena
from .conversion import ensure_bundle, native_quantization
from .decode import make_decoder
from .generation import EngineBusy, EngineGeneration, GenerationResult  # noqa: F401  (re-exported)
from .io import CudaTransfer, ExpertReader
from .lm_head_quant import ScreenedHead, int4_row_block, load_or_quantize, resolve_format
from .loading import _load_predictor, _load_tokenizer, _probe_dtype, _resolve_dtype, load_non_experts
from .memory import MemoryPlan, itemsize, limit_for_share, parse_memory_limit, plan_memory, share_of, workspace_bytes
from .options import AUTO_QUANTIZED_NOTE, BACKENDS, EngineOptions, choose, static_reasons
from .quant import KERNEL_FORMATS, NATIVE_FORMATS, get_format
from .state import EngineState, StateFields
from .stats import EngineStats

CUDA_LIBRARY_WORKSPACE = 64 * 2**20  # cuBLAS / cuBLASLt workspaces the caching allocator hands out on first use


class Engine(StateFields, EngineGeneration, EngineStats):
    """Use :meth:`from_pretrained`. Thread model: one caller thread computes; I/O threads only read. A generation
    belongs to the thread that started it until it ends (exhausted, closed or garbage-collected); ``generate``,
    ``stream`` or ``forward`` from another thread meanwhile raises :class:`EngineBusy` (never a wrong token). In one
    thread, a newer generation supersedes an older, unfinished stream. Its parts and counters are ``state``
    (:class:`EngineState`), which the decoders work on: ``eager`` (the layer loop, every step it runs itself) and
    ``decoder`` (the graph or kernel backend's, None for eager)."""

    def __init__(self, checkpoint_dir: str | os.PathLike = "default", memory_limit: int | str | None = "512MiB",
                 device: str | torch.device = "cpu", *, policy: str = "lru", prefetch: bool = True,
                 quantization: str | None = None, backend: str = "auto", options: EngineOptions | None = None,
                 **option_fields) -> None:
        """See :meth:`from_pretrained`."""
        if str(checkpoint_dir).lower().endswith(".gguf"):  # a llama.cpp file: its folder, experts byte for byte
            from .gguf import materialise

            checkpoint_dir = materialise(checkpoint_dir, progress=option_fields.get("progress", True))
        opts, legacy = EngineOptions.resolve(options, option_fields)
        if legacy is not None:  # the old keyword cuda_graph=False/True/"fused"/"kernels"
            legacy = "fused" if legacy == "graph" and not opts.exact else legacy
            if backend not in ("auto", legacy):
                raise ValueError(f"cuda_graph and backend={backend!r} disagree: give backend only")
            backend = legacy
        dev = torch.device(device)
        dtype = _probe_dtype(checkpoint_dir, opts.dtype) if dev.type == "cuda" else None
        self._backend_reasons = static_reasons(dev, dtype, quantization, opts)
        self.requested_backend = backend
        self.backend = choose(backend, self._backend_reasons, quantization)
        if self.backend == "graph":
            opts = replace(opts, exact=True)  # the graphs of the model's own kernels
        o = opts
        self.options = opts
        self._setup(checkpoint_dir, memory_limit=memory_limit, device=device, policy=policy, prefetch=prefetch,
                    lookahead=o.lookahead, quantization=quantization, sparse_reglu=o.sparse_reglu,
                    bypass_page_cache=o.bypass_page_cache, io_threads=o.io_threads,
                    verify_checksums=o.verify_checksums, bundle_dir=o.bundle_dir, dtype=o.dtype,
                    max_context=o.max_context, prefill_chunk=o.prefill_chunk, lm_head_predictor=o.lm_head_predictor,
                    fill_value=o.fill_value, lm_head_format=o.lm_head_format,
                    attention_format=o.attention_format, host_cache=o.host_cache,
                    belady_trace=o.belady_trace, fault=o.fault, progress=o.progress,
                    compute_threads=o.compute_threads, exact=o.exact, check_finite=o.check_finite,
                    cuda_graph={"eager": False, "graph": True, "fused": "fused", "kernels": "kernels"}[self.backend])
        if opts.warm_start is not None:  # the cache filled by a warm-up, the counters zeroed
            from .warm import warm_start

            warm_start(self, opts.warm_start)

    def _setup(self, checkpoint_dir: str | os.PathLike, *, memory_limit: int | str | None = "512MiB",
                 device: str | torch.device = "cpu", policy: str = "lru", prefetch: bool = True,
                 lookahead: bool = False, quantization: str | None = None, sparse_reglu: bool | str = "auto",
                 bypass_page_cache: bool = False, io_threads: int = 4, verify_checksums: bool = True,
                 bundle_dir: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                 max_context: int | None = None, prefill_chunk: int = 256, lm_head_predictor=None,
                 fill_value: float = float("-inf"), lm_head_format: str | None = None,
                 attention_format: str | None = None, host_cache: bool = False,
                 belady_trace: Sequence | None = None,
                 fault: Callable | None = None, progress: bool = True, compute_threads: int | None = None,
                 exact: bool = False, cuda_graph: bool | str = False, check_finite: bool = False) -> None:
        self.state = EngineState()  # the home of the parts, settings and counters set below (engine/state.py)
        self.checkpoint_dir = resolve_path(checkpoint_dir)
        # checked as load_model checks it (file paths, config.json sizes, dtypes, shapes) before anything is built
        config, stored = checkpoint_tensors(self.checkpoint_dir)
        self.config = config
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                        or not 1 <= max_context <= config.max_position_embeddings):
            raise ValueError(f"max_context must be an integer in [1, {config.max_position_embeddings}] (the "
                             f"max_position_embeddings of {self.checkpoint_dir / CONFIG_FILE}), got {max_context!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if sparse_reglu not in ("auto", True, False):
            raise ValueError(f"sparse_reglu must be 'auto', True or False, got {sparse_reglu!r}")
        if exact and sparse_reglu is True:
            raise ValueError("exact=True computes experts densely with the model's kernels: it excludes "
                             "sparse_reglu=True")
        if cuda_graph not in (False, True, "fused", "kernels"):
            raise ValueError(f"cuda_graph must be False, True, 'fused' or 'kernels', got {cuda_graph!r}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph needs device='cuda'")
        if cuda_graph == "kernels":
            from ..kernels import unavailable_reason

            reason = unavailable_reason(self.device)
            if reason:
                raise RuntimeError(f"cuda_graph='kernels': {reason}")
            # the model's prefill and the model's [H, F] down layout, which the kernels read; int8 / q4_0 experts are
            # decoded for the prefill (not exact), their down in that layout too
            exact = quantization not in GPU_KERNEL_FORMATS
        self.exact = bool(exact)
        if self.exact:
            sparse_reglu = False
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if lookahead not in (False, True, "early"):
            raise ValueError(f"lookahead must be False, True or 'early', got {lookahead!r}")
        self.policy, self.prefetch, self.lookahead = policy, bool(prefetch), bool(lookahead)
        self.state.lookahead_early = lookahead == "early"  # the next layer routed from this layer's input
        self.sparse_reglu, self.prefill_chunk = sparse_reglu, int(prefill_chunk)
        self.bypass_page_cache, self.io_threads, self.verify_checksums = bypass_page_cache, io_threads, \
            verify_checksums
        self.host_cache, self.belady_trace, self.fault = host_cache, belady_trace, fault
        self.fill_value = fill_value
        if compute_threads is not None and compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {compute_threads}")
        self.compute_threads = compute_threads
        share = share_of(memory_limit)  # "NN%": the cache holds NN% of the experts (set with the plan below)
        self.memory_limit = None if share is not None else parse_memory_limit(memory_limit)

        # the non-expert tensors of the checkpoint and the bundle (converted on first use)
        names = [n for n in expected_tensors(config) if not is_expert_tensor(n)]
        absent = [n for n in names if n not in stored]
        if absent:
            raise FileNotFoundError(f"{self.checkpoint_dir}: non-expert tensor(s) missing, e.g. {absent[0]}")
        if check_finite:  # every stored tensor, experts included, before any conversion: CheckpointError on NaN/Inf
            check_finite_tensors({n: stored[n][0] for n in expected_tensors(config) if n in stored})
        self.dtype = _resolve_dtype(dtype, {stored[n][1] for n in names}, config)
        # exact reads down in the model's [H, F] layout: a new bundle stores it so (no transpose per read) when its
        # bytes are used as they are (a raw format of the engine's dtype)
        expert_fmt = quantization or next((_ST_FORMAT.get(stored[n][1]) for n in expected_tensors(config)
                                           if is_expert_tensor(n) and n in stored), None)
        if expert_fmt is None and bundle_only_names(self.checkpoint_dir) is not None:  # experts only in bundles,
            expert_fmt = _ST_FORMAT.get(stored[names[0]][1])  # written in the non-expert tensors' precision
        model_layout = self.exact and expert_fmt in RAW_FORMATS and FORMAT_DTYPE[expert_fmt] == self.dtype
        # the GPU decode kernels read int8 / q4_0 records as they are, down in the model's layout (quantized along F)
        model_layout = model_layout or (cuda_graph == "kernels" and quantization in GPU_KERNEL_FORMATS)
        # the native Q4_0 kernel on the CPU reads down in the model's layout too, from q4_0x8 records where it can
        native_q4 = quantization == "q4_0" and self.device.type == "cpu" and not self.exact and native.available()
        model_layout = model_layout or native_q4
        self.bundle_dir = ensure_bundle(self.checkpoint_dir, bundle_dir,
                                        native_quantization(self.checkpoint_dir, bundle_dir) if native_q4
                                        else quantization, progress, down_transposed=not model_layout)
        self.bundle = open_bundle(self.bundle_dir, config)
        if cuda_graph == "kernels" and self.bundle.format in GPU_KERNEL_FORMATS and self.bundle.down_transposed:
            # the decode kernels read a quantized record's down as stored, quantized along F in the model's layout
            raise BundleError(f"{self.bundle_dir} stores the {self.bundle.format} experts' down transposed ([F, H]); "
                              f"the decode kernels read it in the model's [H, F] layout: give a bundle converted "
                              f"with down_transposed=False, or no bundle_dir (the engine converts its own)")
        self.max_context = int(max_context or min(2048, config.max_position_embeddings))  # checked at the top

        # the memory plan, before anything large is allocated
        shapes = expected_tensors(config)
        non_expert = sum(math.prod(shapes[n]) for n in names) * itemsize(self.dtype)
        H, Fh = config.hidden_size, config.moe_ffn_hidden_size
        zero_copy = self.state.zero_copy = FORMAT_DTYPE.get(self.bundle.format) == self.dtype
        # torch's int4/int8 CPU kernels read the slot's bytes as they are (engine/cpu_kernels.py)
        cpu_kernel = self.bundle.format in KERNEL_FORMATS
        if cpu_kernel and (self.exact or self.device.type != "cpu"):
            raise ValueError(f"{self.bundle_dir}: format {self.bundle.format} runs torch's CPU kernels: it needs "
                             f"device='cpu' and exact=False")
        # decoded whole (or the native kernel's records): down [H, F]
        quant_hf = self.bundle.format in GPU_KERNEL_FORMATS + NATIVE_FORMATS and not self.exact
        if not self.bundle.down_transposed and not (self.exact and zero_copy) and not cpu_kernel \
                and not quant_hf:
            what = ("exact=False (the GPU decode kernels' layout)" if self.bundle.format in GPU_KERNEL_FORMATS
                    else f"exact=True with dtype {FORMAT_DTYPE.get(self.bundle.format)}")
            raise BundleError(f"{self.bundle_dir} stores down in the model's [H, F] layout, which only {what} "
                              f"reads; this engine needs a bundle converted with down_transposed=True (the default)")
        # exact over a bundle with down transposed: each read's down goes back to [H, F] in its slot
        self.state.relayout_down = self.exact and zero_copy and self.bundle.down_transposed
        isz = itemsize(self.dtype)
        # per expert computed: gathered up/down rows (sparse) or their products; decoded matrices plus the
        # decoder's temporaries (about 10 bytes per weight) when the slot's bytes are not usable as they are
        expert_ws = 2 * Fh * H * isz + (0 if zero_copy else Fh * H * (3 * isz + 10))
        if cpu_kernel:  # no gathered rows, no decoded matrices: the kernels' outputs are the activations
            expert_ws = 0
        cuda = self.device.type == "cuda"
        if cuda:
            expert_ws += CUDA_LIBRARY_WORKSPACE
        if cuda_graph is True and self.exact:  # the exact graph's static buffer of one layer's K expert records
            expert_ws += config.top_k * self.bundle.stride
        if cuda_graph == "kernels":  # the decode kernels' static activations and logits row
            from ..kernels import workspace_bytes as kernel_workspace

            expert_ws += kernel_workspace(config, self.dtype)
        self.lm_head_predictor = _load_predictor(lm_head_predictor, config, self.device)
        pred = self.lm_head_predictor
        if pred is not None:  # its weights are resident; the rows it selects are gathered per decode step
            non_expert += sum(p.numel() * p.element_size() for p in pred.parameters())
            rows = pred.top_m if pred.mode == "top_m" else config.vocab_size
            expert_ws += rows * H * isz
        # the LM head in a CPU kernel format (engine/lm_head_quant.py): its bytes are resident beside the model's
        # (a tied head stays the embedding; an untied bf16 head is kept too, for the model's own modules)
        self.state.lm_head_format = resolve_format(lm_head_format, self.bundle.format, self.device, self.exact,
                                                   (config.vocab_size, H))
        head_bytes = 0
        if self.state.lm_head_format == "screened" and pred is not None:
            raise ValueError("lm_head_format='screened' keeps the full head's argmax; lm_head_predictor computes only "
                             "the rows it predicts (no such guarantee): give one or the other")
        if self.state.lm_head_format is not None:  # screened: the int8 screen beside the model's head
            stored_as = "int8_cpu" if self.state.lm_head_format == "screened" else self.state.lm_head_format
            head_bytes = get_format(stored_as).nbytes((config.vocab_size, H))
            non_expert += head_bytes
            if pred is not None and self.state.lm_head_format == "q4_0_cpu":  # whole blocks of packed rows
                rows = pred.top_m if pred.mode == "top_m" else config.vocab_size  # gathered (0.625 bytes a weight)
                expert_ws += min(config.vocab_size, rows * (int4_row_block() or 1)) * H * 5 // 8
        # the attention projections in Q4_0 (engine/attention_quant.py): their Q4_0 bytes instead of the dtype's
        self.state.attention_format = resolve_attention_format(attention_format, self.state.lm_head_format,
                                                               self.device, self.exact, config)
        if self.state.attention_format is not None:
            non_expert += (attention_nbytes(config, self.state.attention_format)
                           - attention_nbytes(config, None, isz))
        ws = workspace_bytes(config, self.dtype, min(self.prefill_chunk, self.max_context), self.max_context,
                             expert_ws)
        kv = kv_cache_bytes(config, self.max_context, self.dtype)
        host = (self.bundle.file_size if host_cache else io_threads * self.bundle.stride) if cuda else 0
        # exact on CPU: each I/O thread transposes a read's down matrix through a scratch buffer of its own
        staging = io_threads * self.bundle.matrices["down"].nbytes if self.state.relayout_down and not cuda else 0
        self._io_local = threading.local()
        def plan(limit):
            return plan_memory(limit, device=self.device.type, non_expert=non_expert, kv_cache=kv, workspace=ws,
                               staging=staging, slot_bytes=self.bundle.stride,
                               num_experts_total=config.num_hidden_layers * config.num_experts, top_k=config.top_k,
                               max_context=self.max_context, host_bytes=host)

        if share is not None:
            self.memory_limit = limit_for_share(plan(None), share)
        self.plan: MemoryPlan = plan(self.memory_limit)

        self.model = load_non_experts(config, stored, names, self.dtype, self.device)
        self.hooks = HookRegistry()
        self.model.hooks = self.hooks
        self.tokenizer = _load_tokenizer(self.checkpoint_dir)
        self.state.layers = list(self.model.model.layers)
        self.state.attention_quant = None
        if self.state.attention_format is not None:  # quantized once (cached beside the bundle), bf16 dropped
            self.state.attention_quant = quantize_attention(self.model, self.state.attention_format, self.bundle_dir)
        params = {id(p): p for p in self.model.parameters()}
        if pred is not None:
            params.update({id(p): p for p in pred.parameters()})
        attn_bytes = self.state.attention_quant["nbytes"] if self.state.attention_quant is not None else 0
        self._non_expert_bytes = sum(t.numel() * t.element_size() for t in params.values()) + head_bytes + attn_bytes
        self.state.lm_head_quant = None
        if self.state.lm_head_format == "screened":  # the model's head, screened by its int8 copy
            w = self.model.lm_head.weight
            self.state.lm_head_quant = ScreenedHead(w, load_or_quantize(w, "int8_cpu", self.bundle_dir))
        elif self.state.lm_head_format is not None:  # quantized once, cached beside the bundle
            self.state.lm_head_quant = load_or_quantize(self.model.lm_head.weight, self.state.lm_head_format,
                                                        self.bundle_dir)
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread of the generation in progress
        self._forward_thread: int | None = None  # thread inside forward()
        self._generation = 0
        self._rollback: tuple[int, list] | None = None  # (start, saved ring entries) of the last all_logits forward
        self.reader = self.transfer = self.arena = self.cache = None
        self.eager = make_decoder(self.state, "eager")  # the layer loop: prefill, and decode steps of eager
        self._open_io()
        self.reset_stats()
        # the decode backend's decoder (engine/decode/): None for eager (self.eager runs every step)
        self.decoder = None if cuda_graph is False else make_decoder(self.state, {True: "graph", "fused": "fused",
                                                                                  "kernels": "kernels"}[cuda_graph])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = "default", memory_limit: int | str | None = "512MiB",
                        device: str | torch.device = "cpu", *, policy: str = "lru", prefetch: bool = True,
                        quantization: str | None = None, backend: str = "auto", options: EngineOptions | None = None,
                        **option_fields) -> Engine:
        """An engine over a checkpoint folder (or "default"), converting its experts to a bundle on first use.

        ``memory_limit``: bytes, "512MiB", "1.5GiB", "unlimited" or None: everything the engine keeps resident is
        counted (:meth:`memory_plan`); below the minimum working set raises MemoryLimitError. ``policy``: the expert
        cache's "lru", "lfu" or "belady"; ``prefetch``: request a layer's experts before its attention (the router
        runs first); ``quantization``: the bundle's expert format (e.g. "int8", "q4_0"; default the checkpoint's).
        ``backend``: "auto" (the fastest that can run: the Triton kernels on a CUDA GPU, else eager), "kernels",
        "fused", "graph" or "eager"; ``engine.backend`` and ``engine.explain()`` say what runs and why.
        ``options`` (:class:`EngineOptions`) or its fields as keywords: the rarely used knobs.
        """
        return cls(path, memory_limit, device, policy=policy, prefetch=prefetch, quantization=quantization,
                   backend=backend, options=options, **option_fields)

    def _open_io(self) -> None:
        """Slots, reader threads, cache and KV cache; what close() releases and reopen() makes again."""
        plan, b = self.plan, self.bundle
        self.arena = SlotArena(plan.capacity_experts, b.stride, self.device)
        self.reader = ExpertReader(b, self.io_threads, self.bypass_page_cache, self.verify_checksums, self.fault)
        try:
            if self.device.type == "cuda":
                self.transfer = CudaTransfer(self.reader, self.device, self.host_cache, self.io_threads)
            self.cache = ExpertCache(plan.expert_cache_bytes, b.stride, self.policy, loader=self._load,
                                     future_trace=self.belady_trace, arena=self.arena,
                                     on_evict=self._on_evict if self.transfer is not None else None)
        except BaseException:
            self.reader.close()
            raise
        self.kv = KVCache(self.config, 1, self.dtype, self.device, capacity=self.max_context)
        self.eager.reset()  # its views of the slots: of these
        self._layout_pending: dict[int, object] = {}  # exact on CUDA: slot -> load future, not yet transposed
        self._closed = False

    def _load(self, key: tuple[int, int], slot: int):
        layer, expert = key
        if self.transfer is not None:
            fut = self.transfer.load(layer, expert, self.arena.tensor(slot), slot)
            if self.state.relayout_down:  # transposed on first use, after the copy's event (kept per slot:
                self._layout_pending[slot] = fut  # cache.drain() may settle the future before any use)
            return fut
        if self.state.relayout_down:  # the transpose needs verified bytes: the read's future covers both
            return self.reader.submit(layer, expert, self.arena.buffer(slot),
                                      then=lambda: self._down_to_model_layout_host(slot))
        # the expert may be computed as soon as its bytes land; its checksum runs meanwhile and is checked before
        # the forward returns (a mismatch raises then, naming layer and expert, and no logits leave)
        landed = Future() if self.reader.verify_checksums else None
        fut = self.reader.submit(layer, expert, self.arena.buffer(slot), landed=landed)
        fut.landed = landed
        return fut

    def _down_to_model_layout_host(self, slot: int) -> None:
        """exact (CPU, I/O thread, after the checksum): the slot's down matrix [F, H] -> [H, F] in place. numpy,
        not torch: a torch op in an I/O thread would start its own OpenMP team beside the compute thread."""
        import numpy as np

        sp, (Fh, H) = self.bundle.matrices["down"], self.bundle.matrices["gate"].shape
        word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize(self.dtype)]
        view = np.frombuffer(self.arena.buffer(slot), dtype=np.uint8, count=sp.nbytes, offset=sp.offset).view(word)
        scratch = getattr(self._io_local, "scratch", None)  # one per I/O thread, counted in the plan's staging
        if scratch is None or scratch.size != view.size or scratch.dtype != view.dtype:
            scratch = self._io_local.scratch = np.empty(view.size, dtype=view.dtype)
        src, dst = view.reshape(Fh, H), scratch.reshape(H, Fh)
        for f0 in range(0, Fh, 64):  # in blocks of 64 rows: about 4x faster than one strided copy here
            dst[:, f0:f0 + 64] = src[f0:f0 + 64].T
        view[:] = scratch

    def _on_evict(self, entry: Entry) -> None:
        self.transfer.fence(entry.slot)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Drain reads in flight, join the I/O threads, close the bundle's file descriptor. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if getattr(self, "decoder", None) is not None:
            self.decoder.reset()  # its graphs and buffers hold views of the slots
        try:
            if self.cache is not None:
                self.cache.drain()
        finally:
            if self.reader is not None:
                self.reader.close()  # joins the I/O threads: no read or copy is started after this
            if self.transfer is not None:
                self.transfer.close()  # waits for copies in flight, then unpins the host buffers
                self.transfer = None
            self.eager.reset()  # its views of the slots are dropped
            if self.arena is not None:
                self.arena.close()

    def reopen(self) -> Engine:
        """Open the I/O side again after close() (an empty expert cache; counters kept)."""
        if not self._closed:
            return self
        bundle = open_bundle(self.bundle_dir, self.config)  # validated again: it may have changed meanwhile
        if (bundle.stride, bundle.format) != (self.bundle.stride, self.bundle.format):
            raise BundleError(f"{self.bundle_dir} changed format since the engine was opened: open a new engine")
        self.bundle = bundle
        self._open_io()
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        p = self.plan
        return (f"Engine({self.checkpoint_dir}, device={self.device.type}, limit="
                f"{'unlimited' if p.limit is None else f'{p.limit / 2**20:.0f}MiB'}, cache={p.capacity_experts}/"
                f"{self.config.num_hidden_layers * self.config.num_experts} experts, policy={self.policy}, "
                f"prefetch={self.prefetch}, lookahead={self.lookahead}, format={self.bundle.format}, "
                f"backend={self.backend})")

    # ------------------------------------------------------------------ memory
    def explain(self):
        """Each backend (fastest first): whether it can run for this engine, whether it is the one in use, and why
        not (a pandas DataFrame). For the backend in use, ``reason`` says when decode steps run eager right now
        (an instrument's hooks are registered, the cache does not hold what the graph needs). ``table.attrs`` names
        the formats the weights compute in: ``experts`` (the bundle's), ``lm_head`` and ``attention`` ("model": the
        model's own modules; "q4_0": the native Q4_0 kernel, engine/attention_quant.py)."""
        import pandas as pd

        rows = []
        for name in BACKENDS:
            why = self._backend_reasons.get(name)
            if why is None and name != self.backend:
                why = ("not chosen: graph and fused are used when asked for by name" if name in ("graph", "fused")
                       and self.requested_backend == "auto" else f"not chosen: backend={self.requested_backend!r}")
                if name == "kernels" and self.requested_backend == "auto" and self.bundle.format in GPU_KERNEL_FORMATS:
                    why = AUTO_QUANTIZED_NOTE
            if name == self.backend and name != "eager":
                why = self._step_fallback()
            rows.append({"backend": name, "can_run": self._backend_reasons.get(name) is None,
                         "chosen": name == self.backend, "reason": why})
        table = pd.DataFrame(rows, dtype=object).astype({"can_run": bool, "chosen": bool})  # object: None stays
        # the weights' formats beside the backends: the experts', the LM head's and the attention projections'
        table.attrs.update(experts=self.bundle.format, lm_head=self.lm_head_description(),
                           attention=self.attention_description())
        return table

    def _step_fallback(self) -> str | None:
        """Why a decode step of the chosen graph backend would run eager now, or None."""
        if self.decoder is None or self.decoder.usable():
            return None
        if self.hooks.edits:
            replayed = " (a routing replay alone stays on the kernels)" if self.backend == "kernels" else ""
            return ("decode steps run eager while edit hooks are registered (hooks() / intervene()): the graph and "
                    f"kernel decoders cannot run them{replayed}")
        if len(self.hooks):
            return "decode steps run eager while hooks are registered (an instrument records)"
        if self.backend == "kernels":
            return ("decode steps run eager: the kernel decode needs the experts in its layout (bf16, or int8 / q4_0, "
                    "down in the model's [H, F]) and, offloaded, prefetch=True")
        return "decode steps run eager: the graphs need every expert resident and no look-ahead"

    def memory_plan(self, as_frame: bool = False):
        """The split of the memory limit: a dict (bytes), or a DataFrame with ``as_frame=True``."""
        return self.plan.to_frame() if as_frame else self.plan.as_dict()


    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits (1, 1, V) of the last token of ``input_ids`` (1, T), continuing after the KV cache; with
        ``all_logits=True`` the logits (1, T, V) of every position (one forward scoring T tokens, as speculative
        decoding verifies a draft; :meth:`truncate` rolls the KV cache back past rejected ones). Such a forward
        that continues a sequence counts in the ``verify_*`` counters of :meth:`stats`, not as prefill or decode."""
        self._check_open()
        me = threading.get_ident()
        with self._lock:
            self._refuse_other_thread(me, "forward()")
            self._forward_thread = me
        try:
            return self._forward(input_ids, bool(all_logits))
        finally:
            self._forward_thread = None

    def _refuse_other_thread(self, me: int, what: str) -> None:
        """Under self._lock: EngineBusy when a thread other than ``me`` generates or runs a forward."""
        for other, doing in ((self._owner, "a generation"), (self._forward_thread, "a forward")):
            if other is not None and other != me:
                raise EngineBusy(f"{what} on an engine that another thread (id {other}) is using for {doing}: one "
                                 f"engine serves one generation at a time; wait for it, or open a second engine")

    def _forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        ids = input_ids.to(self.device).view(1, -1)
        T = ids.shape[1]
        start = self.kv.seq_len
        if start + T > self.max_context:
            raise ValueError(f"sequence too long: {start + T} tokens exceeds max_context={self.max_context}")
        # what truncate() needs to roll these positions back (entries of full sliding rings they overwrite)
        self._rollback = (start, self.kv.save_overwritable(T)) if all_logits else None
        observed = self.hooks.active("forward")
        self.cache.hook = self._cache_event if self.hooks.active("cache") else None
        log = self.cache.log = [] if self.hooks.active("cache_events") else None  # the forward's events, one call
        phase = "verify" if all_logits and start > 0 else "prefill" if T > 1 or start == 0 else "decode"
        bytes0 = self.cache.stats.bytes_read
        threads = torch.get_num_threads()
        want = self.compute_threads or threads
        native_step = T == 1 and self.eager.experts.native  # the native kernel takes the threads, torch one
        if (1 if native_step else want) != threads:
            torch.set_num_threads(1 if native_step else want)
        t0 = time.perf_counter()
        with native.calls_use_threads(want if native_step else None):
            try:
                graph_step = T == 1 and self.decoder is not None and self.decoder.usable()
                if graph_step:
                    logits = self.decoder.decode(ids, start)  # every expert resident, no hook: one graph step
                else:
                    if self.decoder is not None:
                        self.decoder.flush()  # the last kernel step's counters before this step's
                    logits = self.eager.forward(ids, start, all_logits, verify=phase == "verify")
                self.state.check_unverified()
            except BaseException:
                self.state.unverified.clear()
                self.cache.drain()  # an error or interruption: settle reads in flight, release pins
                raise
            finally:
                self.cache.log = None  # events of a failed forward are not delivered
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
        self.state.count(phase, T, 0.0, self.cache.stats.bytes_read - bytes0)
        if phase == "verify":
            self.state.counters.phases["verify_forwards"] += 1
        if graph_step:
            self.decoder.wait()  # the bookkeeping above ran while the device computed the step
        dt = time.perf_counter() - t0
        self.state.counters.phases[phase + "_seconds"] += dt
        if log:
            self.hooks.fire("cache_events", events=log, nbytes=self.cache.expert_nbytes)
        if observed:
            self.hooks.fire("forward", phase=phase, start=start, tokens=T, cache=self.kv, seconds=dt, input_ids=ids)
        return logits

    __call__ = forward


    def _cache_event(self, event: str, key: tuple[int, int], nbytes: int) -> None:
        self.hooks.fire("cache", step=self.state.step, layer=key[0], expert=key[1], event=event, nbytes=nbytes)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed: call engine.reopen() or open a new one")
