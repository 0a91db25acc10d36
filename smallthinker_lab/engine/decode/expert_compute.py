"""One expert's ReGLU from its cache slot: views of the slot's bytes for the stored dtype, decoded otherwise; dense,
sparse (active neurons only) or exact (the model's ops on the model's layouts); torch's int4/int8 CPU kernels for
``q4_0_cpu``/``int8_cpu`` bundles; the ``hook_act`` edit point and the "expert"/"moe" events. ``SlotExperts`` works
on the engine's ``EngineState`` (engine/state.py); the eager decoder (eager.py) calls it for every expert it computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu_kernels, native, sparse
from ..cache import Entry
from ..quant import KERNEL_FORMATS, as_uint8, get_format
from ..shapes import neuron_bucket, pad_index, row_bucket
from ..state import EngineState


def native_q4_0(state: EngineState) -> bool:
    """Whether ``state``'s experts run through the native Q4_0 kernel: ggml Q4_0 records with down in the model's
    [H, F] layout (quantized along F, as the kernel's rows need), on the CPU, not exact (exact is the model's
    kernels on dequantised weights), with the kernel built (``native.unavailable_reason()``)."""
    b = state.bundle
    return (b is not None and b.format in ("q4_0", "q4_0x8") and not b.down_transposed
            and state.device.type == "cpu" and not state.exact and native.available())


def quant_bytes(buf) -> torch.Tensor:
    t = as_uint8(buf)
    return t if t.is_contiguous() else t.contiguous()


class SlotExperts:
    """Computes experts from the slots of ``state``. ``observe()`` reads, per forward, who listens to "expert" and
    "moe"; ``reset()`` drops the per-slot views (the engine closed, or reopened with new slots)."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.watch_one = False  # someone listens to "expert" (one event per expert)
        self.moe_seen: tuple[list, list, list] | None = None  # someone listens to "moe": the layer's experts so far
        self.reset()

    def reset(self) -> None:
        """Per-slot views sized for the state's slots (none while it has none); the bundle's format read again."""
        state = self.state
        fmt = state.bundle.format
        self.codec = get_format(fmt)
        self.cpu_kernel = fmt in KERNEL_FORMATS  # torch's int4/int8 CPU kernels read the slot's bytes as they are
        self.native = native_q4_0(state)  # the native Q4_0 x Q8_0 kernel on the slot's ggml blocks (engine/native.py)
        self.layout = "x8" if fmt == "q4_0x8" else "rows"  # q4_0x8: the blocks of 8 rows interleaved
        self.views: list[tuple | None] = [None] * (state.arena.n_slots if state.arena is not None else 0)

    def observe(self) -> None:
        """At a forward's start: which expert events are listened to (the hooks registered now)."""
        hooks = self.state.hooks
        self.watch_one = hooks.active("expert")  # "expert": one event per expert; "moe": one per layer
        self.moe_seen = ([], [], []) if hooks.active("moe") else None

    def take_seen(self) -> tuple[list, list, list] | None:
        """The experts, token rows and gates of the layer just computed, for the "moe" event (None: none to fire);
        the collection starts again empty."""
        seen = self.moe_seen
        if seen is None or not seen[0]:
            return None
        self.moe_seen = ([], [], [])
        return seen

    def compute(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """The expert of ``entry`` (settled by ``state.settle``) on x (n, H): the rows ``token`` of ``rows`` (the
        layer's input (N, H)), or all of them (token None)."""
        state = self.state
        layer, expert = entry.key
        shape = state.bundle.matrices["gate"].shape
        watch = self.watch_one or self.moe_seen is not None
        n = x.shape[0]
        hooks = state.hooks
        if hooks.edits and hooks.active(act := f"blocks.{layer}.moe.experts.{expert}.hook_act"):
            return self._hooked(entry, x, token, act, watch)
        if state.device.type == "cpu" and n > 2:  # rows from a bounded set of sizes (engine/shapes.py)
            index = pad_index(token if token is not None else torch.arange(n), row_bucket(n))
            if index.shape[0] > n:
                x = rows.index_select(0, index)
        y = self._rows(entry, x, token, n, layer, expert, shape, watch)
        return y[:n] if y.shape[0] > n else y

    def _rows(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None, n: int, layer: int, expert: int,
              shape, watch: bool) -> torch.Tensor:
        """``compute`` on x (m >= n rows: rows past n repeat a real one); hooks and counters see the first n."""
        state, codec = self.state, self.codec
        dtype, counters, zero_copy = state.dtype, state.counters, state.zero_copy
        if self.cpu_kernel:  # torch's int4/int8 CPU kernels on the slot's bytes, as they are
            ops = self.views[entry.slot]
            if ops is None:  # views of the slot's bytes: valid whatever the slot holds
                ops = self.views[entry.slot] = cpu_kernels.expert_operands(state.slot_bytes(entry.slot),
                                                                           state.bundle.format, shape)
            y, g = cpu_kernels.reglu(x, ops)
            if watch:
                self._fire(layer, expert, token, g[:n])
            counters.neurons_active += int(sparse.active_neurons(g[:n]).numel())
            counters.neurons_total += shape[0]
            return y
        if self.native:  # ggml Q4_0 blocks in place, activations in Q8_0 (as llama.cpp computes a Q4_0 matrix)
            mat = state.slot_bytes(entry.slot)
            y, g = native.reglu(x, *(quant_bytes(mat[m]) for m in ("gate", "up", "down")), shape[0], shape[1],
                                layout=self.layout)
            if watch:
                self._fire(layer, expert, token, g[:n])
            counters.neurons_active += int(sparse.active_neurons(g[:n]).numel())
            counters.neurons_total += shape[0]
            return y
        if zero_copy:
            wg, wu, wd = self.slot_views(entry.slot)  # views of the slot's bytes, no copy
        else:
            mat = state.slot_bytes(entry.slot)
        if state.exact:  # the model's ops on the model's layouts (wd: [H, F]), bit-identical results
            if not zero_copy:
                wg, wu, wd = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up", "down"))
                wd = wd.t().contiguous()
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire(layer, expert, token, g[:n])
            if state.device.type == "cpu":
                counters.neurons_active += int(sparse.active_neurons(g).numel())
                counters.neurons_total += shape[0]
            return F.linear(F.linear(x, wu) * F.relu(g), wd)
        if state.device.type == "cuda" or not state.bundle.down_transposed:  # dense, no host sync
            if not zero_copy:
                wg, wu = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up"))
                wd = self._down_fh(mat["down"])
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire(layer, expert, token, g)
            return (F.linear(x, wu) * F.relu(g)) @ wd
        sparse_reglu = state.sparse_reglu
        if zero_copy:
            g = None
            if watch:  # the gate the hook sees is the one the kernel uses: computed once
                g = F.linear(x, wg)
                self._fire(layer, expert, token, g[:n])
            if sparse_reglu is False:
                y, n_active = sparse.reglu_dense(x, wg, wu, wd, gate=g)
            else:
                y, n_active = sparse.reglu(x, wg, wu, wd, min_sparsity=-1.0 if sparse_reglu is True else None,
                                           gate=g)
        else:  # quantised (or another dtype): decode the gate, then only the active rows of up and down
            wg = codec.decode(mat["gate"], shape, dtype)
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire(layer, expert, token, g[:n])
            idx = torch.nonzero((g > 0).any(dim=0)).flatten()
            n_active = int(idx.numel())
            min_sp = (sparse.default_min_sparsity(dtype, n, shape[0] * shape[1]) if sparse_reglu == "auto"
                      else (-1.0 if sparse_reglu else 1.0))
            if 1.0 - n_active / shape[0] > min_sp:
                # the up product's shape from a bounded set (engine/shapes.py)
                up_idx = pad_index(idx, neuron_bucket(n_active, shape[0])) if n_active else idx
                wu_r = codec.decode_rows(mat["up"], shape, up_idx, dtype)
                wd_r = codec.decode_rows(mat["down"], shape, idx, dtype)
                y = sparse.reglu_from_rows(x, g, idx, wu_r, wd_r)
            else:
                y, _ = sparse.reglu_dense(x, wg, codec.decode(mat["up"], shape, dtype),
                                          codec.decode(mat["down"], shape, dtype))
        counters.neurons_active += n_active
        counters.neurons_total += shape[0]
        return y

    def fusable(self, layer: int, experts) -> bool:
        """Whether one token's experts of ``layer`` (ids) can run in one native call (``native.moe``): the native
        Q4_0 kernel runs and no edit hook acts on their neurons (``hook_act`` needs the dense path)."""
        if not self.native:
            return False
        hooks = self.state.hooks
        return not (hooks.edits and any(hooks.active(f"blocks.{layer}.moe.experts.{e}.hook_act") for e in experts))

    def layer_native(self, entries: list[Entry], x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token x (1, H) through the experts of ``entries`` (settled, one layer) in one native call, each
        weighted by its ``weights`` entry: the weighted sum (1, H) fp32. Hooks listening to "expert" / "moe" see
        each expert's gate, in ascending expert order; the counters as ``compute`` keeps them."""
        state = self.state
        f, h = state.bundle.matrices["gate"].shape
        watch = self.watch_one or self.moe_seen is not None
        records = []
        for entry in entries:
            mat = state.slot_bytes(entry.slot)
            records.append(tuple(quant_bytes(mat[m]) for m in ("gate", "up", "down")))
        y, active, g = native.moe(x, records, weights, f, h, gates=watch, layout=self.layout)
        if watch:
            layer = entries[0].key[0]
            for j in sorted(range(len(entries)), key=lambda j: entries[j].key[1]):
                self._fire(layer, entries[j].key[1], None, g[j:j + 1])
        counters = state.counters
        counters.neurons_active += int(active.sum())
        counters.neurons_total += f * len(entries)
        return y

    def _hooked(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None, name: str,
                watch: bool) -> torch.Tensor:
        """An expert whose neurons are hooked (``hook_act``): dense, the model's ops, relu(gate) * up through the
        edit hooks of ``name`` before down."""
        state = self.state
        layer, expert = entry.key
        shape = state.bundle.matrices["gate"].shape  # (F, H)
        if state.zero_copy:
            wg, wu, wd = self.slot_views(entry.slot)  # exact: down in the model's [H, F]; else stored [F, H]
            wd = wd if state.exact else wd.t()
        else:
            mat = state.slot_bytes(entry.slot)
            wg, wu = (self.codec.decode(mat[m], shape, state.dtype) for m in ("gate", "up"))
            wd = self._down_fh(mat["down"]).t()
        g = F.linear(x, wg)  # (n, F)
        if watch:
            self._fire(layer, expert, token, g)
        act = state.hooks.edit(name, F.linear(x, wu) * F.relu(g))  # (n, F)
        return F.linear(act, wd)  # (n, H)

    def _down_fh(self, buf: torch.Tensor) -> torch.Tensor:
        """A record's down matrix decoded as [F, H]: stored so, or in the model's [H, F] (int8 / q4_0 quantized along
        F, the GPU decode kernels' layout: decoded, then transposed)."""
        bundle = self.state.bundle
        w = self.codec.decode(buf, bundle.matrices["down"].shape, self.state.dtype)
        return w if bundle.down_transposed else w.t()

    def slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down^T) as [F, H] views of a slot, made once per slot: they stay valid whatever it holds
        (exact: down as the model's [H, F])."""
        views = self.views[slot]
        if views is None:
            state = self.state
            mat, shape, dtype = state.slot_bytes(slot), state.bundle.matrices["gate"].shape, state.dtype
            views = tuple(self.codec.decode(mat[m], shape, dtype) for m in ("gate", "up", "down"))
            if state.exact:  # the down matrix is kept in the model's [H, F] layout
                views = (views[0], views[1], mat["down"].view(dtype).view(shape[1], shape[0]))
            self.views[slot] = views
        return views

    def _fire(self, layer: int, expert: int, token: torch.Tensor | None, g: torch.Tensor) -> None:
        # token_index: rows of this forward chunk that the expert received (None in "moe": every row)
        seen = self.moe_seen
        if seen is not None:
            seen[0].append(expert), seen[1].append(token), seen[2].append(g)
        if self.watch_one:
            self.state.hooks.fire("expert", layer=layer, expert=expert, token_index=token if token is not None else
                                  torch.arange(g.shape[0], device=g.device), gate=g)
