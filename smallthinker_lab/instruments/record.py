"""``record(target, kinds=...)``: a scoped recorder on the hook points of the model or the engine.

    with smallthinker_lab.record(model, kinds=("experts", "kv")) as rec:
        smallthinker_lab.generate(model, ids, max_new_tokens=8)
    rec["layers.3.moe.topk_ids"]            # (N, K) int64
    rec.to_dataframe("experts")

The recorder subscribes to its target's ``hooks`` (see ``smallthinker_lab.model.hooks`` for the points and their
payloads) and removes exactly its own hooks in ``finally``, also when the block raises.

Steps. The ``forward`` point fires at the END of every forward, after that forward's ``router``, ``moe``,
``cache`` and ``timing`` events. The recorder therefore buffers the events of the forward in flight and files them
when ``forward`` arrives: a forward that starts at position 0 opens new sequences (one per batch row) as step 0,
every later forward is step 1, 2, ... of those sequences. A forward may route its tokens in chunks (the engine's
prefill): the router events of one layer are concatenated in order and expert token indices are offset by their
chunk's first row. Events that arrive after the last ``forward`` (an exception in the middle of a forward, or an
engine that prefetches after its forward returned) are dropped, and the recording's ``notes`` say how many.

Cost. Hooks append references and python ints; nothing in them synchronises a GPU. Top-k ids and weights stay on
the model's device (copied to the host once, when the recording is read). Expert
gates are reduced to the neuron counters in batches (every ``Recorder.FLUSH_STEPS`` forwards, after each prefill,
and when read: one ``cat``, a few reductions and one ``index_add_`` on the model's device); the router tensors of
those forwards are concatenated into one block per layer at the same time, so few tensor objects stay alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .names import FORMAT_VERSION, KINDS  # noqa: F401  (re-exported)
from .recording import Recording

DENSE_LACKS = ("experts", "neurons", "cache")  # the kinds a dense model (DenseForCausalLM) has nothing for
DENSE_KINDS = tuple(k for k in KINDS if k not in DENSE_LACKS)


def _layer_set(layers, num_layers: int) -> list[int]:
    """None | int | "layers.3" | list / tuple / range / set of those | callable(layer) -> bool  ->  sorted layer ids."""
    every = range(num_layers)
    if layers is None:
        return list(every)
    if callable(layers):
        return [i for i in every if layers(i)]
    if isinstance(layers, (int, str)):
        layers = [layers]
    out = set()
    for item in layers:
        if isinstance(item, str):
            name = item.removeprefix("layers.")
            if not name.isdigit():
                raise ValueError(f"layer filter {item!r}: expected an int or 'layers.N'")
            item = int(name)
        if not 0 <= int(item) < num_layers:
            raise ValueError(f"layer {item} is out of range: the model has {num_layers} layers")
        out.add(int(item))
    return sorted(out)


def _full_set(full, kinds: Sequence[str]) -> set[str]:
    """full=True keeps raw tensors of every kind that has them; full=("experts",) only router logits."""
    if full is True:
        return {k for k in kinds if k in ("experts", "neurons")}
    if not full:
        return set()
    full = {full} if isinstance(full, str) else set(full)
    unknown = full - {"experts", "neurons"}
    if unknown:
        raise ValueError(f"full= takes 'experts' (router logits) and/or 'neurons' (gate tensors), "
                         f"got {sorted(unknown)}")
    return full & set(kinds)


@dataclass
class _Step:
    sequence: int
    step: int
    phase: str
    start: int
    tokens: int
    batch: int
    seconds: float


@dataclass
class Recorder:
    """Hook callbacks and the state they fill; ``Recording`` reads it through ``build()``."""

    config: Any
    kinds: tuple[str, ...]
    layers: list[int]
    full: set[str]
    dataset: str
    target: str
    # filed, per step
    steps: list[_Step] = field(default_factory=list)
    token_rows: int = 0
    sequences: int = 0
    # steps not yet consolidated: (step row, the forward's router events [(layer, ids, weights, logits | None)],
    # whether they are one per recorded layer in order with the step's rows)
    router_steps: list[tuple[int, list, bool]] = field(default_factory=list)
    # per recorded layer, consolidated blocks of rows: ids (n, K), weights (n, K), logits (n, E) | None
    router_blocks: list[list[tuple]] = field(default_factory=list)
    router_notes: list[str] = field(default_factory=list)
    since_flush: int = 0
    # expert events of one-token forwards (decode) not yet reduced: (token row, that forward's "moe" events)
    single_steps: list[tuple[int, list]] = field(default_factory=list)
    single_events: int = 0
    routed: list[tuple] = field(default_factory=list)  # (key, token row, inactive) per reduction, tensors or numpy
    gates: list[torch.Tensor] = field(default_factory=list)  # (R, F) per reduced batch, full only
    neuron_counts: torch.Tensor | None = None  # (L' * E, F) active counts
    kv: list[list[int]] = field(default_factory=list)  # per step: bytes per recorded layer
    kv_itemsize: int | None = None
    # (step_row, [(engine_step, (layer, expert), event)], nbytes): the "cache_events" batches, expanded when read
    cache_blocks: list[tuple] = field(default_factory=list)
    timing_snaps: list[tuple] = field(default_factory=list)  # (step_row, engine step, cumulative clocks)
    timing_events: list[tuple] = field(default_factory=list)  # (step_row, engine_step, layer, part, seconds)
    dropped: int = 0
    token_ids: list[torch.Tensor] = field(default_factory=list)  # per step: the forward's input ids, (B*T,)
    tokenizer: Any = None  # decodes tokens.piece when the recording is read
    # engine: (engine step, cumulative seconds per (layer, part)) read at each forward's end: the attention / router /
    # MoE / LM head / I/O wait split without a hook call per layer and part
    timing_probe: Callable[[], tuple[int, tuple]] | None = None
    # in flight: events of the forward not yet filed
    _router: list = field(default_factory=list)
    _experts: list = field(default_factory=list)
    _timing: list = field(default_factory=list)
    _cache_log: tuple | None = None  # the forward's ("cache_events") batch
    _rows_routed: dict = field(default_factory=dict)  # layer -> rows routed so far in this forward
    _chunk_start: dict = field(default_factory=dict)  # layer -> first row of its current chunk
    _rows_total: int = 0  # rows routed in this forward, all recorded layers
    _timing_seen: tuple | None = None  # the clocks when the block began (time before it is not ours)

    # Every FLUSH_STEPS forwards (or once BATCH_EVENTS expert events of one-token forwards are pending, or when the
    # recording is read) the pending router tensors are concatenated into one block per layer and the pending expert
    # gates are reduced to counters (one cat, a few reductions, one index_add_). Expert events of a longer forward
    # (a prefill) are reduced at its end. Few live tensor objects: the garbage collector has little to walk.
    FLUSH_STEPS = 64
    BATCH_EVENTS = 4096

    def __post_init__(self) -> None:
        self.layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        self.router_blocks = [[] for _ in self.layers]
        self.want = set(self.kinds)
        self.keep_logits = "experts" in self.full
        self.keep_router = "experts" in self.want
        self.keep_gates = "neurons" in self.full

    # ------------------------------------------------------------------ hooks
    def on_router(self, layer: int, logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  **_: Any) -> None:
        if layer in self.layer_pos:
            # a forward may route its tokens in chunks (the engine's prefill): rows of this chunk start here
            n = topk_ids.shape[0]
            start = self._chunk_start[layer] = self._rows_routed.get(layer, 0)
            self._rows_routed[layer] = start + n
            self._rows_total += n
            if not self.keep_router:  # neurons alone: only where the chunk's rows start
                return
            if topk_weights.requires_grad:  # a forward with autograd on: keep values, not the graph
                topk_weights, logits = topk_weights.detach(), logits.detach()
            self._router.append((layer, topk_ids, topk_weights, logits if self.keep_logits else None))

    def on_moe(self, layer: int, experts: list[int], token_index: list, gates: list[torch.Tensor], **_: Any) -> None:
        if layer in self.layer_pos:  # one event per layer; token indices count rows of the current chunk
            self._experts.append((layer, experts, token_index, gates, self._chunk_start.get(layer, 0)))

    def on_cache_events(self, events: list, nbytes: int = 0, **_: Any) -> None:
        self._cache_log = (events, nbytes)  # filtered and expanded when the recording is read

    def on_timing(self, step: int, layer: int | None, part: str, seconds: float, **_: Any) -> None:
        if layer is None or layer < 0 or layer in self.layer_pos:
            self._timing.append((step, -1 if layer is None else layer, part, seconds))

    def on_forward(self, phase: str, start: int, tokens: int, cache=None, seconds: float = 0.0,
                   input_ids: torch.Tensor | None = None, **_: Any) -> None:
        if input_ids is not None:  # a copy: a generation loop may reuse its token buffer; no host sync
            self.token_ids.append(input_ids.detach().reshape(-1).clone())
        batch = 1
        if cache is not None and len(cache):
            batch = cache[0].batch
        elif self._rows_routed:
            batch = max(1, next(iter(self._rows_routed.values())) // max(tokens, 1))
        if start == 0 or not self.steps:  # position 0: new sequences
            seq, step = self.sequences, 0
            self.sequences += batch
        else:
            seq, step = self.steps[-1].sequence, self.steps[-1].step + 1
        row = len(self.steps)
        self.steps.append(_Step(seq, step, phase, start, tokens, batch, seconds))
        want = self.want
        if "experts" in want:
            events = self._router
            # the usual forward: one event per recorded layer, in order, each with the step's n rows
            regular = len(events) == len(self.layers) and self._rows_total == len(events) * tokens * batch and [
                ev[0] for ev in events] == self.layers
            self.router_steps.append((row, events, regular))
            self._router = []
        if "neurons" in want and self._experts:
            if tokens * batch == 1:  # every event is row 0 of this step: the layer events, expanded when reduced
                self.single_steps.append((self.token_rows, self._experts))
                self._experts = []
                self.single_events += len(self.single_steps[-1][1])
                if self.single_events * self.config.top_k >= self.BATCH_EVENTS:  # one token: k experts a layer
                    self._flush()
            else:
                self._reduce_single()  # keep the routed pairs in step order
                self._reduce_forward(self._experts, self.token_rows)
        if "kv" in want and cache is not None:
            per_layer = cache.bytes_per_layer()
            self.kv.append([per_layer[i] for i in self.layers])
            if self.kv_itemsize is None and len(cache):
                self.kv_itemsize = cache[0].k.element_size()
        if self._cache_log is not None:
            self.cache_blocks.append((row, *self._cache_log))
        if "timing" in want:
            self.timing_events.extend((row, *ev) for ev in self._timing)
            if self.timing_probe is not None:
                self._file_timing(row)
        self._clear()
        self.token_rows += tokens * batch
        self.since_flush += 1
        if self.since_flush >= self.FLUSH_STEPS:
            self._flush()

    def _flush(self) -> None:
        if len(self.token_ids) > 1:
            self.token_ids = [torch.cat(self.token_ids)]
        self._consolidate_router()
        self._reduce_single()
        self.since_flush = 0

    def _clear(self) -> None:
        for pending in (self._router, self._experts, self._timing, self._rows_routed, self._chunk_start):
            pending.clear()
        self._cache_log = None
        self._rows_total = 0

    def _file_timing(self, row: int) -> None:
        """A snapshot of the engine's cumulative clocks; the forward's parts are the differences (taken when read)."""
        step, clocks = self.timing_probe()
        self.timing_snaps.append((row, step, clocks))

    def _timing_from_snaps(self) -> list[tuple]:
        """(step_row, engine_step, layer, part, seconds) per forward from consecutive snapshots of the clocks."""
        out, prev, pos = [], _clocks(self._timing_seen) if self._timing_seen else {}, self.layer_pos
        for row, step, raw in self.timing_snaps:
            now = _clocks(raw)
            for (layer, part), cur in now.items():
                if layer >= 0 and layer not in pos:
                    continue
                before = prev.get((layer, part), 0.0)
                dt = cur - before if cur >= before else cur  # a smaller total: the engine's counters were reset
                if dt > 0:
                    out.append((row, step, layer, part, dt))
            prev = now
        return out

    def _count(self, gates: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
        """Add the active neurons of each gate row to its (layer slot, expert) counters; inactive count per row."""
        E, F = self.config.num_experts, self.config.moe_ffn_hidden_size
        active = gates > 0  # relu(gate) > 0
        if self.neuron_counts is None:  # float64: index_add_ is much faster on floats than on ints, and float64
            # counts are exact integers up to 2^53 (read as int64)
            self.neuron_counts = torch.zeros(len(self.layers) * E, F, dtype=torch.float64, device=gates.device)
        self.neuron_counts.index_add_(0, key_rows, active.to(torch.float64))
        return F - active.sum(-1, dtype=torch.int32)  # (R,)

    @torch.inference_mode()  # also when the forward ran with autograd on; counters stay inference tensors
    def _reduce_single(self) -> None:
        """The pending expert events of one-token forwards: one cat, a few reductions, no host sync."""
        if not self.single_steps:
            return
        pos, E = self.layer_pos, self.config.num_experts
        all_gates, keys, rows = [], [], []
        for row, events in self.single_steps:
            n = len(keys)
            for layer, experts, _, gates, _ in events:
                base = pos[layer] * E
                all_gates += gates
                keys += [base + e for e in experts]
            rows += [row] * (len(keys) - n)
        self.single_steps, self.single_events = [], 0
        if not keys:
            return
        gates = torch.cat(all_gates)  # (R, F)
        keys_t = torch.from_numpy(np.array(keys, dtype=np.int64)).to(gates.device)  # (R,); 10x faster than tensor()
        inactive = self._count(gates, keys_t)
        self.routed.append((keys_t, np.array(rows, dtype=np.int64), inactive))
        if self.keep_gates:
            self.gates.append(gates)

    @torch.inference_mode()
    def _reduce_forward(self, layer_events: list, first_row: int) -> None:
        """The expert events of one forward of several tokens (each event, one per layer and chunk: layer, experts,
        token indices (None: every row of the chunk), gates, row of its chunk's first token)."""
        E = self.config.num_experts
        events = [(layer, e, t if t is not None else torch.arange(g.shape[0], device=g.device), g, start)
                  for layer, experts, tokens, gates, start in layer_events
                  for e, t, g in zip(experts, tokens, gates)]
        gates = torch.cat([ev[3] for ev in events])  # (R, F)
        device = gates.device
        lengths = torch.tensor([ev[3].shape[0] for ev in events], device=device)
        keys = torch.tensor([self.layer_pos[ev[0]] * E + ev[1] for ev in events], device=device)
        key_rows = torch.repeat_interleave(keys, lengths)  # (R,) = layer slot * E + expert
        starts = torch.tensor([first_row + ev[4] for ev in events], device=device)
        token = torch.cat([ev[2] for ev in events]).to(device) + torch.repeat_interleave(starts, lengths)  # (R,)
        inactive = self._count(gates, key_rows)
        self.routed.append((key_rows, token, inactive))
        if self.keep_gates:
            self.gates.append(gates)

    @torch.inference_mode()
    def _consolidate_router(self) -> None:
        """The pending steps' router tensors, one block per recorded layer (chunks of a forward in order; a layer
        whose events do not cover a step's tokens gets -1 ids and NaN weights there, and a note)."""
        if not self.router_steps:
            return
        L, K, E = len(self.layers), self.config.top_k, self.config.num_experts
        ids, w, lg = [[] for _ in range(L)], [[] for _ in range(L)], [[] for _ in range(L)]
        for row, events, regular in self.router_steps:
            if regular:
                for j, ev in enumerate(events):
                    ids[j].append(ev[1])
                    w[j].append(ev[2])
                    if self.keep_logits:
                        lg[j].append(ev[3])
                continue
            n = self.steps[row].tokens * self.steps[row].batch
            per_layer: list[list] = [[] for _ in range(L)]
            for ev in events:
                per_layer[self.layer_pos[ev[0]]].append(ev)
            bad = []
            for j, evs in enumerate(per_layer):
                if evs and sum(ev[1].shape[0] for ev in evs) == n:
                    ids[j] += [ev[1] for ev in evs]
                    w[j] += [ev[2] for ev in evs]
                    lg[j] += [ev[3] for ev in evs] if self.keep_logits else []
                else:
                    bad.append(self.layers[j])
                    like = events[0][2] if events else torch.empty(0)
                    ids[j].append(torch.full((n, K), -1, dtype=torch.long, device=like.device))
                    w[j].append(torch.full((n, K), float("nan"), dtype=like.dtype, device=like.device))
                    lg[j] += [torch.full((n, E), float("nan"), device=like.device)] if self.keep_logits else []
            if bad:
                self.router_notes.append(f"step row {row}: router events of layers {bad} do not cover the step's "
                                         f"{n} tokens; their experts are -1 (weights NaN) there")
        for j in range(L):
            self.router_blocks[j].append((torch.cat(ids[j]), torch.cat(w[j]),
                                          torch.cat(lg[j]) if self.keep_logits else None))
        self.router_steps = []

    def _router_arrays(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
        """Per recorded layer: top-k ids (N, K), weights (N, K) and, with full, logits (N, E), all steps."""
        self._consolidate_router()
        K, E = self.config.top_k, self.config.num_experts
        ids = [_cat_host([b[0] for b in blocks], (0, K), torch.int64) for blocks in self.router_blocks]
        w = [_cat_host([b[1] for b in blocks], (0, K), torch.float32) for blocks in self.router_blocks]
        lg = ([_cat_host([b[2] for b in blocks], (0, E), torch.float32) for blocks in self.router_blocks]
              if self.keep_logits else None)
        return ids, w, lg

    # ------------------------------------------------------------------ build
    def build(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(meta, arrays) for a Recording (pending expert events are reduced first)."""
        cfg = self.config
        S = len(self.steps)
        a: dict[str, np.ndarray] = {}
        a["steps.sequence"] = np.array([s.sequence for s in self.steps], dtype=np.int64)
        a["steps.step"] = np.array([s.step for s in self.steps], dtype=np.int64)
        a["steps.phase"] = np.array([s.phase for s in self.steps], dtype="<U16")
        a["steps.start"] = np.array([s.start for s in self.steps], dtype=np.int64)
        a["steps.tokens"] = np.array([s.tokens for s in self.steps], dtype=np.int64)
        a["steps.batch"] = np.array([s.batch for s in self.steps], dtype=np.int64)
        a["steps.seconds"] = np.array([s.seconds for s in self.steps], dtype=np.float64)
        a["sequences.dataset"] = np.array([self.dataset] * self.sequences, dtype="<U64")
        notes: list[str] = []
        ids = _cat_host(self.token_ids, (0,), torch.int64)
        if len(ids) == self.token_rows:
            a["tokens.id"] = ids
            if self.tokenizer is not None:
                a["tokens.piece"] = token_pieces(self.tokenizer, ids)
        else:
            notes.append(f"tokens: {len(ids)} of {self.token_rows} token ids were reported by the forwards; "
                         f"tokens.id is missing")
        if "experts" in self.want:
            ids, w, lg = self._router_arrays()
            notes += self.router_notes
            for j, layer in enumerate(self.layers):
                a[f"layers.{layer}.moe.topk_ids"] = ids[j]
                a[f"layers.{layer}.moe.topk_weights"] = w[j]
                if lg is not None:
                    a[f"layers.{layer}.moe.router_logits"] = lg[j]
        if "neurons" in self.want:
            E, F = cfg.num_experts, cfg.moe_ffn_hidden_size
            self._reduce_single()
            key = _cat_host([r[0] for r in self.routed], (0,), torch.int64)
            tok = np.concatenate([np.zeros(0, np.int64)] + [r[1] if isinstance(r[1], np.ndarray) else
                                                             r[1].cpu().numpy() for r in self.routed])
            inactive = _cat_host([r[2] for r in self.routed], (0,), torch.int32)
            gates = _cat_host(self.gates, (0, F), torch.float32) if self.keep_gates else None
            counts = (self.neuron_counts.to(torch.int64).cpu().numpy().reshape(len(self.layers), E, F)
                      if self.neuron_counts is not None else np.zeros((len(self.layers), E, F), dtype=np.int64))
            for j, layer in enumerate(self.layers):
                sel = (key // E) == j
                a[f"layers.{layer}.moe.routed_token"] = tok[sel]
                a[f"layers.{layer}.moe.routed_expert"] = key[sel] % E
                a[f"layers.{layer}.moe.inactive_neurons"] = inactive[sel]
                if gates is not None:
                    a[f"layers.{layer}.moe.expert_gate"] = gates[sel]
                a[f"layers.{layer}.moe.neuron_counts"] = counts[j][None]  # (D=1, E, F), one dataset
        if "kv" in self.want and self.kv:
            kv = np.array(self.kv, dtype=np.int64).reshape(len(self.kv), len(self.layers))
            if len(self.kv) != S:
                notes.append("kv: some forwards passed no KV cache; kv bytes are missing")
            else:
                for j, layer in enumerate(self.layers):
                    a[f"layers.{layer}.attn.kv_bytes"] = kv[:, j]
        if "cache" in self.want:
            pos = self.layer_pos
            ev = [(row, step, key[0], key[1], event, nb) for row, events, nb in self.cache_blocks
                  for step, key, event in events if key[0] in pos]
            a["cache.step_row"] = np.array([e[0] for e in ev], dtype=np.int64)
            a["cache.engine_step"] = np.array([-1 if e[1] is None else e[1] for e in ev], dtype=np.int64)
            a["cache.layer"] = np.array([e[2] for e in ev], dtype=np.int64)
            a["cache.expert"] = np.array([e[3] for e in ev], dtype=np.int64)
            a["cache.event"] = np.array([e[4] for e in ev], dtype="<U16")
            a["cache.bytes"] = np.array([e[5] or 0 for e in ev], dtype=np.int64)
        if "timing" in self.want:
            ev = self.timing_events + self._timing_from_snaps()
            a["timing.step_row"] = np.array([e[0] for e in ev], dtype=np.int64)
            a["timing.engine_step"] = np.array([-1 if e[1] is None else e[1] for e in ev], dtype=np.int64)
            a["timing.layer"] = np.array([e[2] for e in ev], dtype=np.int64)
            a["timing.part"] = np.array([e[3] for e in ev], dtype="<U32")
            a["timing.seconds"] = np.array([e[4] for e in ev], dtype=np.float64)
        if self.dropped:
            notes.append(f"dropped {self.dropped} events that arrived after the last forward")
        if "cache" in self.want and self.target == "model":
            notes.append("cache: the model has no expert cache; the cache kind records only on an Engine")
        if "timing" in self.want and self.target == "model":
            notes.append("timing: the model reports whole-step times only (no attention / MoE / I/O split)")
        meta = {
            "version": FORMAT_VERSION, "kinds": list(self.kinds), "layers": list(self.layers),
            "full": sorted(self.full), "datasets": [self.dataset], "target": self.target,
            "config": cfg.to_dict(), "kv_itemsize": self.kv_itemsize, "notes": notes,
        }
        return meta, a

    def finish(self) -> None:
        """Drop the events of a forward that never completed."""
        self.dropped += (len(self._router) + len(self._experts) + len(self._timing)
                         + (len(self._cache_log[0]) if self._cache_log is not None else 0))
        self._clear()


def token_pieces(tokenizer, ids: np.ndarray) -> np.ndarray:
    """The decoded piece of each token id (each distinct id decoded once); a tokenizer that fails on an id gives
    ``<id N>``."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    pieces = []
    for t in uniq.tolist():
        try:
            pieces.append(str(tokenizer.decode([t])))
        except Exception:  # an id the tokenizer does not know (a random test model's vocabulary)
            pieces.append(f"<id {t}>")
    return np.array(pieces, dtype=str)[inverse] if len(uniq) else np.zeros(0, dtype="<U1")


def _cat_host(tensors: list[torch.Tensor], empty_shape: tuple, dtype: torch.dtype, dim: int = 0) -> np.ndarray:
    """One concatenation on the device, one copy to the host."""
    if not tensors:
        return np.zeros(empty_shape, dtype=torch.empty((), dtype=dtype).numpy().dtype)
    with torch.inference_mode():
        return torch.cat(tensors, dim=dim).to(dtype).cpu().numpy()


def _timing_probe(engine) -> Callable[[], tuple[int, tuple]] | None:
    """(engine step, a copy of the engine's cumulative clocks): router / attention / moe per layer, the LM head, and
    I/O wait per layer (``engine.cache.stats.per_layer``: layer -> [hits, misses, wait]); read at each forward's
    end (copies only; :func:`_clocks` names them when the recording is read). None when the engine has no clocks."""
    def probe() -> tuple[int, tuple]:
        io = {layer: v[2] for layer, v in engine.cache.stats.per_layer.items()}
        step, (router, attention, moe, lm_head) = engine.clocks()
        return step, (router, attention, moe, lm_head, io)

    try:
        _clocks(probe()[1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return probe


def _clocks(raw: tuple) -> dict[tuple[int, str], float]:
    """A probe's copy as seconds per (layer, part); layer -1 for the LM head."""
    router, attn, moe, lm_head, io = raw
    out: dict[tuple[int, str], float] = {}
    for part, clock in (("router", router), ("attention", attn), ("moe", moe)):
        for layer, seconds in enumerate(clock):
            out[(layer, part)] = float(seconds)
    out[(-1, "lm_head")] = float(lm_head)
    for layer, seconds in io.items():
        out[(int(layer), "io_wait")] = float(seconds)
    return out


class record:  # noqa: N801  (a function-like context manager, as torch.no_grad)
    """Record what ``target`` does inside a ``with`` block; ``as`` gives the ``Recording``.

    target: a SmallThinkerForCausalLM or an Engine (anything with ``.hooks`` and ``.config``).
    kinds: any of "experts", "neurons", "kv", "cache", "timing" (all by default).
    layers: None (all), an int, a list / range / set, "layers.N", or a callable(layer) -> bool.
    full: False keeps counters and small per-token arrays; True (or a subset of {"experts", "neurons"}) also keeps
      the raw router logits (N, E) and the pre-ReLU gate tensors (R, F).
    dataset: the label every row gets in ``to_dataframe``.
    tokenizer: decodes ``tokens.piece`` (the piece of each recorded token id); default the target's own
      (``target.tokenizer``), none: only ``tokens.id``.
    """

    def __init__(self, target, kinds: Iterable[str] = KINDS, layers=None, full: bool | Iterable[str] = False,
                 dataset: str = "default", tokenizer: Any = None) -> None:
        explicit = kinds is not KINDS
        if not hasattr(target, "hooks") or not hasattr(target, "config"):
            raise TypeError(f"record() needs a model or an engine with .hooks and .config, got {type(target).__name__}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(dict.fromkeys(kinds))
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known kinds: {', '.join(KINDS)}")
        from ..model import DenseForCausalLM, SmallThinkerForCausalLM

        if isinstance(target, DenseForCausalLM):  # no router, no experts, no expert cache
            moe_only = [k for k in kinds if k in DENSE_LACKS]
            if moe_only and explicit:
                raise ValueError(f"record(kinds={list(kinds)}): a dense model has no experts, so the kinds "
                                 f"{moe_only} do not apply to it (it records {', '.join(DENSE_KINDS)}); for its FFN "
                                 f"neurons use smallthinker_lab.instruments.dense_moe.ffn_activation_sparsity")
            kinds = tuple(k for k in kinds if k not in DENSE_LACKS)
        self.target = target
        cfg = target.config
        self.recorder = Recorder(
            config=cfg, kinds=kinds, layers=_layer_set(layers, cfg.num_hidden_layers), full=_full_set(full, kinds),
            dataset=str(dataset),
            target="model" if isinstance(target, (SmallThinkerForCausalLM, DenseForCausalLM)) else "engine",
        )
        tokenizer = tokenizer if tokenizer is not None else getattr(target, "tokenizer", None)
        self.recorder.tokenizer = tokenizer if hasattr(tokenizer, "decode") else None
        if self.recorder.target == "engine" and "timing" in kinds:
            self.recorder.timing_probe = _timing_probe(target)
        self.recording = Recording._live(self.recorder)
        self._handles: list = []

    def _points(self) -> list[tuple[str, Callable]]:
        r, want = self.recorder, self.recorder.want
        points = [("forward", r.on_forward)]
        if "experts" in want or "neurons" in want:  # neurons: the router marks where a chunk's rows start
            points.append(("router", r.on_router))
        if "neurons" in want:
            points.append(("moe", r.on_moe))
        if "cache" in want and r.target == "engine":
            points.append(("cache_events", r.on_cache_events))
        if "timing" in want and r.target == "engine" and r.timing_probe is None:
            points.append(("timing", r.on_timing))
        return points

    def __enter__(self):
        if self._handles or not self.recording._live_now:
            raise RuntimeError("a record() block runs once: call record(...) again for a new recording")
        hooks = self.target.hooks
        if self.recorder.timing_probe is not None:
            self.recorder._timing_seen = self.recorder.timing_probe()[1]  # time before the block is not ours
        try:
            for point, fn in self._points():
                self._handles.append(hooks.add(point, fn))
        except BaseException:
            self._remove()
            raise
        return self.recording

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> bool:
        try:
            self._remove()
        finally:
            self.recorder.finish()
            self.recording._freeze()
        return False
