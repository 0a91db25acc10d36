"""The CUDA-graph decoders of the model's own kernels (``backend="graph"``, exact: bit-identical tokens) and of
fused inductor kernels (``backend="fused"``: one graph per step, equal to the model up to rounding), for an engine
whose cache holds every expert of the model. docs/engine.md describes both.

* exact: each layer's K selected experts are gathered (on the device, by slot) into a static K-slot buffer and
  computed with ``F.linear`` on the model's layouts; reductions are the model's ATen kernels; the elementwise chains
  between them are fused by inductor with its precision-cast emulation (the eager chain's bits). Attention runs
  eagerly between graph pieces over exactly the cached keys: per token L + 1 graph replays and L attention calls.
* fused: one graph for the whole step (``fused_ops``): attention over the static KV buffers with a position mask,
  each expert matrix read in place from its slot by an indirect-load reduction.

The only host sync is at the step's end, to read its expert ids for the engine's counters (every request a hit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.attention import attention_mask
from ..state import EngineState
from .base import GraphBase, _sync
from .fused_ops import POINTWISE, emulates_casts, fused_post, fused_pre, sorted_route


class GraphDecoder(GraphBase):
    """Exact (the model's kernels) or fused graphs; ``fused`` None follows the engine's ``exact``."""

    def __init__(self, state: EngineState, fused: bool | None = None, compile: bool = True,
                 fuse_pointwise: bool = True) -> None:
        self.fuse_pointwise = fuse_pointwise  # exact: the elementwise chains compiled (bit-exact), else eager
        self.fused = (not state.exact) if fused is None else bool(fused)
        self.compile = compile
        super().__init__(state)

    def usable(self) -> bool:
        state = self.state
        return (state.device.type == "cuda" and state.zero_copy and len(state.hooks) == 0
                and state.lm_head_predictor is None and self._holds_all() and not state.lookahead)

    def decode(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, 1, V) of one token ids (1, 1) at position ``start``; counters updated as the eager path."""
        state = self.state
        state.next_step()
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
            for layer in state.kv.layers:
                layer.length += 1
        self.replays += 1
        done = s["done"]
        if done is not None:
            done.record()
            done.synchronize()  # the step's ids are in pinned host memory: the one host sync of the step
        self._account(s["ids_host"])
        return s["logits"].clone()

    def _build(self, ids: torch.Tensor, start: int) -> None:
        self.reset()
        self._static["slot_table"] = self._resident()
        self._static_buffers(ids, start)
        if not self.fused:
            self._build_exact()
        else:
            self._build_fused()
        self._key = self._state_key()

    def _static_buffers(self, ids: torch.Tensor, start: int) -> None:
        """The exact and fused variants' step inputs and outputs (token, position, expert ids, logits)."""
        state, s = self.state, self._static
        cfg, dev = state.config, state.device
        L, K = cfg.num_hidden_layers, cfg.top_k
        s["tok"] = torch.zeros(1, 1, dtype=torch.long, device=dev)
        s["pos"] = torch.full((1,), start, dtype=torch.long, device=dev)  # the fused warm-up runs this step
        s["tok"].copy_(ids.view(1, 1))
        s["ids"] = torch.zeros(L, K, dtype=torch.long, device=dev)
        cuda = dev.type == "cuda"
        s["ids_host"] = torch.zeros(L, K, dtype=torch.long, pin_memory=cuda)
        s["done"] = torch.cuda.Event() if cuda else None
        s["logits"] = torch.zeros(1, 1, cfg.vocab_size, dtype=state.dtype, device=dev)  # exact: replaced by the graph's
        _sync(dev)

    def _replay_exact(self, start: int) -> None:
        state, s = self.state, self._static
        graphs, positions, attn_in = self._graphs, s["pos"], s["attn"]
        for i, layer in enumerate(state.layers):
            graphs[i].replay()
            attn, kvl = layer.self_attn, state.kv[i]
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

    def _build_exact(self) -> None:
        state, s = self.state, self._static
        cfg, dev, dtype = state.config, state.device, state.dtype
        H, K, L, eps = cfg.hidden_size, cfg.top_k, cfg.num_hidden_layers, cfg.rms_norm_eps
        attn0 = state.layers[0].self_attn
        s["xbuf"] = torch.empty(K * state.bundle.stride, dtype=torch.uint8, device=dev)
        words = state.bundle.stride // 8  # the gather moves 8-byte words (records are 4 KiB multiples)
        arena_rows = state.arena.flat_view(torch.int64).view(state.arena.n_slots, words)
        xrows = s["xbuf"].view(torch.int64).view(K, words)
        wg, wu, wd = self._slot_views(s["xbuf"], K)
        experts = [(wg[j], wu[j], wd[j]) for j in range(K)]
        s["attn"] = torch.zeros(1, 1, attn0.n_heads * attn0.head_dim, dtype=dtype, device=dev)
        for name in ("q", "k", "v", "w", "sid", "x", "sq"):  # per layer: graph outputs, static between replays
            s[name] = [None] * L
        model = state.model.model

        def embed():
            x = model.embed_tokens(s["tok"])
            s["x"][0], s["sq"][0] = x, pw["sq"](x)
            if any(cfg.rope_layout):
                s["cos"], s["sin"] = model.rotary(s["pos"], x.dtype)

        def pre(i):
            layer = state.layers[i]
            attn, kvl = layer.self_attn, state.kv[i]
            x = s["x"][i]
            s["sid"][i], s["w"][i] = sorted_route(layer.block_sparse_moe.route(x).reshape(-1, cfg.num_experts), K,
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
            layer = state.layers[i]
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
                s["logits"] = state.model.lm_head(pw["norm"](x, sq.mean(-1, keepdim=True), model.norm.weight, eps))
                torch.stack(s["sid"], out=s["ids"])
                s["ids_host"].copy_(s["ids"], non_blocking=True)

        pieces = [lambda: (embed(), pre(0))] + [lambda i=i: (post(i - 1), pre(i)) for i in range(1, L)] + \
                 [lambda: post(L - 1)]

        def warm():  # library handles, lazy inits, compilation; static buffers and the position's K/V slot only
            for fn in pieces:
                fn()
            _sync(dev)

        pw = dict(POINTWISE)
        self.compiled = False
        if self.compile and self.fuse_pointwise and emulates_casts():
            pw = {k: torch.compile(f, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})
                  for k, f in POINTWISE.items()}
            try:
                warm()
                self.compiled = True
            except Exception as exc:  # noqa: BLE001  the eager kernels (as exact by construction)
                self.compile_error = f"{type(exc).__name__}: {exc}"
                pw = dict(POINTWISE)
        if not self.compiled:
            warm()
        self._graphs = [self._capture(fn) for fn in pieces]

    def _build_fused(self) -> None:
        state, s = self.state, self._static
        cfg, dtype = state.config, state.dtype
        K = cfg.top_k
        model = state.model.model
        flat, stride, (og, ou, od) = self._arena_elements()
        arena = flat.view(state.arena.n_slots, stride)
        Fh, H = state.bundle.matrices["gate"].shape
        down = (H, Fh) if state.exact else (Fh, H)  # exact: the model's [H, F] layout, transposed in the slots
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
        for i, layer in enumerate(state.layers):
            a = layer.self_attn
            layers.append(dict(
                wr=layer.block_sparse_moe.primary_router.weight, ln1=layer.input_layernorm.weight,
                wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight, kv=state.kv[i], window=a.window, use_rope=a.use_rope,
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
                         mats=mats, eps=eps, window=p["window"], down_hf=state.exact, compiled=compiled)
            s["logits"].copy_(state.model.lm_head(model.norm(x.view(1, 1, -1))))
            torch.stack(ids, out=s["ids"])
            s["ids_host"].copy_(s["ids"], non_blocking=True)

        self._graphs = {}
        self._fused = {"step": step, "pre": pre, "post": post, "compiled": compiled,
                       "max_keys": max(kv.capacity for kv in state.kv.layers)}
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
        f, dev = self._fused, self.state.device
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
