"""Fused decode kernels: one token of SmallThinker in five Triton kernels per layer, for the model and the engine.

The eager decode step of the PyTorch model launches dozens of small kernels per layer; on a GPU their launches and
gaps, not the bytes of weights read, set the time of a token. ``DecodeKernels`` runs a decode step as five fused
kernels per layer (triton_decode.py says which), captured as one CUDA graph per step. It serves two callers:

* the in-memory model: ``KernelRunner(model)`` (prefill eager, decode through the kernels) and ``generate``;
* the engine, with every expert resident: ``Engine(..., device="cuda", cuda_graph="kernels")``.

Both address experts as one flat tensor plus an [L, E, 3] table of element offsets (``ExpertTable``): the engine's
slot arena, or the model's experts packed per layer (``pack_experts``, which makes the model's expert parameters
views of the packed buffer). They run the same kernels on the same layouts and values, so the engine's greedy
tokens equal the kernel model's, bit for bit.

Numerics against the eager model: the kernels keep the model's bf16 roundings (each product's output, RMSNorm's
cast, rotary, ReGLU, the combine in ascending expert id) but accumulate in another order than cuBLAS and flash
attention, so logits differ in the last bits. On a trained model the greedy tokens agree; on a model with random
weights, near-tied router logits can pick another expert and the tokens then drift (benchmarks/gpu_decode_graph.py
measures both).

Requirements: bf16 weights on a CUDA device (on a CPU only under ``TRITON_INTERPRET=1``, set before this package is
first imported: the tests run the kernels so); q/k/v/o, router and expert matrices contiguous; down in the model's
[H, F] layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.generate import SamplingConfig, stream_tokens
from ..model.kv_cache import KVCache


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device``, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the decode kernels need the triton package (pip install triton)"
    dev = torch.device(device)
    if dev.type == "cuda":
        return None
    if dev.type == "cpu" and interpreted():
        return None
    return f"the decode kernels run on CUDA devices (on a CPU only under TRITON_INTERPRET=1), not on {dev}"


def _kernels():
    from . import triton_decode

    return triton_decode


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass
class ExpertTable:
    """Where each expert's matrices are: ``bases[l]`` a flat tensor of the weights' dtype, ``offsets[l, e]`` the
    element offsets in it of gate [F, H], up [F, H] and down [H, F] (row-major, multiples of 16 elements)."""

    bases: list[torch.Tensor]
    offsets: torch.Tensor  # [L, E, 3] int64, on the device

    def check(self, num_layers: int, num_experts: int, ffn: int, hidden: int) -> None:
        if len(self.bases) != num_layers or tuple(self.offsets.shape) != (num_layers, num_experts, 3):
            raise ValueError(f"expert table: {len(self.bases)} bases and offsets {tuple(self.offsets.shape)}, "
                             f"expected {num_layers} and ({num_layers}, {num_experts}, 3)")
        if bool((self.offsets % 16 != 0).any()):
            raise ValueError("expert table: every matrix offset must be a multiple of 16 elements")
        for i, base in enumerate(self.bases):
            end = int(self.offsets[i].max()) + ffn * hidden
            if base.numel() < end:
                raise ValueError(f"expert table: layer {i}'s base holds {base.numel()} elements, fewer than its "
                                 f"offsets address ({end})")


@dataclass
class ExpertLRU:
    """An LRU cache of expert records resolved on the device, inside the decode step: the routing program of each
    layer looks its K chosen experts up in ``owner`` and stamps them; a missed one takes the least recently used
    slot and is read by the expert kernels straight from its record in host memory (page-locked, addressed from the
    device: zero-copy over the bus), which they also write into that slot. No host round trip per layer: the whole
    step stays one CUDA graph. The step's slots (a miss as -1 - slot) are in ``DecodeKernels.slots`` for the
    host's accounting, which replays the requests through the engine's ExpertCache and checks they agree.

    The state mirrors an ExpertCache with the LRU policy (``load``): the same victims in the same order, so the
    same slots, hits and misses."""

    owner: torch.Tensor  # [S] int64: the key (layer * E + expert) each slot holds, or -1
    stamp: torch.Tensor  # [S] int64: last use; free slots negative, the most negative taken first
    clock: torch.Tensor  # [1] int64: the last stamp given
    src: torch.Tensor  # [L * E] int64: element offset of each expert's record in host memory, from the slots' base
    stride: int  # elements per record (slot)
    mats: tuple[int, int, int]  # element offsets of gate, up and down in a record

    def __post_init__(self) -> None:
        if any(int(v) % 16 for v in (self.stride, *self.mats)) or bool((self.src % 16 != 0).any()):
            raise ValueError("expert LRU: record strides and offsets must be multiples of 16 elements")

    @property
    def slots(self) -> int:
        return self.owner.numel()

    def load(self, owner: Sequence[int], stamp: Sequence[int], clock: int) -> None:
        """Set the state (from the host's cache): per slot its key or -1 and its stamp; the clock."""
        self.owner.copy_(torch.tensor(owner, dtype=torch.long))
        self.stamp.copy_(torch.tensor(stamp, dtype=torch.long))
        self.clock.fill_(int(clock))


def pack_experts(model) -> ExpertTable:
    """Pack each layer's experts (gate, up, down per expert) into one flat buffer and make the model's expert
    parameters views of it (the eager model runs unchanged on them). Idempotent; memory peaks at one layer's
    experts more than the model."""
    packed = getattr(model, "_packed_experts", None)
    if packed is not None:
        return packed
    cfg = model.config
    L, E, Fh, H = cfg.num_hidden_layers, cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    n = Fh * H
    bases = []
    for layer in model.model.layers:
        experts = layer.block_sparse_moe.experts
        ref = experts[0].gate.weight
        flat = torch.empty(E * 3 * n, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for e, ex in enumerate(experts):
                for m, lin in enumerate((ex.gate, ex.up, ex.down)):
                    view = flat[(3 * e + m) * n:(3 * e + m + 1) * n].view(lin.weight.shape)
                    view.copy_(lin.weight)
                    lin.weight.data = view
        bases.append(flat)
    offs = torch.arange(E * 3, dtype=torch.int64).view(E, 3) * n
    table = ExpertTable(bases, offs.expand(L, E, 3).contiguous().to(bases[0].device))
    model._packed_experts = table
    return table


def workspace_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the static buffers of one decode step (the logits row included)."""
    isz = torch.empty((), dtype=dtype).element_size()
    H, K, Fh = config.hidden_size, config.top_k, config.moe_ffn_hidden_size
    nq, nk = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    act = (3 * H + (nq + 2 * nk + 2 * config.num_experts) + nq + K * Fh + K + config.vocab_size) * isz
    L, E = config.num_hidden_layers, config.num_experts
    lru = (3 * L * E + L * K + 3 * K + 1) * 8  # a device LRU (ExpertLRU) of at most L x E slots and its outputs
    return act + (K * 4 + L * K + 2) * 8 + lru  # offsets, predicted ids, ids, token, position


# tiles of the kernels: (rows of a weight matrix per program, warps) for the products, (keys per step, warps) for
# attention; "pdl": launch with programmatic dependent launch (CUDA, compute capability 9.0 and up), so that each
# kernel's weight reads overlap the previous kernel. Tuned on an H100 for the 4B shape by
# benchmarks/gpu_decode_graph.py --tune
DEFAULT_BLOCKS = {"pre": (2, 4), "oproj": (8, 4), "gate_up": (4, 2), "down": (2, 2), "attn": (64, 2), "pdl": True}


def _pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreted() and torch.cuda.get_device_capability(device)[0] >= 9


class DecodeKernels:
    """One decode step of ``model`` (its non-expert weights) over ``kv`` (fixed capacity) and the experts of
    ``experts``, as five Triton kernels per layer; ``graph=True`` captures the step as one CUDA graph on first use.

    ``step(token, pos)`` returns the logits (1, 1, V), writes the position's K/V and advances ``kv``; the step's
    chosen expert ids (ascending, per layer) are in ``ids`` (device)."""

    def __init__(self, model, kv: KVCache, experts: ExpertTable, graph: bool = True,
                 blocks: dict | None = None, lru: ExpertLRU | None = None) -> None:
        cfg = model.config
        dev = model.lm_head.weight.device
        reason = unavailable_reason(dev)
        if reason:
            raise RuntimeError(reason)
        if model.lm_head.weight.dtype != torch.bfloat16:
            raise ValueError(f"the decode kernels compute bf16 models; this one is {model.lm_head.weight.dtype}")
        self.config, self.model, self.kv, self.experts = cfg, model, kv, experts
        self.device = dev
        self.blocks = {**DEFAULT_BLOCKS, **(blocks or {})}
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
                     base=experts.bases[i], table=experts.offsets[i].contiguous(), ids=self.ids[i])
            self.layers.append(w)
        # global layers hold position p at slot p: the positions a step may write
        self._max_pos = min([kvl.k.shape[2] for kvl in kv.layers if kvl.window is None] or [1 << 62])
        self.graph = graph and dev.type == "cuda"
        self._graph = None
        self.replays = 0

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
            SOFTMAX=p["softmax"], PDL=c["pdl"], **extra, **c["launch"])

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
            USE_ROPE=p["rope"], SOFTMAX=p["softmax"], PDL=c["pdl"], num_warps=aw, **extra, **c["launch"])

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


class KernelRunner:
    """The in-memory model with kernel decode: ``step(ids)`` prefills eagerly (the model's forward, into a KV cache
    of ``max_context`` positions) and decodes one token through ``DecodeKernels``. Packs the model's experts."""

    def __init__(self, model, max_context: int | None = None, graph: bool = True, blocks: dict | None = None):
        cfg = model.config
        reason = unavailable_reason(model.device)
        if reason:
            raise RuntimeError(reason)
        self.model = model
        self.max_context = int(max_context or min(2048, cfg.max_position_embeddings))
        self.kv = KVCache(cfg, 1, model.dtype, model.device, capacity=self.max_context)
        self.kernels = DecodeKernels(model, self.kv, pack_experts(model), graph=graph, blocks=blocks)

    def reset(self) -> None:
        self.kv.reset()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.model.device).view(1, -1)
        start, T = self.kv.seq_len, ids.shape[1]
        if start + T > self.max_context:
            raise ValueError(f"sequence too long: {start + T} tokens exceeds max_context={self.max_context}")
        if T == 1 and start > 0:
            return self.kernels.step(ids, start).clone()  # the step's buffer is overwritten by the next
        return self.model(ids, cache=self.kv).logits[:, -1:]

    __call__ = step


def stream_generate(model, input_ids, max_new_tokens: int = 32, runner: KernelRunner | None = None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop_tokens: Sequence[int] | None = None, stats=None):
    """``model.generate``'s streaming form with kernel decode (a new KV cache each call)."""
    runner = runner or KernelRunner(model)
    runner.reset()
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device)
    stop = model.config.eos_ids() if stop_tokens is None else stop_tokens
    yield from stream_tokens(runner.step, ids, max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed),
                             stop, stats)


def generate(model, input_ids, max_new_tokens: int = 32, **kwargs) -> list[int]:
    return list(stream_generate(model, input_ids, max_new_tokens, **kwargs))


__all__ = ["DecodeKernels", "ExpertTable", "ExpertLRU", "KernelRunner", "pack_experts", "generate", "stream_generate",
           "unavailable_reason", "workspace_bytes", "DEFAULT_BLOCKS"]
