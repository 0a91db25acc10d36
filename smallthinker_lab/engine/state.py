"""The engine's state as its decoders see it: model parts, KV cache, expert cache, slots, bundle, settings, the step
counter and the counters, with the few operations a decoder performs on them.

An ``Engine`` owns one :class:`EngineState` (``engine.state``) and hands it to its decoders (engine/decode/: the
eager one and the backend's); a decoder reads and updates the state only through the fields and methods below,
never the Engine. The Engine's own attributes of the same names (``engine.cache``, ``engine.kv``, ...) are this
state's fields (``StateFields``): one home, so a ``reopen()`` that opens a new cache, slots and KV cache is what
every decoder sees next.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # types only: the state holds the parts, it does not build them
    from ..model.hooks import HookRegistry
    from ..model.kv_cache import KVCache
    from .bundle import Bundle
    from .cache import Entry, ExpertCache, SlotArena
    from .io import CudaTransfer, ExpertReader
    from .memory import MemoryPlan

PHASES = ("prefill", "decode", "verify")  # verify: forward(all_logits=True) continuing a sequence


@dataclass
class Counters:
    """What the engine counts beside its expert cache's statistics; ``stats()`` and ``clocks()`` read both.
    Per-layer lists have one entry per layer; seconds are wall-clock seconds of ``time.perf_counter``."""

    phases: dict[str, float]  # "prefill_tokens", "prefill_seconds", "prefill_bytes", "decode_tokens", ...
    router_seconds: list[float]
    attention_seconds: list[float]
    moe_seconds: list[float]
    lookahead_predicted: list[int]  # experts the look-ahead named for each layer
    lookahead_correct: list[int]  # ... that the layer's own router then chose
    lm_head_seconds: float = 0.0
    lm_head_rows: int = 0  # vocabulary rows the sparse LM head computed (lm_head_predictor; screened head: the
    # rows computed exactly, per token row)
    lm_head_calls: int = 0
    neurons_active: int = 0  # expert neurons with a positive gate, summed over the experts computed
    neurons_total: int = 0
    peak_accounted: int = 0  # the largest resident_bytes() seen at a forward's end

    @classmethod
    def zero(cls, layers: int) -> Counters:
        phases = {f"{p}_{k}": 0 for p in PHASES for k in ("tokens", "seconds", "bytes")}
        phases.update(verify_forwards=0, rolled_back_tokens=0)
        return cls(phases, [0.0] * layers,
                   [0.0] * layers, [0.0] * layers, [0] * layers, [0] * layers)


@dataclass(eq=False)
class EngineState:
    """Everything a decoder works on. The Engine fills the fields while it opens (each is None until then) and
    replaces ``arena``, ``cache``, ``kv``, ``reader``, ``transfer`` and ``bundle`` on ``reopen()``; decoders
    compare those by identity to know when to rebuild their graphs."""

    # the model
    config: Any = None  # SmallThinkerConfig
    model: Any = None  # SmallThinkerForCausalLM with the non-expert weights (experts come from the cache)
    layers: list = field(default_factory=list)  # model.model.layers
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    hooks: HookRegistry | None = None
    lm_head_predictor: Any = None  # a sparse LM head's predictor, or None
    lm_head_format: str | None = None  # the LM head's CPU kernel format (None: the model's own head)
    lm_head_quant: Any = None  # its QuantizedHead (engine/lm_head_quant.py), or None
    attention_format: str | None = None  # "q4_0": the attention projections in Q4_0 (None: the model's own)
    attention_quant: dict | None = None  # what engine/attention_quant.load_or_quantize reported, or None
    non_expert_bytes: int = 0
    # the experts: on storage (bundle, reader), in slots (arena), by key (cache); CUDA: copies (transfer)
    bundle: Bundle | None = None
    plan: MemoryPlan | None = None
    arena: SlotArena | None = None
    cache: ExpertCache | None = None
    reader: ExpertReader | None = None
    transfer: CudaTransfer | None = None
    kv: KVCache | None = None
    # settings, as the engine was opened
    exact: bool = False  # the model's kernels on the model's layouts (down [H, F] in the slots)
    prefetch: bool = True
    lookahead: bool = False
    lookahead_early: bool = False  # route the next layer from this layer's input, not after attention
    zero_copy: bool = False  # the slots' bytes are the weights in the engine's dtype (views, no decoding)
    relayout_down: bool = False  # exact over a bundle whose down is [F, H]: each slot's down goes back to [H, F]
    sparse_reglu: bool | str = "auto"  # CPU experts: active neurons' rows only (True), dense (False), or by sparsity
    fill_value: float = float("-inf")  # the sparse LM head's logit for the rows its predictor skips
    prefill_chunk: int = 256  # tokens per eager forward chunk (a longer input runs in chunks of this many)
    # the run
    step: int = 0  # forward steps so far (the trace's step numbers)
    counters: Counters = field(default_factory=lambda: Counters.zero(0))
    unverified: list[Future] = field(default_factory=list)  # reads computed on before their checksum completed
    layout_pending: dict[int, Future] = field(default_factory=dict)  # exact on CUDA: slot -> copy, down not yet
    # in the model's layout

    # ------------------------------------------------------------------ steps and counters
    def next_step(self) -> int:
        """Start a forward step: its number, at which the cache counts the requests from now on."""
        self.step += 1
        self.cache.step = self.step
        return self.step

    def count(self, phase: str, tokens: int, seconds: float, nbytes: int) -> None:
        """A forward's (or a deferred decode step's) tokens, seconds and bytes read in ``phase`` ("prefill",
        "decode" or "verify"), and the peak of resident bytes."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        c = self.counters
        c.phases[phase + "_tokens"] += tokens
        c.phases[phase + "_seconds"] += seconds
        c.phases[phase + "_bytes"] += nbytes
        c.peak_accounted = max(c.peak_accounted, self.resident_bytes())

    def record_lookahead(self, layer: int, predicted, actual) -> None:
        """The look-ahead named ``predicted`` for ``layer``, whose router then chose ``actual`` (expert ids)."""
        predicted = list(predicted)
        self.counters.lookahead_predicted[layer] += len(predicted)
        self.counters.lookahead_correct[layer] += len(set(predicted) & set(actual))

    def reset_counters(self) -> None:
        """Zero the step counter and the counters (the cache's statistics are the cache's to reset)."""
        self.step = 0
        self.counters = Counters.zero(self.config.num_hidden_layers)
        self.counters.peak_accounted = self.resident_bytes()

    def resident_bytes(self) -> int:
        """What the engine holds now, by its own accounting: weights, KV cache as allocated, occupied cache slots,
        plus the planned workspace and staging (temporaries are not tracked one by one)."""
        kv = sum(layer.allocated_bytes for layer in self.kv.layers)
        return (self.non_expert_bytes + kv + self.cache.resident_bytes + self.plan.workspace_bytes
                + self.plan.staging_bytes)

    # ------------------------------------------------------------------ experts
    def holds_all_experts(self) -> bool:
        """Whether the expert cache has a slot for every expert of the model."""
        c = self.config
        return self.cache.capacity_experts >= c.num_hidden_layers * c.num_experts

    def settle(self, entry: Entry) -> None:
        """Before computing with an entry the cache handed out: a checksum still running is checked at the
        forward's end (``check_unverified``); on CUDA the compute stream waits for the copy into the slot (once),
        and an exact engine's down matrix goes back to the model's [H, F] layout in the slot (once, on first use)."""
        if entry.future is not None:  # computed before its checksum completed
            self.unverified.append(entry.future)
        if self.transfer is not None and entry.result is not None:  # the copy's event
            torch.cuda.current_stream(self.device).wait_event(entry.result)
            entry.result = None
        if self.layout_pending:
            fut = self.layout_pending.pop(entry.slot, None)
            if fut is not None:  # done: the cache waited for it before handing the entry out
                torch.cuda.current_stream(self.device).wait_event(fut.result())
                self._down_to_model_layout(entry.slot)

    def check_unverified(self) -> None:
        """Wait for the checksums of the experts computed before they were verified; the first failure is raised
        (an ExpertReadError naming layer and expert). The wait counts as the cache's I/O wait."""
        pending, self.unverified = self.unverified, []
        if not pending:
            return
        t0 = time.perf_counter()
        wait_futures(pending)
        self.cache.stats.io_wait_seconds += time.perf_counter() - t0
        for fut in pending:
            if fut.exception() is not None:
                raise fut.exception()

    def slot_bytes(self, slot: int) -> dict[str, torch.Tensor]:
        """The bytes (uint8) of each matrix of the record in ``slot``: {"gate", "up", "down"} (and the format's
        scales where it has them)."""
        buf = self.arena.tensor(slot)
        return {m: buf[sp.offset:sp.offset + sp.nbytes] for m, sp in self.bundle.matrices.items()}

    def _down_to_model_layout(self, slot: int) -> None:
        """exact (CUDA, compute stream, first use after the copy): the slot's down matrix [F, H] -> [H, F]."""
        Fh, H = self.bundle.matrices["gate"].shape
        flat = self.slot_bytes(slot)["down"].view(self.dtype)
        flat.copy_(flat.view(Fh, H).t().contiguous().view(-1))


