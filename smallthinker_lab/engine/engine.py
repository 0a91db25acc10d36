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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.checkpoint import FLOAT_DTYPES, expected_tensors, resolve_path
from ..model.config import SmallThinkerConfig
from ..model.generate import GenerationStats, SamplingConfig, stream_tokens
from ..model.hooks import HookRegistry
from ..model.kv_cache import KVCache, kv_cache_bytes
from ..model.layers import RotaryEmbedding
from ..model.model import SmallThinkerForCausalLM
from . import sparse
from .bundle import (
    _ST_FORMAT,
    FORMAT_DTYPE,
    RAW_FORMATS,
    BundleError,
    checkpoint_tensors,
    ensure_bundle,
    is_expert_tensor,
    open_bundle,
)
from .cache import Entry, ExpertCache, SlotArena, layer_chunks
from .io import CudaTransfer, ExpertReader
from .memory import MemoryPlan, itemsize, parse_memory_limit, plan_memory, workspace_bytes
from .quant import get_format

CUDA_LIBRARY_WORKSPACE = 64 * 2**20  # cuBLAS / cuBLASLt workspaces the caching allocator hands out on first use


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    prompt_tokens: int
    stats: GenerationStats


@dataclass
class _Work:
    """One layer's experts for one forward chunk: request order, chunks, token rows and top-k slot per expert."""

    layer: int
    chunks: list[list[int]]
    rows: dict[int, tuple[torch.Tensor | None, torch.Tensor | int]]  # expert -> (token rows or None, k slot)
    double: bool = False  # chunk c + 1 is requested while chunk c computes
    requested: list[list[Entry] | None] = field(default_factory=list)


