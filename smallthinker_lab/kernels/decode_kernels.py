"""``DecodeKernels``: one decode step of SmallThinker as five Triton kernels per layer (triton_decode.py), captured
as one CUDA graph per step, over a KV cache of fixed capacity and the experts of an ``ExpertTable``."""

from __future__ import annotations

import torch

from ..model.kv_cache import KVCache
from .availability import INTERPRETER_BLOCKS, _pdl_supported, interpreted, unavailable_reason
from .tables import ExpertLRU, ExpertTable, _p2


def _kernels():
    from . import triton_decode

    return triton_decode


# tiles of the kernels: (rows of a weight matrix per program, warps) for the products, (keys per step, warps) for
# attention; "pdl": launch with programmatic dependent launch (CUDA, compute capability 9.0 and up), so that each
# kernel's weight reads overlap the previous kernel. Tuned on an H100 for the 4B shape by
# benchmarks/gpu_decode_graph.py --tune. Quantized experts (an ExpertTable of format "int8" / "q4_0"): their tiles
# are quant_experts.DEFAULT_QUANT_BLOCKS, overridden by blocks["int8"] / blocks["q4_0"] ({"gate_up": ..., "down": ...})
DEFAULT_BLOCKS = {"pre": (2, 4), "oproj": (8, 4), "gate_up": (4, 2), "down": (2, 2), "attn": (64, 2), "pdl": True}


