"""CUDA-graph decode for the engine when every expert of the model is resident in its GPU expert cache.

``Engine(..., device="cuda", cuda_graph=True)`` decodes (T == 1) through this module when the cache holds every
expert of the model (capacity >= layers x experts, e.g. ``memory_limit=None``), no hook is registered, no LM-head
predictor and no look-ahead are in use, and the bundle is stored in the engine's dtype; otherwise the eager path
runs. Nothing in a decode step waits for the host: the router's top-k, the expert ids' sort (the model's combine
order), the slot of each selected expert (a device table ``slot_table[layer, expert]``) and the expert weights are
all resolved on the GPU. The only host sync is at the end of the step, to read the step's expert ids (copied to a
pinned host buffer inside the graph) for the engine's counters: every request is a hit, counted per layer, appended
to the trace and shown to the replacement policy as the eager path does. Generation syncs there anyway (the sampled
token goes to the host), and the sync makes ``decode_seconds`` the step's real time.

Two variants: ``cuda_graph=True`` follows the engine's ``exact``; ``cuda_graph="fused"`` takes the fused one
whatever ``exact`` says (the prefill and any eager step keep exact's kernels):

* exact (``exact=True``): the model's kernels, bit-identical greedy tokens. Each layer's K selected experts are copied
  (one gather kernel, on the device, by slot) into a static K-slot buffer and computed with ``F.linear`` on the
  model's layouts, as the eager path does from the slots (same shapes, same cuBLAS kernels); reductions (RMSNorm's
  mean, routing) are the model's ATen kernels; the elementwise chains between them (RMSNorm's tail, rotary, the
  residual adds, ReGLU, the weighted combine) are fused by inductor with its precision-cast emulation, which gives
  the eager chain's bits (``fuse_pointwise=False``: the eager kernels). Attention runs eagerly between graph
  pieces, ``scaled_dot_product_attention`` over exactly the cached keys (a graph would fix the key count; the
  pieces write the new K/V): per token L + 1 graph replays and L attention calls.
* fused (``exact=False`` or ``cuda_graph="fused"``): one graph for the whole step, with fused kernels
  (``torch.compile`` / inductor, falling back to the same code eagerly in the graph if compilation fails): RMSNorm,
  rotary and routing fused; attention over the static KV buffers with a position mask; each expert matrix read in
  place from its slot by an indirect-load reduction (no copy). The model's bf16 roundings between ops are kept, but
  reductions accumulate in a different order (and attention is a different algorithm), so logits can differ from
  the model's in the last bits; greedy tokens then agree unless the model has near-tied router or LM-head logits
  (benchmarks/gpu_decode_graph.py measures whether they agree on the benchmark's prompts).

* kernels (``cuda_graph="kernels"``, exact=True implied): the Triton decode kernels of ``smallthinker_lab.kernels``,
  five per layer, in one graph per step; each expert read in place from its slot through an [L, E, 3] table of
  element offsets (slot x record stride + matrix offset). The in-memory model decoding with the same kernels
  (``KernelRunner``) gives the same bits; the eager model, the same up to rounding. When the cache holds only part
  of the experts (offloaded):

  - LRU policy, no look-ahead, every record in pinned host memory (``host_cache=True``): the cache is resolved on
    the device (``device_lru``, ``smallthinker_lab.kernels.ExpertLRU``). Each layer's routing program looks the
    chosen experts up and picks LRU victims; the expert kernels read a missed expert straight from its host record
    over the bus (zero-copy) and write it into its slot. The step stays one graph with no host round trip per
    layer. The host replays the step's requests through the engine's ExpertCache while the device runs the next
    step (``_account_lru``): counters, trace and policy are the cache's own, and a disagreement on any hit or slot
    is an error.
  - otherwise (LFU or Belady, look-ahead, experts read from storage): per layer the host reads the routing and
    requests the experts from the cache, whose misses are copied by the copy engine (``_decode_offload``).

Memory: the K-slot expert buffer of ``exact=True`` (K x record stride) is counted in the engine's workspace; the
graphs' private pool (the activations of one decode step) is not counted in the plan.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from ..model.attention import attention_mask


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (fp32, cast back, then the weight)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _route(logits: torch.Tensor, k: int, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """route_weights of the model for one token, then the ids sorted ascending (the model's combine order) with
    their weights: (K,) long, (K,) in logits' dtype."""
    top, ids = torch.topk(logits, k, dim=-1)  # (1, K)
    if softmax:
        w = torch.softmax(top.float(), dim=-1).to(logits.dtype)
    else:
        s = torch.sigmoid(top)
        w = s / s.sum(dim=-1, keepdim=True)
    sid, perm = torch.sort(ids[0])
    return sid, w[0].gather(0, perm)


# ------------------------------------------------------------------ exact: the model's elementwise chains, fused
# Each helper is a chain of the model's elementwise ops between its reductions and matrix products. Compiled with
# inductor's ``emulate_precision_casts`` every intermediate is rounded to the tensors' dtype as the eager kernels
# round it, and the ops are IEEE fp32 (no reassociation; the roundings keep products from contracting into FMAs
# with a following add), so a fused chain gives the eager chain's bits with one kernel instead of several.
def _pw_sq(x):
    return x.float().pow(2)


def _pw_norm(x, m, weight, eps: float):
    """RMSNorm after its mean: x.float() * rsqrt(m + eps), cast back, times the weight."""
    return weight * (x.float() * torch.rsqrt(m + eps)).to(x.dtype)


def _pw_add_sq(x, y):
    """The residual add, and the squares the next RMSNorm averages."""
    z = x + y
    return z, z.float().pow(2)


def _pw_rope(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _pw_reglu(up, gate):
    return up * F.relu(gate)


def _pw_acc(y, out, w):
    """The engine's combine step: y + out * weight, each rounded."""
    return y + out * w


_POINTWISE = {"sq": _pw_sq, "norm": _pw_norm, "add_sq": _pw_add_sq, "rope": _pw_rope, "reglu": _pw_reglu,
              "acc": _pw_acc}


def _emulates_casts() -> bool:
    try:
        import torch._inductor.config as ic
    except Exception:  # noqa: BLE001
        return False
    return hasattr(ic, "emulate_precision_casts")


# ------------------------------------------------------------------ fused (exact=False) layer halves
def fused_pre(x, wr, ln1, wq, wk, wv, cos, sin, slot_row, *, k: int, softmax: bool, eps: float, n_heads: int,
              n_kv: int, head_dim: int, use_rope: bool):
    """Router (raw residual), routing, input norm, q/k/v, rotary. x (1, H) -> q (h, D), k/v (k, D), sorted ids,
    their weights and slots (K,)."""
    sid, w = _route(F.linear(x, wr), k, softmax)
    slots = slot_row.index_select(0, sid)
    h = _rmsnorm(x, ln1, eps)
    q = F.linear(h, wq).view(n_heads, head_dim)
    kk = F.linear(h, wk).view(n_kv, head_dim)
    v = F.linear(h, wv).view(n_kv, head_dim)
    if use_rope:
        q, kk = _rope(q, cos, sin), _rope(kk, cos, sin)
    return q, kk, v, sid, w, slots


def _expert_weights(arena, slots, mats, compiled: bool):
    """The K selected experts' (gate, up, down) as [K, rows, cols] views of their records. ``arena`` is every slot as
    one [n_slots, record elements] tensor: more elements than an int32 holds on a large model, so inductor indexes
    it with int64 (a [n_slots, F, H] view of the same bytes has fewer elements than its largest offset, and int32
    indexing then overflows). Compiled: indirect loads, nothing copied; eager: the K records gathered."""
    rec = arena[slots] if compiled else arena.index_select(0, slots)  # (K, record elements)
    return [rec[:, off:off + rows * cols].reshape(-1, rows, cols) for off, rows, cols in mats]


def fused_post(x, q, k_buf, v_buf, kpos, pos, wo, ln2, w, slots, arena, *, mats: tuple, eps: float,
               window: int | None, down_hf: bool, compiled: bool):
    """Attention over the static KV slots (positions masked), o_proj, residual, post norm, the K experts read in
    place from their slots (``mats``: element offset, rows, cols of gate, up, down in a record), the weighted
    combine in ascending expert order, residual. x (1, H) -> (1, H)."""
    dtype = x.dtype
    n_kv, D = k_buf.shape[1], k_buf.shape[3]
    qg = q.float().view(n_kv, -1, D) * (1.0 / math.sqrt(D))  # (k, h/k, D)
    kf, vf = k_buf[0].float(), v_buf[0].float()  # (k, C, D)
    valid = (kpos >= 0) & (kpos <= pos)
    if window is not None:
        valid = valid & (pos - kpos < window)
    if compiled:  # reductions inductor fuses (no materialised products)
        s = (qg[:, :, None, :] * kf[:, None, :, :]).sum(-1)  # (k, h/k, C)
    else:
        s = torch.matmul(qg, kf.transpose(1, 2))
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if compiled:
        o = (p[:, :, :, None] * vf[:, None, :, :]).sum(2)  # (k, h/k, D)
    else:
        o = torch.matmul(p, vf)
    x = x + F.linear(o.to(dtype).reshape(1, -1), wo)
    u = _rmsnorm(x, ln2, eps)  # (1, H)
    wg, wu, wd = _expert_weights(arena, slots, mats, compiled)
    if compiled:  # each weight read once, in place, from its slot (indirect loads), fp32 accumulation
        uf = u.float()
        g = (wg.float() * uf).sum(-1).to(dtype)  # (K, F)
        up = (wu.float() * uf).sum(-1).to(dtype)
        a = (up * F.relu(g)).float()  # (K, F), rounded to bf16 as the model's product is
        if down_hf:
            d = (wd.float() * a[:, None, :]).sum(-1)  # (K, H)
        else:
            d = (wd.float() * a[:, :, None]).sum(1)
    else:  # gather the K experts' matrices, then batched products
        ub = u.expand(slots.shape[0], -1).unsqueeze(-1)  # (K, H, 1)
        g = torch.bmm(wg, ub).squeeze(-1)
        up = torch.bmm(wu, ub).squeeze(-1)
        a = (up * F.relu(g)).unsqueeze(-1)  # (K, F, 1)
        d = torch.bmm(wd, a).squeeze(-1) if down_hf else torch.bmm(wd.transpose(1, 2), a).squeeze(-1)
    o = d.to(dtype) * w[:, None]  # (K, H): out * weight, as the engine
    y = o[0]
    for j in range(1, o.shape[0]):  # the model's combine: ascending expert id, bf16 adds
        y = y + o[j]
    return x + y


def _written_by_kernels(key, slot) -> Future:
    """The cache's loader while the device LRU's step is replayed: the kernels already wrote the expert."""
    return _DONE


_DONE: Future = Future()
_DONE.set_result(None)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _EagerGraph:
    """A stand-in for a captured graph on a CPU (tests of this module's logic): replay runs the function."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class GraphDecoder:
    """The engine's graph decode (see the module docstring). Built on first use, rebuilt when the engine's cache,
    KV cache or slots change (reopen, clear)."""

    def __init__(self, engine, fused: bool | None = None, compile: bool = True, fuse_pointwise: bool = True,
                 kernels: bool = False) -> None:
        self.e = engine
        self.kernels = bool(kernels)  # the Triton decode kernels (smallthinker_lab.kernels), one graph per step
        self.kernel_blocks: dict | None = None  # their tile sizes (None: the defaults)
        self.fuse_pointwise = fuse_pointwise  # exact: the elementwise chains compiled (bit-exact), else eager
        self.fused = (not engine.exact) if fused is None else bool(fused)
        self.compile = compile
        self.compiled = False  # whether the fused variant runs inductor kernels (set when built)
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

    def usable(self) -> bool:
        e = self.e
        base = e.device.type == "cuda" and e._zero_copy and len(e.hooks) == 0 and e.lm_head_predictor is None
        if self.kernels:  # a cache of fewer experts: the offloaded kernel decode (device LRU or host requests)
            return (base and e.dtype == torch.bfloat16 and not e.bundle.down_transposed
                    and (self._holds_all() or e.prefetch))
        return base and self._holds_all() and not e.lookahead

    def _holds_all(self) -> bool:
        """Whether the cache has a slot for every expert of the model."""
        c = self.e.config
        return self.e.cache.capacity_experts >= c.num_hidden_layers * c.num_experts

    def _state_key(self):
        e = self.e
        return (e.cache, e.cache.policy, e.kv, e.arena)

    def _valid(self) -> bool:
        key = self._key
        if key is None:
            return False
        now = self._state_key()
        c = self.e.config
        full = len(self.e.cache.entries) == c.num_hidden_layers * c.num_experts
        return full and all(a is b for a, b in zip(key, now))

    # ------------------------------------------------------------------ decode
    def decode(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, 1, V) of one token ids (1, 1) at position ``start``; counters updated as the eager path."""
        e = self.e
        e._step += 1
        e.cache.step = e._step
        if self.kernels:
            if not self._holds_all() and not self.device_lru():
                return self._decode_offload(ids, start)
            return self._deferred(ids, start, *self._kernel_step(ids, start))
        if not self._valid():
            self._build(ids, start)
        s = self._static
        s["tok"].copy_(ids.view(1, 1), non_blocking=True)
        s["pos"].fill_(start)
        if not self.fused:
            self._replay_exact(start)
        else:
            bucket = self._bucket(start)
            graph = self._graphs.get(bucket)
            if graph is None:
                graph = self._graphs[bucket] = self._capture_fused(bucket)
            graph.replay()
            for layer in e.kv.layers:
                layer.length += 1
        self.replays += 1
        done = s["done"]
        if done is not None:
            done.record()
            done.synchronize()  # the step's ids are in pinned host memory: the one host sync of the step
        self._account(s["ids_host"])
        return s["logits"].clone()

    # ------------------------------------------------------------------ greedy decode, one step ahead
    def pipelines(self) -> bool:
        """Whether greedy generation can run the kernel steps one ahead of the host (``decode_ahead``): the kernel
        variant, usable, with every expert resident or the cache resolved on the device."""
        return self.kernels and self.usable() and (self._holds_all() or self.device_lru())

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
        e = self.e
        self.flush()
        c, cache = e.config, e.cache
        cuda = e.device.type == "cuda"
        L, K = c.num_hidden_layers, c.top_k
        with torch.inference_mode():  # the kernels' buffers are inference tensors
            kern, account, _, _ = self._kernel_step(token.view(1, 1), e.kv.seq_len)
            sets = [((torch.zeros(L, K, dtype=torch.long, pin_memory=cuda), torch.zeros(L, K, dtype=torch.long,
                      pin_memory=cuda), torch.zeros(1, dtype=torch.long, pin_memory=cuda)),
                     torch.cuda.Event() if cuda else None) for _ in range(3)]
            kern.tok.copy_(token.reshape(1))
            kern.pos.fill_(e.kv.seq_len)
        inflight: deque = deque()
        launched = 0

        @torch.inference_mode()
        def launch():
            nonlocal launched
            e._step += 1
            kern.advance()
            buf, ev = sets[launched % 3]
            launched += 1
            self._copy_out(kern, buf, ev)  # with the step's greedy token
            inflight.append((buf, ev, e._step))
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
                e._count("decode", 1, dt, nbytes)
                check()
                e._check_unverified()
                yield tok, dt
                t0 = time.perf_counter()
                if tok in stop:
                    break
        finally:
            try:
                while inflight:  # launched past the end: run, counted; its position is not kept
                    settle()
                    for kvl in e.kv.layers:
                        kvl.length -= 1
            except BaseException:
                inflight.clear()
                cache.clear()  # the device's cache may be ahead of the host's: neither is trusted
                raise

    def _deferred(self, ids: torch.Tensor, start: int, kern, account, bufs: list, events: list) -> torch.Tensor:
        """One kernel step, counted later: its outputs go to one of two sets of pinned buffers (``_copy_out``); the
        previous step is counted on the host (``account(buffers, step)``) while the device runs this one."""
        e, j = self.e, self._flip
        logits = kern.step(ids, start).clone()
        buf, ev = bufs[j], events[j]
        self._copy_out(kern, buf, ev)
        self.flush()  # the previous step's counters, on the host while the device runs this step
        self._pending, self._flip = (buf, ev, e._step, account), 1 - j
        self._wait_event = ev  # Engine.forward waits on it after its own bookkeeping (wait())
        self.replays += 1
        return logits

    def _replay_exact(self, start: int) -> None:
        e, s = self.e, self._static
        graphs, positions, attn_in = self._graphs, s["pos"], s["attn"]
        for i, layer in enumerate(e._layers):
            graphs[i].replay()
            attn, kvl = layer.self_attn, e.kv[i]
            q, gqa = s["q"][i], attn.n_heads != attn.n_kv
            if attn.window is None:  # the graph wrote K/V at the position; attend over exactly the cached keys
                n = kvl.length + 1
                out = F.scaled_dot_product_attention(q, kvl.k[:, :, :n], kvl.v[:, :, :n], enable_gqa=gqa)
                kvl.length = n
            else:  # a sliding window: the model's ring update (ring + new key, then the mask it builds)
                k, v, k_pos = kvl.update(s["k"][i], s["v"][i], positions)
                mask = attention_mask(positions, k_pos, attn.window) if k.shape[2] > attn.window else None
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            attn_in.copy_(out.transpose(1, 2).reshape(attn_in.shape))
        graphs[-1].replay()

    def _account_ids(self, buf: tuple, step: int) -> None:
        """``_account`` of a kernel step's pinned ids (``_copy_out``'s first buffer)."""
        self._account(buf[0], step)

    def _account(self, ids_host: torch.Tensor, step: int | None = None) -> None:
        """Every expert of the step is a hit: requests, hits, per-layer hits, trace and policy as cache.request."""
        cache, e = self.e.cache, self.e
        st, pol, trace, entries = cache.stats, cache.policy, cache.trace, cache.entries
        step = e._step if step is None else step
        rows = ids_host.tolist()
        n = 0
        for layer, row in enumerate(rows):
            st.per_layer[layer][0] += len(row)
            for x in row:
                key = (layer, x)
                trace.append((step, layer, x))
                pol.on_request(key, True)
                entries[key].speculative = False
                if cache.hook:
                    cache.hook("hit", key, cache.expert_nbytes)
                if getattr(cache, "log", None) is not None:
                    cache.log.append((step, key, "hit"))
            n += len(row)
        st.requests += n
        st.hits += n

    # ------------------------------------------------------------------ building
    def _resident(self) -> torch.Tensor:
        """Read the experts not yet cached (demand requests: misses, counted), settle every copy and layout, and
        return the device slot table [L, E]."""
        e = self.e
        cache, cfg = e.cache, e.config
        L, E = cfg.num_hidden_layers, cfg.num_experts
        missing = [(layer, x) for layer in range(L) for x in range(E) if (layer, x) not in cache]
        for j in range(0, len(missing), 64):
            entries = [cache.request(k) for k in missing[j:j + 64]]
            for entry in entries:
                cache.release(cache.wait(entry))
        for entry in list(cache.entries.values()):
            e._settle(cache.wait(entry))  # copies and the exact layout settled, as the eager path on first use
        table = [[cache.entries[(layer, x)].slot for x in range(E)] for layer in range(L)]
        return torch.tensor(table, dtype=torch.long, device=e.device)

    def _slot_views(self, base: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of ``n`` records laid out every ``stride`` bytes from ``base`` (uint8): [n, F, H] x 2 and
        down [n, H, F] (exact: the model's layout) or [n, F, H] (stored)."""
        e = self.e
        m, isz = e.bundle.matrices, e.dtype.itemsize
        Fh, H = m["gate"].shape
        flat = base.view(e.dtype)
        st = e.bundle.stride // isz

        def view(name, shape):
            return flat.as_strided((n, *shape), (st, shape[1], 1), m[name].offset // isz)

        down = (H, Fh) if e.exact else (Fh, H)
        return view("gate", (Fh, H)), view("up", (Fh, H)), view("down", down)

    def _build(self, ids: torch.Tensor, start: int) -> None:
        self.reset()
        self._static["slot_table"] = self._resident()
        if self.kernels:  # DecodeKernels holds its own static buffers
            self._build_kernels()
        else:
            self._static_buffers(ids, start)
            if not self.fused:
                self._build_exact()
            else:
                self._build_fused()
        self._key = self._state_key()

    def _static_buffers(self, ids: torch.Tensor, start: int) -> None:
        """The exact and fused variants' step inputs and outputs (token, position, expert ids, logits)."""
        e, s = self.e, self._static
        cfg, dev = e.config, e.device
        L, K = cfg.num_hidden_layers, cfg.top_k
        s["tok"] = torch.zeros(1, 1, dtype=torch.long, device=dev)
        s["pos"] = torch.full((1,), start, dtype=torch.long, device=dev)  # the fused warm-up runs this step
        s["tok"].copy_(ids.view(1, 1))
        s["ids"] = torch.zeros(L, K, dtype=torch.long, device=dev)
        cuda = dev.type == "cuda"
        s["ids_host"] = torch.zeros(L, K, dtype=torch.long, pin_memory=cuda)
        s["done"] = torch.cuda.Event() if cuda else None
        s["logits"] = torch.zeros(1, 1, cfg.vocab_size, dtype=e.dtype, device=dev)  # exact: replaced by the graph's
        _sync(dev)

    def _capture(self, fn):
        if self.e.device.type != "cuda":  # tests on a CPU: the pieces run eagerly at each "replay"
            return _EagerGraph(fn)
        g = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            fn()
        return g

    def _arena_elements(self) -> tuple[torch.Tensor, int, list[int]]:
        """Every slot as one flat tensor of the engine's dtype, the record stride in elements, and the element
        offsets of gate, up and down inside a record."""
        e = self.e
        isz, m = e.dtype.itemsize, e.bundle.matrices
        flat = e.arena._tensor[:e.arena.n_slots * e.bundle.stride].view(e.dtype)
        return flat, e.bundle.stride // isz, [m[k].offset // isz for k in ("gate", "up", "down")]

    # kernels, offloaded: the cache holds fewer experts than the model; per layer the host reads the routing
    def _offload_kernels(self):
        """The kernels and buffers of the offloaded kernel decode, (re)built when the cache, KV cache or slots
        change."""
        from ..kernels import DecodeKernels, ExpertTable

        e = self.e
        key = (e.cache, e.kv, e.arena)
        o = getattr(self, "_off", None)
        if o is not None and all(a is b for a, b in zip(o["key"], key)):
            return o
        cfg, dev = e.config, e.device
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        cuda = dev.type == "cuda"
        base, stride, mats = self._arena_elements()
        table = ExpertTable([base] * L, torch.zeros(L, E, 3, dtype=torch.long, device=dev))  # offsets: the host's
        self._off = o = {
            "key": key, "kern": DecodeKernels(e.model, e.kv, table, graph=False, blocks=self.kernel_blocks),
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
        if name in o["warm"] and self.e.device.type == "cuda":
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
        e = self.e
        o = self._offload_kernels()
        kern, cache = o["kern"], e.cache
        if start >= kern._max_pos:
            raise ValueError(f"position {start} is past the KV cache's capacity {kern._max_pos}")
        kern.tok.copy_(ids.reshape(1), non_blocking=True)
        kern.pos.fill_(start)
        c = kern._cfg(pdl=False)  # copies and host waits sit between the kernels
        stride, (mg, mu, md) = o["stride"], o["mats"]
        L, K, la = e.config.num_hidden_layers, e.config.top_k, e.lookahead
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
                e._la_predicted[i] += len(predicted)
                e._la_correct[i] += len(set(predicted) & set(experts))
                predicted = None
            if la and i + 1 < L:  # look-ahead: the next layer's predicted experts start reading now
                predicted = both[K:]
                for x in predicted:
                    cache.speculate((i + 1, x))
            slots = {}
            for entry in cache.as_completed(entries):  # time blocked here is I/O wait
                e._settle(entry)
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
        for kvl in e.kv.layers:
            kvl.length += 1
        self.replays += 1
        return kern.logits.view(1, 1, -1).clone()

    # kernels, offloaded, the LRU cache resolved on the device: one graph per step, no host round trip per layer
    def device_lru(self) -> bool:
        """Whether the offloaded kernel decode resolves the cache on the device (``ExpertLRU``): the LRU policy,
        no look-ahead, and every expert record in page-locked host memory (``host_cache=True``; on a CPU, under
        the Triton interpreter, a host copy the decoder reads itself). Otherwise the host resolves each layer's
        requests (``_decode_offload``)."""
        e = self.e
        if e.cache.policy_name != "lru" or e.lookahead or (e._relayout_down or e.bundle.down_transposed):
            return False
        if e.transfer is not None:
            return e.transfer.host is not None
        return e.device.type == "cpu"

    def _host_records(self) -> torch.Tensor:
        e = self.e
        if e.transfer is not None:
            return e.transfer.host
        if self._host_copy is None or self._host_copy[0] is not e.reader:
            from .io import read_all_records

            self._host_copy = (e.reader, *read_all_records(e.reader))
        return self._host_copy[2]

    def _lru_kernels(self) -> dict:
        """The kernels, the device LRU and the pinned buffers of the device-LRU decode, (re)built when the cache, KV
        cache or slots change."""
        from ..kernels import DecodeKernels, ExpertLRU, ExpertTable

        e = self.e
        key = (e.cache, e.kv, e.arena)
        o = self._lru
        if o is not None and all(a is b for a, b in zip(o["key"], key)):
            return o
        self.flush()
        cfg, dev, b = e.config, e.device, e.bundle
        L, E, K, S = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k, e.cache.capacity_experts
        base, stride, mats = self._arena_elements()
        host, isz = self._host_records(), e.dtype.itemsize
        delta = host.data_ptr() - base.data_ptr()
        if delta % isz:
            raise RuntimeError("the host copy of the experts is not aligned to the weights' dtype")
        src = [(delta + b.offset(layer, x)) // isz for layer in range(L) for x in range(E)]
        z = dict(dtype=torch.long, device=dev)
        lru = ExpertLRU(torch.full((S,), -1, **z), torch.zeros(S, **z), torch.zeros(1, **z),
                        torch.tensor(src, **z), stride, tuple(mats))
        table = ExpertTable([base] * L, torch.zeros(L, E, 3, **z))  # unused: the LRU gives the offsets
        cuda = dev.type == "cuda"
        self._lru = o = {
            "key": key, "lru": lru, "host": host,  # held: the kernels address its records by raw offsets
            "kern": DecodeKernels(e.model, e.kv, table, graph=cuda, blocks=self.kernel_blocks, lru=lru),
            "bufs": [tuple(torch.zeros(L, K, dtype=torch.long, pin_memory=cuda) for _ in range(2)) for _ in range(2)],
            "events": [torch.cuda.Event() if cuda else None for _ in range(2)]}
        return o

    def _upload_lru(self, lru) -> None:
        """The host cache's state into the device LRU: reads in flight settled (the compute stream waits for their
        copies), then per slot its key and stamp (LRU order; free slots in the order the host takes them)."""
        e = self.e
        cache, E = e.cache, e.config.num_experts
        cache.drain()
        for entry in cache.entries.values():
            e._settle(entry)
        S = cache.capacity_experts
        owner, stamp = [-1] * S, [0] * S
        order = list(cache.policy.order)
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
        e = self.e
        cache = e.cache
        saved = cache.step, cache.loader
        cache.step, cache.loader = step, _written_by_kernels
        try:
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
        finally:
            cache.step, cache.loader = saved

    # kernels: the Triton decode kernels over the slots, one graph per step
    def _build_kernels(self) -> None:
        from ..kernels import DecodeKernels, ExpertTable

        e, s = self.e, self._static
        L = e.config.num_hidden_layers
        base, stride, mats = self._arena_elements()
        offsets = s["slot_table"][:, :, None] * stride + torch.tensor(mats, device=e.device)  # [L, E, 3] elements
        cuda = e.device.type == "cuda"
        K = e.config.top_k
        self._ids_bufs = [(torch.zeros(L, K, dtype=torch.long, pin_memory=cuda),) for _ in range(2)]  # no slots
        self._ids_events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._kern = DecodeKernels(e.model, e.kv, ExpertTable([base] * L, offsets), graph=e.device.type == "cuda",
                                   blocks=self.kernel_blocks)

    # exact: L + 1 graph pieces, the model's kernels, attention eager in between
    def _build_exact(self) -> None:
        e, s = self.e, self._static
        cfg, dev, dtype = e.config, e.device, e.dtype
        H, K, L, eps = cfg.hidden_size, cfg.top_k, cfg.num_hidden_layers, cfg.rms_norm_eps
        attn0 = e._layers[0].self_attn
        s["xbuf"] = torch.empty(K * e.bundle.stride, dtype=torch.uint8, device=dev)
        words = e.bundle.stride // 8  # the gather moves 8-byte words (records are 4 KiB multiples)
        arena_rows = e.arena._tensor[:e.arena.n_slots * e.bundle.stride].view(torch.int64).view(e.arena.n_slots, words)
        xrows = s["xbuf"].view(torch.int64).view(K, words)
        wg, wu, wd = self._slot_views(s["xbuf"], K)
        experts = [(wg[j], wu[j], wd[j]) for j in range(K)]
        s["attn"] = torch.zeros(1, 1, attn0.n_heads * attn0.head_dim, dtype=dtype, device=dev)
        for name in ("q", "k", "v", "w", "sid", "x", "sq"):  # per layer: graph outputs, static between replays
            s[name] = [None] * L
        model = e.model.model

        def embed():
            x = model.embed_tokens(s["tok"])
            s["x"][0], s["sq"][0] = x, pw["sq"](x)
            if any(cfg.rope_layout):
                s["cos"], s["sin"] = model.rotary(s["pos"], x.dtype)

        def pre(i):
            layer = e._layers[i]
            attn, kvl = layer.self_attn, e.kv[i]
            x = s["x"][i]
            s["sid"][i], s["w"][i] = _route(layer.block_sparse_moe.route(x).reshape(-1, cfg.num_experts), K,
                                            layer.block_sparse_moe.apply_softmax)
            torch.index_select(arena_rows, 0, s["slot_table"][i].index_select(0, s["sid"][i]), out=xrows)
            h = pw["norm"](x, s["sq"][i].mean(-1, keepdim=True), layer.input_layernorm.weight, eps)
            q = attn.q_proj(h).view(1, 1, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
            if attn.use_rope:
                q, k = pw["rope"](q, k, s["cos"], s["sin"])
            if attn.window is None:  # the model's cache update of a global layer: the new K/V at the position
                pos = s["pos"]
                kvl.k.index_copy_(2, pos, k)
                kvl.v.index_copy_(2, pos, v)
                kvl.pos.index_copy_(0, pos, pos)
            s["q"][i], s["k"][i], s["v"][i] = q, k, v

        def post(i):
            layer = e._layers[i]
            x, sq = pw["add_sq"](s["x"][i], layer.self_attn.o_proj(s["attn"]))
            u = pw["norm"](x, sq.mean(-1, keepdim=True), layer.post_attention_layernorm.weight, eps).reshape(-1, H)
            y = torch.zeros_like(u)
            w = s["w"][i]
            for j, (g_w, u_w, d_w) in enumerate(experts):  # ascending expert id: the model's combine order
                a = pw["reglu"](F.linear(u, u_w), F.linear(u, g_w))
                y = pw["acc"](y, F.linear(a, d_w), w[j:j + 1, None])
            x, sq = pw["add_sq"](x, y.view_as(x))
            if i + 1 < L:
                s["x"][i + 1], s["sq"][i + 1] = x, sq
            else:
                s["logits"] = e.model.lm_head(pw["norm"](x, sq.mean(-1, keepdim=True), model.norm.weight, eps))
                torch.stack(s["sid"], out=s["ids"])
                s["ids_host"].copy_(s["ids"], non_blocking=True)

        pieces = [lambda: (embed(), pre(0))] + [lambda i=i: (post(i - 1), pre(i)) for i in range(1, L)] + \
                 [lambda: post(L - 1)]

        def warm():  # library handles, lazy inits, compilation; static buffers and the position's K/V slot only
            for fn in pieces:
                fn()
            _sync(dev)

        pw = dict(_POINTWISE)
        self.compiled = False
        if self.compile and self.fuse_pointwise and _emulates_casts():
            pw = {k: torch.compile(f, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})
                  for k, f in _POINTWISE.items()}
            try:
                warm()
                self.compiled = True
            except Exception as exc:  # noqa: BLE001  the eager kernels (as exact by construction)
                self.compile_error = f"{type(exc).__name__}: {exc}"
                pw = dict(_POINTWISE)
        if not self.compiled:
            warm()
        self._graphs = [self._capture(fn) for fn in pieces]

    # fused: one graph for the whole step
    def _build_fused(self) -> None:
        e, s = self.e, self._static
        cfg, dtype = e.config, e.dtype
        K = cfg.top_k
        model = e.model.model
        flat, stride, (og, ou, od) = self._arena_elements()
        arena = flat.view(e.arena.n_slots, stride)
        Fh, H = e.bundle.matrices["gate"].shape
        down = (H, Fh) if e.exact else (Fh, H)  # exact: the model's [H, F] layout, transposed in the slots
        mats = ((og, Fh, H), (ou, Fh, H), (od, *down))
        pre, post = fused_pre, fused_post
        compiled = False
        if self.compile:
            try:
                import torch._inductor.config as ic

                opts = {"emulate_precision_casts": True} if hasattr(ic, "emulate_precision_casts") else {}
                pre = torch.compile(fused_pre, fullgraph=True, dynamic=False, options=opts)
                post = torch.compile(fused_post, fullgraph=True, dynamic=False, options=opts)
                compiled = True
            except Exception as exc:  # noqa: BLE001  the same code, eager kernels in the graph
                self.compile_error = f"{type(exc).__name__}: {exc}"
        layers = []
        for i, layer in enumerate(e._layers):
            a = layer.self_attn
            layers.append(dict(
                wr=layer.block_sparse_moe.primary_router.weight, ln1=layer.input_layernorm.weight,
                wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight, kv=e.kv[i], window=a.window, use_rope=a.use_rope,
                softmax=bool(layer.block_sparse_moe.apply_softmax), n_heads=a.n_heads, n_kv=a.n_kv,
                head_dim=a.head_dim))
        eps = cfg.rms_norm_eps

        def step(pre, post, compiled, keys):
            x = model.embed_tokens(s["tok"]).view(1, -1)
            pos = s["pos"]
            cos, sin = model.rotary(pos, dtype)  # (1, D)
            ids = []
            for i, p in enumerate(layers):
                q, k, v, sid, w, slots = pre(
                    x, p["wr"], p["ln1"], p["wq"], p["wk"], p["wv"], cos, sin, s["slot_table"][i], k=K,
                    softmax=p["softmax"], eps=eps, n_heads=p["n_heads"], n_kv=p["n_kv"], head_dim=p["head_dim"],
                    use_rope=p["use_rope"])
                ids.append(sid)
                kv = p["kv"]
                slot = pos % kv.capacity
                kv.k.index_copy_(2, slot, k.view(1, p["n_kv"], 1, -1))
                kv.v.index_copy_(2, slot, v.view(1, p["n_kv"], 1, -1))
                kv.pos.index_copy_(0, slot, pos)
                c = min(keys, kv.capacity)  # the slots that can hold a key: positions < keys, or the whole ring
                x = post(x, q, kv.k[:, :, :c], kv.v[:, :, :c], kv.pos[:c], pos, p["wo"], p["ln2"], w, slots, arena,
                         mats=mats, eps=eps, window=p["window"], down_hf=e.exact, compiled=compiled)
            s["logits"].copy_(e.model.lm_head(model.norm(x.view(1, 1, -1))))
            torch.stack(ids, out=s["ids"])
            s["ids_host"].copy_(s["ids"], non_blocking=True)

        self._graphs = {}
        self._fused = {"step": step, "pre": pre, "post": post, "compiled": compiled,
                       "max_keys": max(kv.capacity for kv in e.kv.layers)}
        self.compiled = compiled

    def _bucket(self, start: int) -> int:
        """Keys the fused step attends over at position ``start``: the next power of two >= start + 1 (at least
        64), at most the KV capacity. One graph per bucket, captured on first use."""
        b = 64
        while b < start + 1:
            b *= 2
        return min(b, self._fused["max_keys"])

    def _capture_fused(self, keys: int):
        """The fused step's graph for ``keys`` attended slots: warm-up (compiles; it writes the current position's
        K/V, which the replay writes again with the same values), then capture. Inductor failures fall back to the
        same code with eager kernels."""
        f, dev = self._fused, self.e.device
        step = f["step"]
        try:
            for _ in range(2):
                step(f["pre"], f["post"], f["compiled"], keys)
            _sync(dev)
            return self._capture(lambda: step(f["pre"], f["post"], f["compiled"], keys))
        except Exception as exc:  # noqa: BLE001
            if not f["compiled"]:
                raise
            self.compile_error = f"{type(exc).__name__}: {exc}"
        f.update(pre=fused_pre, post=fused_post, compiled=False)
        self.compiled = False
        self._graphs.clear()  # graphs of other buckets ran inductor kernels: captured again when used
        step(fused_pre, fused_post, False, keys)
        _sync(dev)
        return self._capture(lambda: step(fused_pre, fused_post, False, keys))