class Engine:
    """Use :meth:`from_pretrained`. Thread model: one caller thread computes; I/O threads only read."""

    _watch_one = False  # set per forward: someone listens to "expert" (one event per expert)
    _moe_seen: tuple[list, list, list] | None = None  # set per forward when someone listens to "moe"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, memory_limit: int | str | None = "512MiB",
                 device: str | torch.device = "cpu", policy: str = "lru", prefetch: bool = True,
                 lookahead: bool = False, quantization: str | None = None, sparse_reglu: bool | str = "auto",
                 bypass_page_cache: bool = False, io_threads: int = 4, verify_checksums: bool = True,
                 bundle_dir: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                 max_context: int | None = None, prefill_chunk: int = 256, lm_head_predictor=None,
                 fill_value: float = float("-inf"), host_cache: bool = False, belady_trace: Sequence | None = None,
                 fault: Callable | None = None, progress: bool = True, compute_threads: int | None = None,
                 exact: bool = False, cuda_graph: bool | str = False) -> None:
        self.checkpoint_dir = resolve_path(checkpoint_dir)
        # checked as load_model checks it (file paths, config.json sizes, dtypes, shapes) before anything is built
        config, stored = checkpoint_tensors(self.checkpoint_dir)
        self.config = config
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
            exact = True  # the model's prefill and the model's [H, F] down layout, which the kernels read
        self.exact = bool(exact)
        if self.exact:
            sparse_reglu = False
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if lookahead not in (False, True, "early"):
            raise ValueError(f"lookahead must be False, True or 'early', got {lookahead!r}")
        self.policy, self.prefetch, self.lookahead = policy, bool(prefetch), bool(lookahead)
        self._la_early = lookahead == "early"  # route the next layer from this layer's input, not after attention
        self.sparse_reglu, self.prefill_chunk = sparse_reglu, int(prefill_chunk)
        self.bypass_page_cache, self.io_threads, self.verify_checksums = bypass_page_cache, io_threads, \
            verify_checksums
        self.host_cache, self.belady_trace, self.fault = host_cache, belady_trace, fault
        self.fill_value = fill_value
        if compute_threads is not None and compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {compute_threads}")
        self.compute_threads = compute_threads
        self.memory_limit = parse_memory_limit(memory_limit)

        # the non-expert tensors of the checkpoint and the bundle (converted on first use)
        names = [n for n in expected_tensors(config) if not is_expert_tensor(n)]
        absent = [n for n in names if n not in stored]
        if absent:
            raise FileNotFoundError(f"{self.checkpoint_dir}: non-expert tensor(s) missing, e.g. {absent[0]}")
        self.dtype = _resolve_dtype(dtype, {stored[n][1] for n in names}, config)
        # exact reads down in the model's [H, F] layout: a new bundle stores it so (no transpose per read) when its
        # bytes are used as they are (a raw format of the engine's dtype)
        expert_fmt = quantization or next((_ST_FORMAT.get(stored[n][1]) for n in expected_tensors(config)
                                           if is_expert_tensor(n) and n in stored), None)
        model_layout = self.exact and expert_fmt in RAW_FORMATS and FORMAT_DTYPE[expert_fmt] == self.dtype
        self.bundle_dir = ensure_bundle(self.checkpoint_dir, bundle_dir, quantization, progress,
                                        down_transposed=not model_layout)
        self.bundle = open_bundle(self.bundle_dir, config)
        self.max_context = int(max_context or min(2048, config.max_position_embeddings))
        if self.max_context > config.max_position_embeddings:
            raise ValueError(f"max_context {self.max_context} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")

        # the memory plan, before anything large is allocated
        shapes = expected_tensors(config)
        non_expert = sum(math.prod(shapes[n]) for n in names) * itemsize(self.dtype)
        H, Fh = config.hidden_size, config.moe_ffn_hidden_size
        self._codec = get_format(self.bundle.format)
        self._zero_copy = FORMAT_DTYPE.get(self.bundle.format) == self.dtype
        if not self.bundle.down_transposed and not (self.exact and self._zero_copy):
            raise BundleError(f"{self.bundle_dir} stores down in the model's [H, F] layout, which only exact=True "
                              f"with dtype {FORMAT_DTYPE[self.bundle.format]} reads; this engine needs a bundle "
                              f"converted with down_transposed=True (the default)")
        # exact over a bundle with down transposed: each read's down goes back to [H, F] in its slot
        self._relayout_down = self.exact and self._zero_copy and self.bundle.down_transposed
        isz = itemsize(self.dtype)
        # per expert computed: gathered up/down rows (sparse) or their products; decoded matrices plus the
        # decoder's temporaries (about 10 bytes per weight) when the slot's bytes are not usable as they are
        expert_ws = 2 * Fh * H * isz + (0 if self._zero_copy else Fh * H * (3 * isz + 10))
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
        ws = workspace_bytes(config, self.dtype, min(self.prefill_chunk, self.max_context), self.max_context,
                             expert_ws)
        kv = kv_cache_bytes(config, self.max_context, self.dtype)
        host = (self.bundle.file_size if host_cache else io_threads * self.bundle.stride) if cuda else 0
        # exact on CPU: each I/O thread transposes a read's down matrix through a scratch buffer of its own
        staging = io_threads * self.bundle.matrices["down"].nbytes if self._relayout_down and not cuda else 0
        self._io_local = threading.local()
        self.plan: MemoryPlan = plan_memory(
            self.memory_limit, device=self.device.type, non_expert=non_expert, kv_cache=kv, workspace=ws,
            staging=staging, slot_bytes=self.bundle.stride,
            num_experts_total=config.num_hidden_layers * config.num_experts, top_k=config.top_k,
            max_context=self.max_context, host_bytes=host)

        self.model = self._load_non_experts(stored, names)
        self.hooks = HookRegistry()
        self.model.hooks = self.hooks
        self.tokenizer = _load_tokenizer(self.checkpoint_dir)
        self._layers = list(self.model.model.layers)
        params = {id(p): p for p in self.model.parameters()}
        if pred is not None:
            params.update({id(p): p for p in pred.parameters()})
        self._non_expert_bytes = sum(t.numel() * t.element_size() for t in params.values())
        self._lock = threading.Lock()
        self._unverified: list[Future] = []  # read futures of experts computed before their checksum completed
        self._generation = 0
        self.reader = self.transfer = self.arena = self.cache = None
        self._open_io()
        self.reset_stats()
        self._graph = None  # cuda_graph=True: the graph decode (engine/cuda_graph.py), built on first use
        if cuda_graph:
            from .cuda_graph import GraphDecoder

            self._graph = GraphDecoder(self, fused=cuda_graph == "fused" or not self.exact,
                                       kernels=cuda_graph == "kernels")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = "default", memory_limit: int | str | None = "512MiB",
                        device: str | torch.device = "cpu", policy: str = "lru", prefetch: bool = True,
                        lookahead: bool = False, quantization: str | None = None, sparse_reglu: bool | str = "auto",
                        bypass_page_cache: bool = False, io_threads: int = 4, verify_checksums: bool = True,
                        bundle_dir: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                        **kwargs) -> Engine:
        """An engine over a checkpoint folder (or "default"), converting its experts to a bundle on first use.

        ``memory_limit``: bytes, "512MiB", "1.5GiB", "unlimited" or None; everything the engine keeps resident
        is counted (see :meth:`memory_plan`); below the minimum working set raises MemoryLimitError.
        Other keywords: ``max_context`` (KV cache reserved; default min(2048, max_position_embeddings)),
        ``prefill_chunk`` (tokens per prefill forward), ``lm_head_predictor`` (path or LMHeadPredictor: sparse
        LM head at decode), ``fill_value`` (logit of rows it skips, default -inf), ``host_cache`` (CUDA: keep a
        pinned host copy of the bundle), ``belady_trace`` (the future trace for policy="belady"), ``fault``
        (test hook of the reader), ``progress``, ``compute_threads`` (torch intra-op threads while the engine
        computes, restored after each forward; on a small CPU, leaving a core to the I/O threads avoids OpenMP
        stalls when reads land during compute: on the busy 2-core development machine one compute thread was
        several times faster per expert than two), ``exact`` (compute every expert with the model's own kernels:
        dense ReGLU, ``F.linear`` on the down matrix in the model's [H, F] layout: a bundle converted for it
        stores down so (``expert_bundle-down_hf``, raw formats), a bundle with down transposed has it transposed
        in its cache slot once per read (CPU: in the I/O thread; CUDA: on first use), so that greedy tokens are
        bit-identical to the in-memory model in bf16/fp16 too; the default path (sparse ReGLU, down rows gathered
        from the stored [F, H] layout) equals the model only up to rounding, which a model with near-tied router
        or LM-head logits turns into different tokens), ``cuda_graph`` (CUDA: decode steps replay CUDA graphs,
        with no host sync inside the step, when every expert of the model is resident (a cache of all of them, e.g.
        ``memory_limit=None``: the first graph step reads any missing one), no hook is registered and neither an
        LM-head predictor nor look-ahead is used; else the eager path runs. With ``exact=True`` the graphs run the
        model's kernels (bit-identical tokens; attention eager between per-layer graphs); with ``exact=False``,
        or ``cuda_graph="fused"`` whatever ``exact`` says, one graph of fused kernels (torch.compile) per step,
        equal to the model up to rounding; ``cuda_graph="kernels"`` (implies ``exact=True``): one graph per step
        of the Triton decode kernels of ``smallthinker_lab.kernels``, five per layer, reading the experts in place
        from their slots: tokens equal to the in-memory model decoding with the same kernels
        (``smallthinker_lab.kernels.KernelRunner``), and to the eager model up to rounding. Counters stay exact:
        every expert of a graph step is a hit. See engine/cuda_graph.py).
        """
        return cls(path, memory_limit=memory_limit, device=device, policy=policy, prefetch=prefetch,
                   lookahead=lookahead, quantization=quantization, sparse_reglu=sparse_reglu,
                   bypass_page_cache=bypass_page_cache, io_threads=io_threads, verify_checksums=verify_checksums,
                   bundle_dir=bundle_dir, dtype=dtype, **kwargs)  # exact=..., compute_threads=...: see above

    def _load_non_experts(self, stored: dict, names: list[str]) -> SmallThinkerForCausalLM:
        from safetensors import safe_open

        config = self.config
        with _skip_init(), torch.device("meta"):
            model = SmallThinkerForCausalLM(config)
        for layer in model.model.layers:
            layer.block_sparse_moe.experts = nn.ModuleList()  # experts live in the bundle, never here
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(stored[n][0], []).append(n)
        state = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for n in file_names:
                    t = f.get_tensor(n)
                    if t.dtype != self.dtype or t.device != self.device:
                        t = t.to(device=self.device, dtype=self.dtype)
                    state[n] = t
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected or missing:
            raise RuntimeError(f"non-expert weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(self.device)
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"non-expert tensors left on the meta device: {left[:3]}")
        return model.eval().requires_grad_(False)

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
        self._views: list[tuple | None] = [None] * plan.capacity_experts
        self._layout_pending: dict[int, object] = {}  # exact on CUDA: slot -> load future, not yet transposed
        self._closed = False

    def _load(self, key: tuple[int, int], slot: int):
        layer, expert = key
        if self.transfer is not None:
            fut = self.transfer.load(layer, expert, self.arena.tensor(slot), slot)
            if self._relayout_down:  # transposed on first use, after the copy's event (kept per slot:
                self._layout_pending[slot] = fut  # cache.drain() may settle the future before any use)
            return fut
        if self._relayout_down:  # the transpose needs verified bytes: the read's future covers both
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

    def _down_to_model_layout_device(self, slot: int) -> None:
        """exact (CUDA, compute stream, first use after the copy): the slot's down matrix [F, H] -> [H, F]."""
        Fh, H = self.bundle.matrices["gate"].shape
        flat = self._slot_bytes(slot)["down"].view(self.dtype)
        flat.copy_(flat.view(Fh, H).t().contiguous().view(-1))

    def _on_evict(self, entry: Entry) -> None:
        self.transfer.fence(entry.slot)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Drain reads in flight, join the I/O threads, close the bundle's file descriptor. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if getattr(self, "_graph", None) is not None:
            self._graph.reset()  # its graphs and buffers hold views of the slots
        try:
            if self.cache is not None:
                self.cache.drain()
        finally:
            if self.reader is not None:
                self.reader.close()  # joins the I/O threads: no read or copy is started after this
            if self.transfer is not None:
                self.transfer.close()  # waits for copies in flight, then unpins the host buffers
                self.transfer = None
            self._views = []
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
                f"prefetch={self.prefetch}, lookahead={self.lookahead}, format={self.bundle.format})")

    # ------------------------------------------------------------------ memory
    def memory_plan(self, as_frame: bool = False):
        """The split of the memory limit: a dict (bytes), or a DataFrame with ``as_frame=True``."""
        return self.plan.to_frame() if as_frame else self.plan.as_dict()

    def resident_bytes(self) -> int:
        """What the engine holds now, by its own accounting: weights, KV cache as allocated, occupied cache slots,
        plus the planned workspace and staging (temporaries are not tracked one by one)."""
        kv = sum(layer.allocated_bytes for layer in self.kv.layers)
        return (self._non_expert_bytes + kv + self.cache.resident_bytes + self.plan.workspace_bytes
                + self.plan.staging_bytes)

    @property
    def trace(self) -> list[tuple[int, int, int]]:
        """Demand requests since the last reset: (step, layer, expert), in request order."""
        if self._graph is not None:
            self._graph.flush()
        return self.cache.trace

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, V) of the last token of ``input_ids`` (1, T), continuing after the KV cache."""
        self._check_open()
        ids = input_ids.to(self.device).view(1, -1)
        T = ids.shape[1]
        start = self.kv.seq_len
        if start + T > self.max_context:
            raise ValueError(f"sequence too long: {start + T} tokens exceeds max_context={self.max_context}")
        observed = self.hooks.active("forward")
        self.cache.hook = self._cache_event if self.hooks.active("cache") else None
        log = self.cache.log = [] if self.hooks.active("cache_events") else None  # the forward's events, one call
        self._timing = self.hooks.active("timing")
        self._watch_one = self.hooks.active("expert")  # "expert": one event per expert; "moe": one per layer
        self._moe_seen = ([], [], []) if self.hooks.active("moe") else None
        phase = "prefill" if T > 1 or start == 0 else "decode"
        bytes0 = self.cache.stats.bytes_read
        threads = torch.get_num_threads()
        if self.compute_threads is not None and self.compute_threads != threads:
            torch.set_num_threads(self.compute_threads)
        t0 = time.perf_counter()
        try:
            graph_step = T == 1 and self._graph is not None and self._graph.usable()
            if graph_step:
                logits = self._graph.decode(ids, start)  # every expert resident, no hook: one graph step
            else:
                if self._graph is not None:
                    self._graph.flush()  # the last kernel step's counters before this step's
                for c0 in range(0, T, self.prefill_chunk):
                    x = self._run(ids[:, c0:c0 + self.prefill_chunk], start + c0)
                # exact: the LM head over every position of the (last) chunk, as the model's forward does, so
                # that the last row comes from the same kernel (a GEMM over T rows may round differently)
                logits = self._lm_head(x if self.exact and x.shape[1] > 1 else x[:, -1:], decode=T == 1)[:, -1:]
            self._check_unverified()
        except BaseException:
            self._unverified.clear()
            self.cache.drain()  # an error or interruption: settle reads in flight, release pins
            raise
        finally:
            self.cache.log = None  # events of a failed forward are not delivered
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        self._count(phase, T, 0.0, self.cache.stats.bytes_read - bytes0)
        if graph_step:
            self._graph.wait()  # the bookkeeping above ran while the device computed the step
        dt = time.perf_counter() - t0
        self._stats[phase + "_seconds"] += dt
        if log:
            self.hooks.fire("cache_events", events=log, nbytes=self.cache.expert_nbytes)
        if observed:
            self.hooks.fire("forward", phase=phase, start=start, tokens=T, cache=self.kv, seconds=dt)
        return logits

    __call__ = forward

    def _count(self, phase: str, tokens: int, seconds: float, nbytes: int) -> None:
        """A forward's tokens, seconds and bytes read in the engine's counters, and the peak of resident bytes."""
        st = self._stats
        st[phase + "_tokens"] += tokens
        st[phase + "_seconds"] += seconds
        st[phase + "_bytes"] += nbytes
        self._peak_accounted = max(self._peak_accounted, self.resident_bytes())

    def _run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        self._step += 1
        self.cache.step = self._step
        positions = torch.arange(start, start + T, device=self.device)
        x = self.model.model.embed_tokens(ids)  # (1, T, H)
        rope = self.model.model.rotary(positions, x.dtype) if any(self.config.rope_layout) else None
        predicted: list[int] | None = None
        for i, layer in enumerate(self._layers):
            x, predicted = self._layer(i, layer, x, positions, rope, predicted)
        return x

    def _layer(self, i: int, layer, x: torch.Tensor, positions: torch.Tensor, rope, predicted: list[int] | None):
        cfg, hooks, clock = self.config, self.hooks, time.perf_counter
        moe = layer.block_sparse_moe
        t0 = clock()
        logits = moe.route(x).reshape(-1, cfg.num_experts)  # (N, E), raw residual, before attention
        ids, weights = moe.select(logits)  # (N, K)
        weights = weights.to(x.dtype)
        if hooks.active("router"):
            hooks.fire("router", layer=i, logits=logits, topk_ids=ids, topk_weights=weights)
        work = self._plan(i, ids)  # reads the ids: one host sync
        if predicted is not None:
            correct = len(set(predicted) & set(work.rows))
            self._la_predicted[i] += len(predicted)
            self._la_correct[i] += correct
        if self.prefetch:
            self._request_next(work)
        nxt = None
        ahead = self.lookahead and x.shape[1] == 1 and i + 1 < len(self._layers)
        if ahead and self._la_early:  # from this layer's input: a whole layer of lead
            nxt = self._speculate_next(i, x)
        t1 = clock()
        x = x + layer.self_attn(layer.input_layernorm(x), positions, rope, self.kv[i])
        t2 = clock()
        if ahead and not self._la_early:  # from the residual after attention: the MoE's time of lead
            nxt = self._speculate_next(i, x)
        t3 = clock()
        u = layer.post_attention_layernorm(x)
        x = x + self._moe(work, u, weights).view_as(x)
        t4 = clock()
        self._t_router[i] += (t1 - t0) + (t3 - t2)
        self._t_attn[i] += t2 - t1
        self._t_moe[i] += t4 - t3
        if self._timing:
            for part, s in (("router", (t1 - t0) + (t3 - t2)), ("attention", t2 - t1), ("moe", t4 - t3)):
                hooks.fire("timing", step=self._step, layer=i, part=part, seconds=s)
        return x, nxt

    def _speculate_next(self, i: int, x: torch.Tensor) -> list[int]:
        """Look-ahead: layer i+1's router on the residual x; its top-k start reading (cache.speculate)."""
        cfg = self.config
        nxt_logits = self._layers[i + 1].block_sparse_moe.route(x).reshape(-1, cfg.num_experts)
        nxt = torch.topk(nxt_logits, cfg.top_k, dim=-1).indices[0].tolist()
        for e in sorted(nxt):
            self.cache.speculate((i + 1, e))
        return nxt

    def _plan(self, layer: int, ids: torch.Tensor) -> _Work:
        """Which experts this layer needs, in request order, split into chunks the cache can hold."""
        N, K = ids.shape
        if N == 1:
            experts = ids[0].tolist()
            rows = {e: (None, k) for k, e in enumerate(experts)}
            order = sorted(experts)
        else:  # group tokens per expert as the model's MoE loop does (slot-major)
            mask = F.one_hot(ids, self.config.num_experts).permute(2, 1, 0)  # (E, K, N)
            order = torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist()
            rows = {}
            for e in order:
                slot, token = torch.where(mask[e])
                rows[e] = (token, slot)
        cap = self.cache.capacity_experts
        if len(order) > cap:  # streamed through the cache in chunks: resident experts first
            resident = [e for e in order if (layer, e) in self.cache]
            order = resident + [e for e in order if (layer, e) not in self.cache]
        chunks, double = layer_chunks(order, cap)
        return _Work(layer, chunks, rows, double)

    def _request_next(self, work: _Work) -> None:
        """Request the next chunk of the layer's experts (pins them; misses start reading)."""
        c = len(work.requested)
        if c < len(work.chunks):
            work.requested.append([self.cache.request((work.layer, e), ahead=self.prefetch) for e in work.chunks[c]])

    def _moe(self, work: _Work, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        H = self.config.hidden_size
        u = u.reshape(-1, H)  # (N, H)
        double = work.double
        outs: dict[int, torch.Tensor] = {}
        cache = self.cache
        for c in range(len(work.chunks)):
            if len(work.requested) <= c:
                self._request_next(work)
            if double and len(work.requested) == c + 1:
                self._request_next(work)  # the next chunk loads while this one computes
            for entry in cache.as_completed(work.requested[c]):
                self._settle(entry)
                e = entry.key[1]
                token, slot = work.rows[e]
                x_e = u if token is None else u[token]  # (n, H)
                out = self._expert(entry, x_e, token)
                w = weights[:, slot, None] if token is None else weights[token, slot, None]
                outs[e] = out * w
                cache.release(entry)
        seen = self._moe_seen
        if seen is not None and seen[0]:
            self.hooks.fire("moe", layer=work.layer, experts=seen[0], token_index=seen[1], gates=seen[2])
            self._moe_seen = ([], [], [])
        y = torch.zeros_like(u)
        for e in sorted(outs):  # the model's combine order: ascending expert id
            token = work.rows[e][0]
            if token is None:
                y.add_(outs[e])
            else:
                y.index_add_(0, token, outs[e])
        return y

    def _settle(self, entry: Entry) -> None:
        """Before computing with an entry the cache handed out: a checksum still running is checked at the
        forward's end; on CUDA the compute stream waits for the copy into the slot (once), and an exact engine's
        down matrix goes back to the model's [H, F] layout in the slot (once, the first time it is used)."""
        if entry.future is not None:  # computed before its checksum completed
            self._unverified.append(entry.future)
        if self.transfer is not None and entry.result is not None:  # the copy's event
            torch.cuda.current_stream(self.device).wait_event(entry.result)
            entry.result = None
        if self._layout_pending:
            fut = self._layout_pending.pop(entry.slot, None)
            if fut is not None:  # done: the cache waited for it before handing the entry out
                torch.cuda.current_stream(self.device).wait_event(fut.result())
                self._down_to_model_layout_device(entry.slot)

    def _expert(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
        """One expert's ReGLU from its slot (settled by ``_settle``): views of the slot's bytes for the stored
        dtype, decoded otherwise."""
        layer, expert = entry.key
        codec, dtype = self._codec, self.dtype
        shape = self.bundle.matrices["gate"].shape
        watch = self._watch_one or self._moe_seen is not None
        if self._zero_copy:
            wg, wu, wd = self._slot_views(entry.slot)  # views of the slot's bytes, no copy
        else:
            mat = self._slot_bytes(entry.slot)
        if self.exact:  # the model's ops on the model's layouts (wd: [H, F]), bit-identical results
            if not self._zero_copy:
                wg, wu, wd = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up", "down"))
                wd = wd.t().contiguous()
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g)
            if self.device.type == "cpu":
                self._neurons_active += int(sparse.active_neurons(g).numel())
                self._neurons_total += shape[0]
            return F.linear(F.linear(x, wu) * F.relu(g), wd)
        if self.device.type == "cuda":  # dense, no host sync
            if not self._zero_copy:
                wg, wu, wd = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up", "down"))
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g)
            return (F.linear(x, wu) * F.relu(g)) @ wd
        if self._zero_copy:
            g = None
            if watch:  # the gate the hook sees is the one the kernel uses: computed once
                g = F.linear(x, wg)
                self._fire_expert(layer, expert, token, g)
            if self.sparse_reglu is False:
                y, n_active = sparse.reglu_dense(x, wg, wu, wd, gate=g)
            else:
                y, n_active = sparse.reglu(x, wg, wu, wd, min_sparsity=-1.0 if self.sparse_reglu is True else None,
                                           gate=g)
        else:  # quantised (or another dtype): decode the gate, then only the active rows of up and down
            wg = codec.decode(mat["gate"], shape, dtype)
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g)
            idx = torch.nonzero((g > 0).any(dim=0)).flatten()
            n_active = int(idx.numel())
            min_sp = (sparse.default_min_sparsity(dtype, x.shape[0], shape[0] * shape[1]) if self.sparse_reglu == "auto"
                      else (-1.0 if self.sparse_reglu else 1.0))
            if 1.0 - n_active / shape[0] > min_sp:
                wu_r = codec.decode_rows(mat["up"], shape, idx, dtype)
                wd_r = codec.decode_rows(mat["down"], shape, idx, dtype)
                y, _ = sparse.reglu_dense(x, wg.index_select(0, idx), wu_r, wd_r)
            else:
                y, _ = sparse.reglu_dense(x, wg, codec.decode(mat["up"], shape, dtype),
                                          codec.decode(mat["down"], shape, dtype))
        self._neurons_active += n_active
        self._neurons_total += shape[0]
        return y

    def _slot_bytes(self, slot: int) -> dict[str, torch.Tensor]:
        buf = self.arena.tensor(slot)
        return {m: buf[sp.offset:sp.offset + sp.nbytes] for m, sp in self.bundle.matrices.items()}

    def _slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down^T) as [F, H] views of a slot, made once per slot: they stay valid whatever it holds."""
        views = self._views[slot]
        if views is None:
            mat, shape = self._slot_bytes(slot), self.bundle.matrices["gate"].shape
            views = tuple(self._codec.decode(mat[m], shape, self.dtype) for m in ("gate", "up", "down"))
            if self.exact:  # the down matrix is kept in the model's [H, F] layout
                views = (views[0], views[1], mat["down"].view(self.dtype).view(shape[1], shape[0]))
            self._views[slot] = views
        return views

    def _fire_expert(self, layer: int, expert: int, token: torch.Tensor | None, g: torch.Tensor) -> None:
        # token_index: rows of this forward chunk that the expert received (None in "moe": every row)
        seen = self._moe_seen
        if seen is not None:
            seen[0].append(expert), seen[1].append(token), seen[2].append(g)
        if self._watch_one:
            self.hooks.fire("expert", layer=layer, expert=expert, token_index=token if token is not None else
                            torch.arange(g.shape[0], device=g.device), gate=g)

    def _lm_head(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        h = self.model.model.norm(x)  # (1, 1, H)
        pred = self.lm_head_predictor
        if decode and pred is not None:  # rows the predictor skips get fill_value (default -inf: never sampled)
            from .lm_head import sparse_lm_head

            logits, rows = sparse_lm_head(h.reshape(1, -1), self.model.lm_head.weight, pred,
                                          fill_value=self.fill_value)
            logits = logits.view(1, 1, -1)
            self._lm_rows += rows
            self._lm_calls += 1
        else:
            logits = self.model.lm_head(h)  # (1, 1, V)
        dt = time.perf_counter() - t0
        self._t_lm_head += dt
        if self._timing:
            self.hooks.fire("timing", step=self._step, layer=-1, part="lm_head", seconds=dt)
        return logits

    def _cache_event(self, event: str, key: tuple[int, int], nbytes: int) -> None:
        self.hooks.fire("cache", step=self._step, layer=key[0], expert=key[1], event=event, nbytes=nbytes)

    def _check_unverified(self) -> None:
        """Wait for the checksums of the experts this forward computed before they were verified; the first failure
        is raised (an ExpertReadError naming layer and expert)."""
        pending, self._unverified = self._unverified, []
        if not pending:
            return
        t0 = time.perf_counter()
        wait_futures(pending)
        self.cache.stats.io_wait_seconds += time.perf_counter() - t0
        for fut in pending:
            if fut.exception() is not None:
                raise fut.exception()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed: call engine.reopen() or open a new one")

    # ------------------------------------------------------------------ generation
    def encode(self, prompt) -> torch.Tensor:
        """Token ids (1, T) of a str (needs a tokenizer), a list of ids or a tensor."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"a text prompt needs a tokenizer, and {self.checkpoint_dir} has none "
                                 f"(tokenizer.json or vocab.json + merges.txt): pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = prompt
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
               stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time (batch 1). Checks the prompt before any work."""
        ids = self.encode(prompt)
        self._check_open()
        n = ids.shape[1]
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n + max_new_tokens - 1 > self.max_context:
            raise ValueError(f"prompt too long: {n} prompt tokens + {max_new_tokens} new tokens need "
                             f"{n + max_new_tokens - 1} positions, more than max_context={self.max_context} "
                             f"(open the engine with a larger max_context, or shorten the prompt)")
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        stop = self.config.eos_ids() if stop_tokens is None else stop_tokens
        return self._stream(ids, max_new_tokens, sampling, stop, stats)

    def _stream(self, ids, max_new_tokens, sampling, stop, stats) -> Iterator[int]:
        with self._lock:
            self._generation += 1
            me = self._generation
        self.kv.reset()
        self.cache.drain()

        def step(x: torch.Tensor) -> torch.Tensor:
            if self._generation != me:
                raise RuntimeError("this generation was superseded by a newer generate()/stream() on the engine")
            return self.forward(x)

        if sampling.temperature == 0 and self._graph is not None and self._graph.pipelines():
            it = self._stream_ahead(ids.to(self.device), max_new_tokens, stop, stats, me)
        else:
            it = stream_tokens(step, ids.to(self.device), max_new_tokens, sampling, stop, stats)
        try:
            yield from it
        finally:
            it.close()
            if self._generation == me and not self._closed:
                self.cache.drain()
                if self._graph is not None:
                    self._graph.flush()

    def _stream_ahead(self, ids, max_new_tokens: int, stop, stats, me: int) -> Iterator[int]:
        """Greedy generation through the decode kernels, the device one step ahead of the host
        (``GraphDecoder.decode_ahead``); the same tokens and the same counters as ``stream_tokens`` over
        ``forward``, with the same timing of each step (from resuming to its token on the host)."""
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = ids.shape[1]
        stop = {int(t) for t in stop}
        t0 = time.perf_counter()
        token = torch.argmax(self.forward(ids)[:, -1], dim=-1)  # the prefill, as stream_tokens
        tok = int(token.item())
        stats.prefill_seconds = time.perf_counter() - t0
        stats.new_tokens += 1
        yield tok
        if tok in stop or max_new_tokens == 1:
            return

        def check():
            if self._generation != me:
                raise RuntimeError("this generation was superseded by a newer generate()/stream() on the engine")

        with closing(self._graph.decode_ahead(token, max_new_tokens - 1, stop, check)) as steps:
            for tok, dt in steps:
                stats.new_tokens += 1
                stats.decode_token_seconds.append(dt)
                stats.decode_seconds += dt
                yield tok

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_tokens: Sequence[int] | None = None) -> GenerationResult:
        """Generate and return the tokens (prompt excluded), their text when a tokenizer exists, and timings."""
        stats = GenerationStats()
        tokens = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stats))
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, stats.prompt_tokens, stats)

    # ------------------------------------------------------------------ stats
    def reset_stats(self, clear_cache: bool = False) -> None:
        """Zero the counters and the trace; ``clear_cache=True`` also empties the expert cache (a replay of the
        trace through simulate() then starts from the same empty cache as the engine did)."""
        L = self.config.num_hidden_layers
        if getattr(self, "_graph", None) is not None:
            self._graph.flush()
        if clear_cache:
            self.cache.clear()
        self.cache.reset_stats()
        self._step = 0
        self._stats = {k: 0 for k in ("prefill_tokens", "prefill_seconds", "prefill_bytes", "decode_tokens",
                                      "decode_seconds", "decode_bytes")}
        self._t_router, self._t_attn, self._t_moe = [0.0] * L, [0.0] * L, [0.0] * L
        self._t_lm_head = 0.0
        self._lm_rows = self._lm_calls = 0
        self._la_predicted, self._la_correct = [0] * L, [0] * L
        self._neurons_active = self._neurons_total = 0
        self._peak_accounted = self.resident_bytes()

    def stats(self) -> dict:
        if self._graph is not None:
            self._graph.flush()
        c, s = self.cache.stats, self._stats
        predicted, correct = sum(self._la_predicted), sum(self._la_correct)
        tokens = s["prefill_tokens"] + s["decode_tokens"]
        return {
            "requests": c.requests, "hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate,
            "bytes_read": c.bytes_read, "bytes_read_per_token": c.bytes_read / tokens if tokens else float("nan"),
            "decode_bytes_read_per_token": (s["decode_bytes"] / s["decode_tokens"] if s["decode_tokens"]
                                            else float("nan")),
            "evictions": c.evictions, "prefetch_issued": c.prefetch_issued, "prefetch_used": c.prefetch_used,
            "prefetch_wasted": c.prefetch_wasted, "wasted_bytes": c.wasted_bytes,
            "speculative_reads": c.speculative_reads, "lookahead_predicted": predicted,
            "lookahead_correct": correct, "lookahead_accuracy": correct / predicted if predicted else float("nan"),
            "io_wait_seconds": c.io_wait_seconds, "router_seconds": sum(self._t_router),
            "attention_seconds": sum(self._t_attn), "moe_seconds": sum(self._t_moe),
            "lm_head_seconds": self._t_lm_head,
            "lm_head_rows_per_token": self._lm_rows / self._lm_calls if self._lm_calls else float("nan"),
            "prefill_tokens": s["prefill_tokens"], "prefill_seconds": s["prefill_seconds"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] else float("nan"),
            "decode_tokens": s["decode_tokens"], "decode_seconds": s["decode_seconds"],
            "decode_tok_s": s["decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else float("nan"),
            "neuron_sparsity": (1 - self._neurons_active / self._neurons_total if self._neurons_total
                                else float("nan")),
            "capacity_experts": self.cache.capacity_experts, "expert_nbytes": self.cache.expert_nbytes,
            "resident_bytes": self.resident_bytes(), "peak_accounted_bytes": self._peak_accounted,
            "memory_limit": self.plan.limit, "policy": self.policy, "prefetch": self.prefetch,
            "lookahead": self.lookahead, "format": self.bundle.format, "device": self.device.type,
        }

    def stats_frame(self):
        """One row per layer (hits, misses, hit rate, I/O wait, router/attention/MoE seconds, look-ahead
        accuracy), then an "all" row (a pandas DataFrame indexed by layer)."""
        import pandas as pd

        per = self.cache.stats.per_layer
        rows = []
        for i in range(self.config.num_hidden_layers):
            h, m, w = per[i] if i in per else (0, 0, 0.0)
            rows.append({"layer": i, "hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else float("nan"),
                         "bytes_read": m * self.cache.expert_nbytes, "io_wait_seconds": w,
                         "router_seconds": self._t_router[i], "attention_seconds": self._t_attn[i],
                         "moe_seconds": self._t_moe[i], "lookahead_predicted": self._la_predicted[i],
                         "lookahead_correct": self._la_correct[i]})
        total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}
        n = total["hits"] + total["misses"]
        rows.append({"layer": "all", **total, "hit_rate": total["hits"] / n if n else float("nan")})
        df = pd.DataFrame(rows)
        df["lookahead_accuracy"] = df["lookahead_correct"] / df["lookahead_predicted"].where(
            df["lookahead_predicted"] > 0)
        return df.set_index("layer")


# ------------------------------------------------------------------ helpers
@contextmanager
def _skip_init():
    """Build modules without running their random init (on the meta device it only costs: torch routes
    ``normal_`` through its reference implementations, whose first use imports torch._dynamo, seconds)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def _resolve_dtype(dtype, stored_kinds: set[str], config: SmallThinkerConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        value = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
        return value
    if len(stored_kinds) == 1 and next(iter(stored_kinds)) in FLOAT_DTYPES:
        return FLOAT_DTYPES[next(iter(stored_kinds))]
    return getattr(torch, config.torch_dtype)


def _load_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    from ..model.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def _load_predictor(predictor, config: SmallThinkerConfig, device: torch.device):
    """An LMHeadPredictor, or one read from a file (safetensors / .pt flat tensor), on the engine's device."""
    if predictor is None:
        return None
    if isinstance(predictor, (str, os.PathLike)):
        from .lm_head import load_predictor

        predictor = load_predictor(predictor, config.hidden_size, config.vocab_size)
    if (predictor.hidden, predictor.vocab) != (config.hidden_size, config.vocab_size):
        raise ValueError(f"the LM-head predictor is for hidden {predictor.hidden} / vocab {predictor.vocab}, the model "
                         f"has {config.hidden_size} / {config.vocab_size}")
    return predictor.to(device).eval()
