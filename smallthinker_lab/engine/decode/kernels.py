"""The Triton decode kernels as the engine's decode backend (``backend="kernels"``): five kernels per layer from
smallthinker_lab.kernels, one CUDA graph per step, each expert read in place from its cache slot through an
[L, E, 3] table of element offsets. Tokens equal the in-memory model decoding with the same kernels (KernelRunner)
and the eager model up to rounding. A step is counted on the host while the device runs the next; greedy
generation launches steps one ahead of the host (``decode_ahead``). Offloaded steps: kernels_offload.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import torch

from ..state import EngineState
from .base import GraphBase
from .kernels_offload import OffloadedKernelSteps


class KernelDecoder(OffloadedKernelSteps, GraphBase):
    """The kernel decode: every expert resident, or offloaded (device-resolved LRU or host-resolved requests)."""

    kernels = True

    def __init__(self, state: EngineState, blocks: dict | None = None) -> None:
        super().__init__(state)
        self.kernel_blocks = blocks

    def usable(self) -> bool:
        state = self.state
        zero_copy = state.zero_copy or self._expert_format() != "bf16"  # int8 / q4_0: the kernels read the bytes
        return (state.device.type == "cuda" and zero_copy and self.hooks_allowed()
                and state.lm_head_predictor is None and state.dtype == torch.bfloat16
                and not state.bundle.down_transposed and (self._holds_all() or state.prefetch))

    def hooks_allowed(self) -> bool:
        """No hook registered, or only those of a routing replay (``interventions.replay``), which the kernels
        carry out themselves: each step routes to the trace's experts (``DecodeKernels(forced=True)``)."""
        hooks = self.state.hooks
        return len(hooks) == 0 or hooks.forced_routing() is not None

    def forced_source(self):
        """The routing replay the kernels apply, or None."""
        return self.state.hooks.forced_routing()

    def _force(self, kern, start: int) -> None:
        """Under a routing replay: the trace's experts of position ``start`` into the kernels' forced-routing
        buffer, before the step is launched (the copy is ordered on the stream before the step)."""
        source = self.forced_source()
        if source is not None:
            kern.forced.copy_(source.take(start)[0])

    def _state_key(self):
        return (*super()._state_key(), self.forced_source() is not None)

    def decode(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, 1, V) of one token ids (1, 1) at position ``start``; counters updated as the eager path
        (deferred: counted when the next step runs, or at ``flush``)."""
        state = self.state
        state.next_step()
        if not self._holds_all() and not self.device_lru():
            return self._decode_offload(ids, start)
        kern, account, bufs, events = self._kernel_step(ids, start)
        self._force(kern, start)
        return self._deferred(ids, start, kern, account, bufs, events)

    def _build(self, ids: torch.Tensor, start: int) -> None:
        self.reset()
        self._static["slot_table"] = self._resident()
        self._build_kernels()  # DecodeKernels holds its own static buffers
        self._key = self._state_key()

    def pipelines(self) -> bool:
        """Whether greedy generation can run the kernel steps one ahead of the host (``decode_ahead``): the kernel
        variant, usable, with every expert resident or the cache resolved on the device."""
        return self.usable() and (self._holds_all() or self.device_lru())

    def _kernel_step(self, ids: torch.Tensor, start: int) -> tuple:
        """The kernels of a whole-step graph (every expert resident, or the cache resolved on the device), built or
        brought up to date, with the function that counts a step (``account(buffers, step)``) and the two sets of
        pinned buffers and events a step's outputs go to."""
        if self._holds_all():
            if not self._valid():
                self._build(ids, start)
            return self._kern, self._account_ids, self._ids_bufs, self._ids_events
        o = self._lru_kernels()
        if self._pending is None:  # the host's cache may have changed since the device's last step
            self._upload_lru(o["lru"])
        return o["kern"], self._account_lru, o["bufs"], o["events"]

    @staticmethod
    def _copy_out(kern, buf: tuple, ev) -> None:
        """A step's expert ids (and, with a device LRU, their slots; with a third buffer, its greedy token) to whole
        contiguous pinned buffers (a copy into a strided view of one would go through a pageable temporary and wait
        for the step), then the event the host waits on."""
        buf[0].copy_(kern.ids, non_blocking=True)
        if kern.lru is not None:
            buf[1].copy_(kern.slots, non_blocking=True)
        if len(buf) > 2:
            buf[2].copy_(kern.tok, non_blocking=True)
        if ev is not None:
            ev.record()

    def decode_ahead(self, token: torch.Tensor, n: int, stop, check) -> Iterator[tuple[int, float]]:
        """Greedy decode of ``n`` tokens after ``token`` (on the device: the prefill's argmax) from the KV cache's
        length. Each step's graph also writes the argmax of its logits as the next step's token and advances the
        position, so the host launches step i + 1 before it reads step i's token: the device never waits for the
        host between steps. Step i is counted (as ``flush`` counts a deferred step) while the device runs step
        i + 1. Yields (token, seconds from resuming to the token on the host); ``check()`` runs before each yield.
        A step launched past a stop token or an interruption is counted as run, and its position is given back."""
        state = self.state
        self.flush()
        c, cache = state.config, state.cache
        cuda = state.device.type == "cuda"
        L, K = c.num_hidden_layers, c.top_k
        with torch.inference_mode():  # the kernels' buffers are inference tensors
            kern, account, _, _ = self._kernel_step(token.view(1, 1), state.kv.seq_len)
            sets = [((torch.zeros(L, K, dtype=torch.long, pin_memory=cuda), torch.zeros(L, K, dtype=torch.long,
                      pin_memory=cuda), torch.zeros(1, dtype=torch.long, pin_memory=cuda)),
                     torch.cuda.Event() if cuda else None) for _ in range(3)]
            kern.tok.copy_(token.reshape(1))
            kern.pos.fill_(state.kv.seq_len)
        inflight: deque = deque()
        launched = 0
        first = state.kv.seq_len
        source = self.forced_source()

        @torch.inference_mode()
        def launch():
            nonlocal launched
            step = state.next_step()
            if source is not None:  # the replayed experts of this step's position, before its launch
                kern.forced.copy_(source.take(first + launched)[0])
            kern.advance()
            buf, ev = sets[launched % 3]
            launched += 1
            self._copy_out(kern, buf, ev)  # with the step's greedy token
            inflight.append((buf, ev, step))
            self.replays += 1

        @torch.inference_mode()
        def settle():
            buf, ev, step = inflight.popleft()
            if ev is not None:
                ev.synchronize()
            nbytes = cache.stats.bytes_read
            account(buf, step)
            return int(buf[2]), cache.stats.bytes_read - nbytes

        t0 = time.perf_counter()
        launch()
        try:
            for _ in range(n):
                if launched < n:
                    launch()  # the device runs it while the host counts step i
                tok, nbytes = settle()
                dt = time.perf_counter() - t0
                state.count("decode", 1, dt, nbytes)
                check()
                state.check_unverified()
                yield tok, dt
                t0 = time.perf_counter()
                if tok in stop:
                    break
        finally:
            try:
                while inflight:  # launched past the end: run, counted; its position is not kept
                    settle()
                    for kvl in state.kv.layers:
                        kvl.length -= 1
                    if source is not None:
                        source.rewind(1)
            except BaseException:
                inflight.clear()
                cache.clear()  # the device's cache may be ahead of the host's: neither is trusted
                raise

    def _deferred(self, ids: torch.Tensor, start: int, kern, account, bufs: list, events: list) -> torch.Tensor:
        """One kernel step, counted later: its outputs go to one of two sets of pinned buffers (``_copy_out``); the
        previous step is counted on the host (``account(buffers, step)``) while the device runs this one."""
        state, j = self.state, self._flip
        logits = kern.step(ids, start).clone()
        buf, ev = bufs[j], events[j]
        self._copy_out(kern, buf, ev)
        self.flush()  # the previous step's counters, on the host while the device runs this step
        self._pending, self._flip = (buf, ev, state.step, account), 1 - j
        self._wait_event = ev  # Engine.forward waits on it after its own bookkeeping (wait())
        self.replays += 1
        return logits

    def _account_ids(self, buf: tuple, step: int) -> None:
        """``_account`` of a kernel step's pinned ids (``_copy_out``'s first buffer)."""
        self._account(buf[0], step)

    def _build_kernels(self) -> None:
        from ...kernels import DecodeKernels, ExpertTable

        state, s = self.state, self._static
        L = state.config.num_hidden_layers
        base, stride, mats = self._arena_elements()
        offsets = s["slot_table"][:, :, None] * stride + torch.tensor(mats, device=state.device)  # [L, E, 3] elements
        cuda = state.device.type == "cuda"
        K = state.config.top_k
        self._ids_bufs = [(torch.zeros(L, K, dtype=torch.long, pin_memory=cuda),) for _ in range(2)]  # no slots
        self._ids_events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._kern = DecodeKernels(state.model, state.kv, ExpertTable([base] * L, offsets, self._expert_format()),
                                   graph=cuda, blocks=self.kernel_blocks, forced=self.forced_source() is not None)