class _OnState:
    """An Engine attribute whose one home is a field of the engine's state."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, engine, owner=None):
        if engine is None:
            return self
        state = engine.__dict__.get("state")
        if state is None:
            raise AttributeError(f"{type(engine).__name__} has no {self.name!r} yet: it is not open")
        return getattr(state, self.name)

    def __set__(self, engine, value) -> None:
        setattr(engine.__dict__["state"], self.name, value)


class StateFields:
    """Mixed into Engine: these attributes are fields of ``engine.state`` (set them after ``state`` exists)."""

    config = _OnState("config")
    model = _OnState("model")
    device = _OnState("device")
    dtype = _OnState("dtype")
    hooks = _OnState("hooks")
    lm_head_predictor = _OnState("lm_head_predictor")
    bundle = _OnState("bundle")
    plan = _OnState("plan")
    arena = _OnState("arena")
    cache = _OnState("cache")
    reader = _OnState("reader")
    transfer = _OnState("transfer")
    kv = _OnState("kv")
    exact = _OnState("exact")
    prefetch = _OnState("prefetch")
    lookahead = _OnState("lookahead")
    sparse_reglu = _OnState("sparse_reglu")
    fill_value = _OnState("fill_value")
    prefill_chunk = _OnState("prefill_chunk")
    _non_expert_bytes = _OnState("non_expert_bytes")
    _unverified = _OnState("unverified")
    _layout_pending = _OnState("layout_pending")