class DecodeKernels:
    """One decode step of ``model`` (its non-expert weights) over ``kv`` (fixed capacity) and the experts of
    ``experts``, as five Triton kernels per layer; ``graph=True`` captures the step as one CUDA graph on first use.

    ``step(token, pos)`` returns the logits (1, 1, V), writes the position's K/V and advances ``kv``; the step's
    chosen expert ids (ascending, per layer) are in ``ids`` (device). With ``experts.format`` "int8" or "q4_0" the
    expert products read the quantized records (quant_experts.py); the rest of the step is unchanged."""

    def __init__(self, model, kv: KVCache, experts: ExpertTable, graph: bool = True,
                 blocks: dict | None = None, lru: ExpertLRU | None = None, forced: bool = False) -> None:
        cfg = model.config
        dev = model.lm_head.weight.device
        reason = unavailable_reason(dev)
        if reason:
            raise RuntimeError(reason)
        if model.lm_head.weight.dtype != torch.bfloat16:
            raise ValueError(f"the decode kernels compute bf16 models; this one is {model.lm_head.weight.dtype}")
        self.config, self.model, self.kv, self.experts = cfg, model, kv, experts
        self.device = dev
        self.blocks = {**DEFAULT_BLOCKS, **(INTERPRETER_BLOCKS if interpreted() else {}), **(blocks or {})}
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        H, Fh, D = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.head_dim
        experts.check(L, E, Fh, H)
        if len(kv) != L:
            raise ValueError(f"KV cache has {len(kv)} layers, the model {L}")
        nq, nk = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
        self.nq, self.nk = nq, nk
        bf = torch.bfloat16
        z = dict(device=dev)
        self.tok = torch.zeros(1, dtype=torch.long, **z)
        self.pos = torch.zeros(1, dtype=torch.long, **z)
        self.x = torch.zeros(H, dtype=bf, **z)
        self.xm = torch.zeros(H, dtype=bf, **z)
        self.proj = torch.zeros(nq + 2 * nk + 2 * E, dtype=bf, **z)  # q, k, v, router logits, look-ahead logits
        self.pred = torch.zeros(K, dtype=torch.long, **z)  # look-ahead: the next layer's predicted experts
        self.o = torch.zeros(nq, dtype=bf, **z)
        self.sel_off = torch.zeros(K * 3, dtype=torch.long, **z)
        self.sel_w = torch.zeros(K, dtype=bf, **z)
        self.a = torch.zeros(K * Fh, dtype=bf, **z)
        self.hn = torch.zeros(1, H, dtype=bf, **z)
        self.ids = torch.zeros(L, K, dtype=torch.long, **z)
        # forced routing (a replayed trace): each layer routes to the K experts the host writes here before a step
        self.forced = torch.zeros(L, K, dtype=torch.long, **z) if forced else None
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=bf, **z)
        self.lru = lru  # experts resolved by a device LRU over host records (the table is then unused)
        if lru is not None:
            if lru.src.numel() != L * E:
                raise ValueError(f"expert LRU: {lru.src.numel()} record offsets for {L} x {E} experts")
            self.slots = torch.zeros(L, K, dtype=torch.long, **z)  # per layer the chosen experts' slots (miss: -1 - s)
            self.dst_off = torch.zeros(K * 3, dtype=torch.long, **z)  # where a missed expert is written through
        inner = model.model
        self.inv_freq = inner.rotary.inv_freq.to(dev, torch.float32)
        self.layers = []
        for i, layer in enumerate(inner.layers):
            a, moe = layer.self_attn, layer.block_sparse_moe
            w = dict(wr=moe.primary_router.weight, ln1=layer.input_layernorm.weight, wq=a.q_proj.weight,
                     wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
                     ln2=layer.post_attention_layernorm.weight)
            for name, t in w.items():
                if not t.is_contiguous() or t.dtype != bf or t.device != dev:
                    raise ValueError(f"layer {i} {name}: the kernels need contiguous bf16 weights on {dev}")
            kvl = kv[i]
            if kvl.k.dtype != bf or not kvl.k.is_contiguous():
                raise ValueError(f"layer {i}: the KV cache must be contiguous bf16")
            w.update(kv=kvl, window=a.window or 0, rope=bool(a.use_rope), softmax=bool(moe.apply_softmax),
                     base=experts.bases[i], table=experts.offsets[i].contiguous(), ids=self.ids[i],
                     force={} if self.forced is None else {"force_ptr": self.forced[i], "FORCED": True})
            self.layers.append(w)
        # global layers hold position p at slot p: the positions a step may write
        self._max_pos = min([kvl.k.shape[2] for kvl in kv.layers if kvl.window is None] or [1 << 62])
        self.graph = graph and dev.type == "cuda"
        self._graph = None
        self.replays = 0

    @property
    def max_positions(self) -> int:
        """The positions a step may write: the capacity of the smallest global layer's KV cache (a step at a
        position >= this raises)."""
        return self._max_pos

    def launch_config(self, pdl: bool | None = None) -> dict:
        """The launch options of the step's kernels (``launch_embed``, ``launch_pre``, ...): with programmatic
        dependent launch or not (``pdl`` None: as the tile sizes say, where the device supports it)."""
        return self._cfg(pdl)

    # ------------------------------------------------------------------ the step's kernels
    def _cfg(self, pdl: bool | None = None) -> dict:
        b = self.blocks
        if pdl is None:
            pdl = bool(b["pdl"]) and _pdl_supported(self.device)
        return {"pdl": pdl, "launch": {"launch_pdl": True} if pdl else {}}

    def launch(self) -> None:
        """Every kernel of one step, reading ``tok`` and ``pos`` (device) and writing ``logits``; then the greedy
        next token (argmax of the logits) into ``tok`` and the next position into ``pos``, so that a step can follow
        without the host (``advance``)."""
        c = self._cfg()
        self.launch_embed(c)
        for i in range(len(self.layers)):
            self.launch_pre(i, c)
            self.launch_attention(i, c, route=True)
            self.launch_post(i, c)
        self.launch_final(c)
        torch.argmax(self.logits, dim=-1, out=self.tok)
        self.pos.add_(1)

    # the pieces of a step: embed; per layer pre (+ route), attention (+ route), post; final
    def launch_embed(self, c: dict) -> None:
        H = self.config.hidden_size
        _kernels()._embed_kernel[(1,)](self.tok, self.model.model.embed_tokens.weight, self.x, H=H, BLOCK_H=_p2(H),
                                       PDL=c["pdl"], **c["launch"])

    def launch_pre(self, i: int, c: dict, lookahead: bool = False) -> None:
        """RMSNorm, q/k/v and the router logits of layer ``i``; ``lookahead``: also the next layer's router logits
        of the same (raw) residual."""
        cfg, p = self.config, self.layers[i]
        H, E, nq, nk = cfg.hidden_size, cfg.num_experts, self.nq, self.nk
        pr, pw = self.blocks["pre"]
        nbq, nbk, nbe = -(-nq // pr), -(-nk // pr), -(-E // pr)
        la = lookahead and i + 1 < len(self.layers)
        extra = {"wn_ptr": self.layers[i + 1]["wr"], "NBE": nbe} if la else {}
        _kernels()._pre_kernel[(nbq + 2 * nbk + nbe * (2 if la else 1),)](
            self.x, p["ln1"], p["wq"], p["wk"], p["wv"], p["wr"], self.proj, float(cfg.rms_norm_eps), H=H, NQ=nq,
            NK=nk, NE=E, NBQ=nbq, NBK=nbk, BLOCK_R=pr, BLOCK_H=_p2(H), PDL=c["pdl"], num_warps=pw, **extra,
            **c["launch"])

    def launch_route(self, i: int, c: dict, lookahead: bool = False) -> None:
        """Layer ``i``'s routing alone (ids, weights and, from the table, offsets): for callers that read the ids
        on the host before attention (the engine's offloaded kernel decode); ``lookahead``: also the next layer's
        predicted ids (``pred``), from the logits ``launch_pre(lookahead=True)`` wrote."""
        cfg, p = self.config, self.layers[i]
        D = cfg.head_dim
        la = lookahead and i + 1 < len(self.layers)
        extra = {"pred_ptr": self.pred, "LOOKAHEAD": True} if la else {}
        _kernels()._route_kernel[(1,)](
            self.proj[cfg.num_attention_heads * D + 2 * cfg.num_key_value_heads * D:], p["table"], self.sel_off,
            self.sel_w, p["ids"], NE=cfg.num_experts, BLOCK_E=_p2(cfg.num_experts), K=cfg.top_k,
            SOFTMAX=p["softmax"], PDL=c["pdl"], **extra, **p["force"], **c["launch"])

    def launch_attention(self, i: int, c: dict, route: bool) -> None:
        cfg, p = self.config, self.layers[i]
        D, E = cfg.head_dim, cfg.num_experts
        an, aw = self.blocks["attn"]
        kvl = p["kv"]
        lru, extra = self.lru, {}
        if lru is not None and route:
            og, ou, od = lru.mats
            extra = dict(owner_ptr=lru.owner, stamp_ptr=lru.stamp, clock_ptr=lru.clock, src_ptr=lru.src,
                         slot_ptr=self.slots[i], dst_off_ptr=self.dst_off, layer=i, stride=lru.stride, S=lru.slots,
                         BLOCK_S=_p2(lru.slots), OG=og, OU=ou, OD=od, LRU=True)
        _kernels()._rope_attn_route_kernel[(cfg.num_attention_heads + int(route),)](
            self.proj, self.pos, self.inv_freq, kvl.k, kvl.v, kvl.pos, self.o, p["table"], self.sel_off,
            self.sel_w, p["ids"], kvl.k.shape[2], p["window"], 1.0 / D ** 0.5, NQH=cfg.num_attention_heads,
            NKV=cfg.num_key_value_heads, D=D, NE=E, BLOCK_E=_p2(E), K=cfg.top_k, BLOCK_N=an,
            USE_ROPE=p["rope"], SOFTMAX=p["softmax"], PDL=c["pdl"], num_warps=aw, **extra,
            **(p["force"] if route else {}), **c["launch"])

    def launch_post(self, i: int, c: dict) -> None:
        """o_proj and the residual, then the K experts (offsets in ``sel_off``) and the residual."""
        tk, cfg, p, b = _kernels(), self.config, self.layers[i], self.blocks
        H, Fh, K = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.top_k
        orr, ow = b["oproj"]
        gr, gw = b["gate_up"]
        dr, dw = b["down"]
        pdl, launch = c["pdl"], c["launch"]
        x, xm = self.x, self.xm
        wt = {"dst_off_ptr": self.dst_off, "WRITE": True} if self.lru is not None else {}  # write-through
        tk._oproj_kernel[(-(-H // orr),)](self.o, p["wo"], x, xm, H=H, HD=self.nq, BLOCK_R=orr,
                                           BLOCK_D=_p2(self.nq), PDL=pdl, num_warps=ow, **launch)
        fmt = self.experts.format
        if fmt != "bf16":  # int8 / Q4_0 records, dequantised in registers (quant_experts.py)
            from . import quant_experts as qe

            dst = self.dst_off if self.lru is not None else None
            qb = b.get(fmt)
            qe.launch_gate_up(fmt, xm, p["ln2"], p["base"], self.sel_off, self.a, float(cfg.rms_norm_eps), H, Fh, K,
                              blocks=qb, pdl=pdl, launch=launch, dst_off=dst)
            qe.launch_down(fmt, self.a, p["base"], self.sel_off, self.sel_w, xm, x, H, Fh, K, blocks=qb, pdl=pdl,
                           launch=launch, dst_off=dst)
            return
        tk._gate_up_kernel[(K, -(-Fh // gr))](xm, p["ln2"], p["base"], self.sel_off, self.a,
                                              float(cfg.rms_norm_eps), H=H, F=Fh, BLOCK_R=gr, BLOCK_H=_p2(H),
                                              PDL=pdl, num_warps=gw, **wt, **launch)
        tk._down_kernel[(-(-H // dr),)](self.a, p["base"], self.sel_off, self.sel_w, xm, x, H=H, F=Fh, K=K,
                                        BLOCK_K=_p2(K), BLOCK_R=dr, BLOCK_F=_p2(Fh), PDL=pdl, num_warps=dw, **wt,
                                        **launch)

    def launch_final(self, c: dict) -> None:
        H = self.config.hidden_size
        _kernels()._norm_kernel[(1,)](self.x, self.model.model.norm.weight, self.hn, float(self.config.rms_norm_eps),
                                      H=H, BLOCK_H=_p2(H), PDL=c["pdl"], **c["launch"])
        torch.matmul(self.hn, self.model.lm_head.weight.t(), out=self.logits)

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (1, 1, V) of ``token`` at position ``pos`` (the KV cache holds positions < pos): a view of the
        step's static logits buffer, which the next step overwrites."""
        if pos >= self._max_pos:
            raise ValueError(f"position {pos} is past the KV cache's capacity {self._max_pos}")
        self.tok.copy_(token.reshape(1), non_blocking=True)
        self.pos.fill_(pos)
        self.advance()
        return self.logits.view(1, 1, -1)

    def advance(self) -> None:
        """One step from the token and position on the device (set by ``step``, or the previous step's argmax and
        position + 1: greedy decoding with no host work between steps); advances ``kv``."""
        if not self.graph:
            self.launch()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            self.replays += 1
        for kvl in self.kv.layers:
            kvl.length += 1

    def _capture(self) -> None:
        """Warm up (compiles the kernels; it writes this position's K/V, which the replay writes again with the
        same values; the token, the position and a device LRU's state are put back, so that the replay computes the
        same step, makes the same choices and writes the same experts into the same slots), then capture the step."""
        lru = self.lru
        live = [self.tok, self.pos] + ([lru.owner, lru.stamp, lru.clock] if lru is not None else [])
        state = [t.clone() for t in live]
        self.launch()
        torch.cuda.synchronize(self.device)
        for t, saved in zip(live, state):
            t.copy_(saved)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self.launch()
        self._graph = g
