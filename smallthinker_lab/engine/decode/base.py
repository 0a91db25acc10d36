"""What every graph decoder shares: the decoder protocol, state, slot views and the accounting of a step.

A decoder runs the engine's decode steps (T == 1) its own way; the engine asks it each step whether it can
(``usable()``) and otherwise runs the step eagerly. The protocol (``Decoder``): ``usable``, ``decode(ids, start)``,
``pipelines``/``decode_ahead`` (greedy steps launched one ahead of the host), ``flush`` (count a deferred step),
``wait`` (the device's end of the last step), ``reset`` (drop graphs and buffers after the engine's state changed).
A decoder is built over the engine's ``EngineState`` (engine/state.py), never the Engine: it reads the model parts,
KV cache, expert cache, slots and bundle there, and updates the counters exactly as the eager path does, through
the state's methods (``next_step``, ``settle``, ``count``, ``check_unverified``, ``record_lookahead``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..state import EngineState


class Decoder:
    """The decoder protocol (see the module docstring); the graph decoders below implement it."""

    kernels = False  # whether this decoder runs the Triton decode kernels

    def usable(self) -> bool:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        raise NotImplementedError

    def pipelines(self) -> bool:
        return False

    def decode_ahead(self, token: torch.Tensor, n: int, stop, check) -> Iterator[tuple[int, float]]:
        raise NotImplementedError(f"{type(self).__name__} does not run steps ahead of the host")

    def flush(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def reset(self) -> None:
        pass


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _EagerGraph:
    """A stand-in for a captured graph on a CPU (tests of this module's logic): replay runs the function."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class GraphBase(Decoder):
    """State and helpers of the graph decoders. Built on first use, rebuilt when the engine's cache, KV cache or
    slots change (reopen, clear)."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.kernel_blocks: dict | None = None  # the Triton kernels' tile sizes (None: the defaults)
        self.compiled = False  # whether inductor kernels run (set when built)
        self.compile_error: str | None = None
        self.replays = 0
        self.reset()

    # ------------------------------------------------------------------ state
    def wait(self) -> None:
        """Wait for the device to finish the last step (its real time in the engine's decode_seconds; the kernel
        variant returns before, so that the engine's bookkeeping overlaps the step; the others have synced)."""
        ev, self._wait_event = getattr(self, "_wait_event", None), None
        if ev is not None:
            ev.synchronize()

    def flush(self) -> None:
        """Count the last kernel step's experts (the kernel variant counts a step while the device runs the next;
        the engine calls this before its counters or trace are read and when a generation ends)."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        buf, ev, step, account = pending
        if ev is not None:
            ev.synchronize()
        account(buf, step)

    def reset(self) -> None:
        """Drop graphs and static buffers (the engine closed, or its cache / KV cache changed)."""
        self.flush()
        self._pending, self._flip = None, 0
        self._off = None
        self._key = None
        self._graphs = []
        self._static = {}
        self._pool = None
        self._kern = None
        self._lru = None
        self._host_copy = None  # on a CPU (interpreter): the device LRU's host records, read by the decoder

    def _holds_all(self) -> bool:
        """Whether the cache has a slot for every expert of the model."""
        return self.state.holds_all_experts()

    def _state_key(self):
        state = self.state
        return (state.cache, state.cache.policy, state.kv, state.arena)

    def _valid(self) -> bool:
        key = self._key
        if key is None:
            return False
        now = self._state_key()
        c = self.state.config
        full = len(self.state.cache.entries) == c.num_hidden_layers * c.num_experts
        return full and all(a is b for a, b in zip(key, now))

    def _account(self, ids_host: torch.Tensor, step: int | None = None) -> None:
        """Every expert of the step is a hit: the cache counts them as its request's hit branch does."""
        state = self.state
        state.cache.record_hits(ids_host.tolist(), state.step if step is None else step)

    def _resident(self) -> torch.Tensor:
        """Read the experts not yet cached (demand requests: misses, counted), settle every copy and layout, and
        return the device slot table [L, E]."""
        state = self.state
        cache, cfg = state.cache, state.config
        L, E = cfg.num_hidden_layers, cfg.num_experts
        missing = [(layer, x) for layer in range(L) for x in range(E) if (layer, x) not in cache]
        for j in range(0, len(missing), 64):
            entries = [cache.request(k) for k in missing[j:j + 64]]
            for entry in entries:
                cache.release(cache.wait(entry))
        for entry in list(cache.entries.values()):
            state.settle(cache.wait(entry))  # copies and the exact layout settled, as the eager path on first use
        table = [[cache.entries[(layer, x)].slot for x in range(E)] for layer in range(L)]
        return torch.tensor(table, dtype=torch.long, device=state.device)

    def _expert_format(self) -> str:
        """How the decode kernels read the slots: "bf16" (the engine's weights), or the bundle's int8 / q4_0 bytes."""
        fmt = self.state.bundle.format
        return fmt if fmt in ("int8", "q4_0") else "bf16"

    def _slot_views(self, base: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of ``n`` records laid out every ``stride`` bytes from ``base`` (uint8): [n, F, H] x 2 and
        down [n, H, F] (exact: the model's layout) or [n, F, H] (stored)."""
        state = self.state
        m, isz = state.bundle.matrices, state.dtype.itemsize
        Fh, H = m["gate"].shape
        flat = base.view(state.dtype)
        st = state.bundle.stride // isz

        def view(name, shape):
            return flat.as_strided((n, *shape), (st, shape[1], 1), m[name].offset // isz)

        down = (H, Fh) if state.exact else (Fh, H)
        return view("gate", (Fh, H)), view("up", (Fh, H)), view("down", down)

    def _capture(self, fn):
        if self.state.device.type != "cuda":  # tests on a CPU: the pieces run eagerly at each "replay"
            return _EagerGraph(fn)
        g = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            fn()
        return g

    def _arena_elements(self) -> tuple[torch.Tensor, int, list[int]]:
        """Every slot as one flat tensor of the engine's dtype, the record stride in elements, and the element
        offsets of gate, up and down inside a record; with int8 / q4_0 records (``_expert_format``) a flat uint8
        tensor, the stride and offsets in bytes."""
        state = self.state
        dtype = state.dtype if self._expert_format() == "bf16" else torch.uint8
        isz, m = dtype.itemsize, state.bundle.matrices
        flat = state.arena.flat_view(dtype)
        return flat, state.bundle.stride // isz, [m[k].offset // isz for k in ("gate", "up", "down")]
