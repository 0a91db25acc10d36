"""The Triton kernel decoder when the cache holds only part of the experts (offloaded).

* LRU policy, no look-ahead, every record in pinned host memory (``host_cache=True``): the cache is resolved on the
  device (``device_lru``, ``smallthinker_lab.kernels.ExpertLRU``): each layer's routing program looks the chosen
  experts up and picks LRU victims; the expert kernels read a missed expert straight from its host record over the
  bus (zero-copy) and write it into its slot; one graph per step, no host round trip per layer. The host replays
  each step's requests through the engine's ExpertCache while the device runs the next (``_account_lru``):
  counters, trace and policy are the cache's own, and a disagreement on any hit or slot is an error.
* otherwise (LFU or Belady, look-ahead, experts from storage): per layer the host reads the routing and requests
  the experts from the cache, whose misses the copy engine brings in (``_decode_offload``).
"""

from __future__ import annotations

import torch


class OffloadedKernelSteps:
    """The offloaded steps of ``KernelDecoder`` (a mixin: it uses the decoder's state and helpers)."""

    def _offload_kernels(self):
        """The kernels and buffers of the offloaded kernel decode, (re)built when the cache, KV cache or slots
        change."""
        from ...kernels import DecodeKernels, ExpertTable

        state = self.state
        forced = self.forced_source() is not None
        key = (state.cache, state.kv, state.arena, forced)
        o = getattr(self, "_off", None)
        if o is not None and all(a is b for a, b in zip(o["key"], key)):
            return o
        cfg, dev = state.config, state.device
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        cuda = dev.type == "cuda"
        base, stride, mats = self._arena_elements()
        table = ExpertTable([base] * L, torch.zeros(L, E, 3, dtype=torch.long, device=dev),  # offsets: the host's
                            self._expert_format())
        self._off = o = {
            "key": key, "kern": DecodeKernels(state.model, state.kv, table, graph=False, blocks=self.kernel_blocks,
                                              forced=forced),
            "ids": [torch.zeros(2 * K, dtype=torch.long, pin_memory=cuda) for _ in range(L)],  # ids, predicted
            "sel": [torch.zeros(3 * K, dtype=torch.long, pin_memory=cuda) for _ in range(L)],
            "events": [torch.cuda.Event() if cuda else None for _ in range(L)],
            "stride": stride, "mats": mats, "graphs": {}, "warm": set()}
        return o

    def _piece(self, o: dict, name: tuple, fn) -> None:
        """Run a piece of the step: eagerly the first time (the kernels compile), then captured as a CUDA graph
        and replayed."""
        g = o["graphs"].get(name)
        if g is not None:
            g.replay()
            return
        if name in o["warm"] and self.state.device.type == "cuda":
            g = o["graphs"][name] = self._capture(fn)
            g.replay()
            return
        fn()
        o["warm"].add(name)

    def _decode_offload(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One decode step with the Triton kernels when the cache holds only part of the experts. Per layer: q/k/v,
        router logits and routing (one graph piece); the chosen ids to the host (an event) while attention runs
        (a second piece); the host requests the experts from the cache (misses start their copies, as the eager
        path's pre-attention prefetch), waits for them and writes their slots' offsets to the device; then o_proj
        and the experts (a third piece). Counters, trace and policy are the cache's own, as on the eager path.
        With the engine's ``lookahead``, the first piece also applies the next layer's router to this layer's
        residual, and the predicted experts start reading (``cache.speculate``) right after this layer's misses,
        so the copies of the next layer overlap this layer's compute; accuracy is counted as on the eager path."""
        state = self.state
        o = self._offload_kernels()
        kern, cache = o["kern"], state.cache
        if start >= kern.max_positions:
            raise ValueError(f"position {start} is past the KV cache's capacity {kern.max_positions}")
        kern.tok.copy_(ids.reshape(1), non_blocking=True)
        kern.pos.fill_(start)
        c = kern.launch_config(pdl=False)  # copies and host waits sit between the kernels
        stride, (mg, mu, md) = o["stride"], o["mats"]
        L, K, la = state.config.num_hidden_layers, state.config.top_k, state.lookahead
        source = self.forced_source()
        oracle = None  # under a replay with oracle look-ahead: its experts (L, K) on the host, the predictions
        if source is not None:
            replayed = source.take(start)[0]  # on the device: copied there, read by the routing kernels
            kern.forced.copy_(replayed)
            if la and source.oracle_lookahead:
                oracle = replayed.tolist()
        self._piece(o, ("embed",), lambda: kern.launch_embed(c))
        predicted = None
        for i in range(L):
            self._piece(o, ("pre", i), lambda i=i: (kern.launch_pre(i, c, la), kern.launch_route(i, c, la)))
            host, ev = o["ids"][i], o["events"][i]
            host[:K].copy_(kern.ids[i], non_blocking=True)
            if la and i + 1 < L:
                host[K:].copy_(kern.pred, non_blocking=True)
            if ev is not None:
                ev.record()
            self._piece(o, ("attention", i), lambda i=i: kern.launch_attention(i, c, route=False))
            if ev is not None:
                ev.synchronize()  # the routing is done; attention may still run
            both = host.tolist()
            experts = both[:K]  # ascending ids
            entries = [cache.request((i, x), ahead=True) for x in experts]
            if predicted is not None:
                state.record_lookahead(i, predicted, experts)
                predicted = None
            if la and i + 1 < L:  # look-ahead: the next layer's predicted experts start reading now
                # under a replay with oracle look-ahead the prediction is the trace's next layer (as on the eager
                # path, where the replay's rules also apply to the predicted routing)
                predicted = sorted(oracle[i + 1]) if oracle is not None else both[K:]
                for x in predicted:
                    cache.speculate((i + 1, x))
            slots = {}
            for entry in cache.as_completed(entries):  # time blocked here is I/O wait
                state.settle(entry)
                slots[entry.key[1]] = entry.slot
            offs = []
            for x in experts:
                b = slots[x] * stride
                offs += (b + mg, b + mu, b + md)
            sel = o["sel"][i]
            sel.copy_(torch.tensor(offs, dtype=torch.long))
            kern.sel_off.copy_(sel, non_blocking=True)
            self._piece(o, ("post", i), lambda i=i: kern.launch_post(i, c))
            for entry in entries:
                cache.release(entry)
        self._piece(o, ("final",), lambda: kern.launch_final(c))
        for kvl in state.kv.layers:
            kvl.length += 1
        self.replays += 1
        return kern.logits.view(1, 1, -1).clone()

    def device_lru(self) -> bool:
        """Whether the offloaded kernel decode resolves the cache on the device (``ExpertLRU``): the LRU policy,
        no look-ahead, and every expert record in page-locked host memory (``host_cache=True``; on a CPU, under
        the Triton interpreter, a host copy the decoder reads itself). Otherwise the host resolves each layer's
        requests (``_decode_offload``)."""
        state = self.state
        if state.cache.policy_name != "lru" or state.lookahead or (state.relayout_down or state.bundle.down_transposed):
            return False
        if state.transfer is not None:
            return state.transfer.host is not None
        return state.device.type == "cpu"

    def _host_records(self) -> torch.Tensor:
        state = self.state
        if state.transfer is not None:
            return state.transfer.host
        if self._host_copy is None or self._host_copy[0] is not state.reader:
            from ..io import read_all_records

            self._host_copy = (state.reader, *read_all_records(state.reader))
        return self._host_copy[2]

    def _lru_kernels(self) -> dict:
        """The kernels, the device LRU and the pinned buffers of the device-LRU decode, (re)built when the cache, KV
        cache or slots change."""
        from ...kernels import DecodeKernels, ExpertLRU, ExpertTable

        state = self.state
        forced = self.forced_source() is not None
        key = (state.cache, state.kv, state.arena, forced)
        o = self._lru
        if o is not None and all(a is b for a, b in zip(o["key"], key)):
            return o
        self.flush()
        cfg, dev, b = state.config, state.device, state.bundle
        L, E, K, S = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k, state.cache.capacity_experts
        base, stride, mats = self._arena_elements()
        host, isz = self._host_records(), base.element_size()  # offsets in the base's elements (uint8: bytes)
        delta = host.data_ptr() - base.data_ptr()
        if delta % isz:
            raise RuntimeError("the host copy of the experts is not aligned to the weights' dtype")
        src = [(delta + b.offset(layer, x)) // isz for layer in range(L) for x in range(E)]
        z = dict(dtype=torch.long, device=dev)
        lru = ExpertLRU(torch.full((S,), -1, **z), torch.zeros(S, **z), torch.zeros(1, **z),
                        torch.tensor(src, **z), stride, tuple(mats))
        table = ExpertTable([base] * L, torch.zeros(L, E, 3, **z), self._expert_format())  # unused: the LRU's
        cuda = dev.type == "cuda"
        self._lru = o = {
            "key": key, "lru": lru, "host": host,  # held: the kernels address its records by raw offsets
            "kern": DecodeKernels(state.model, state.kv, table, graph=cuda, blocks=self.kernel_blocks, lru=lru,
                                  forced=forced),
            "bufs": [tuple(torch.zeros(L, K, dtype=torch.long, pin_memory=cuda) for _ in range(2)) for _ in range(2)],
            "events": [torch.cuda.Event() if cuda else None for _ in range(2)]}
        return o

    def _upload_lru(self, lru) -> None:
        """The host cache's state into the device LRU: reads in flight settled (the compute stream waits for their
        copies), then per slot its key and stamp (LRU order; free slots in the order the host takes them)."""
        state = self.state
        cache, E = state.cache, state.config.num_experts
        cache.drain()
        for entry in cache.entries.values():
            state.settle(entry)
        S = cache.capacity_experts
        owner, stamp = [-1] * S, [0] * S
        order = cache.lru_order()
        if len(order) != len(cache.entries) or len(order) + len(cache.free) != S:
            raise RuntimeError(f"expert cache state: {len(order)} in the LRU order, {len(cache.entries)} entries, "
                               f"{len(cache.free)} free of {S} slots")
        for t, key in enumerate(order, 1):
            slot = cache.entries[key].slot
            owner[slot], stamp[slot] = key[0] * E + key[1], t
        n = len(cache.free)
        for t, slot in enumerate(reversed(cache.free)):  # the host pops free slots from the end of its list
            stamp[slot] = t - n
        lru.load(owner, stamp, len(order))

    def _account_lru(self, buf: tuple[torch.Tensor, torch.Tensor], step: int) -> None:
        """The device LRU's step, replayed through the engine's cache (requests, hits, misses, bytes read,
        evictions, trace, policy; no reads: the kernels wrote the missed experts into their slots), checking that
        both chose the same slots. If they did not, the cache is emptied (the next step starts from nothing
        resident) and a RuntimeError says where."""
        state = self.state
        cache = state.cache
        with cache.replaying(step):  # the kernels already wrote the missed experts into their slots
            for layer, (ids, slots) in enumerate(zip(buf[0].tolist(), buf[1].tolist())):
                entries = []
                for x, slot in zip(ids, slots):
                    hit = (layer, x) in cache.entries
                    entry = cache.request((layer, x))
                    entries.append(entry)
                    if hit != (slot >= 0) or entry.slot != (slot if slot >= 0 else -1 - slot):
                        cache.clear()  # neither side's idea of the slots is to be trusted: start empty
                        raise RuntimeError(
                            f"the device's expert cache and the engine's disagree at step {step}, layer {layer}, "
                            f"expert {x}: device {'hit' if slot >= 0 else 'miss'} in slot "
                            f"{slot if slot >= 0 else -1 - slot}, host {'hit' if hit else 'miss'} in slot {entry.slot}")
                for entry in entries:
                    cache.release(cache.wait(entry))
