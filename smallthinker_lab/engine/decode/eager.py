"""The eager backend: the layer loop over the model's modules, with experts from the expert cache.

Per layer: router on the raw residual and top-k (one host sync), the layer's experts requested at once (pre-attention
prefetch), attention (the model's modules and KV cache) while they load, optional look-ahead (the next layer's router
names experts to read early), then the experts computed as they become ready and combined in ascending expert order
(the model's order), so results do not depend on I/O timing. ``EagerDecoder`` is a decoder like the graph and kernel
ones (engine/decode/base.py): it works on the engine's ``EngineState`` (engine/state.py), never the Engine, and
computes each expert from its slot through ``SlotExperts`` (expert_compute.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import Entry, layer_chunks
from ..state import EngineState
from .base import Decoder
from .expert_compute import SlotExperts


@dataclass
class _Work:
    """One layer's experts for one forward chunk: request order, chunks, token rows and top-k slot per expert."""

    layer: int
    chunks: list[list[int]]
    rows: dict[int, tuple[torch.Tensor | None, torch.Tensor | int]]  # expert -> (token rows or None, k slot)
    double: bool = False  # chunk c + 1 is requested while chunk c computes
    requested: list[list[Entry] | None] = field(default_factory=list)


class EagerDecoder(Decoder):
    """The eager forward over an engine's ``state``: ``forward`` (prefill chunks of ``state.prefill_chunk`` tokens,
    then the LM head), made of ``run`` (one chunk through the layers), ``lm_head`` and ``all_logits``. It can run
    every step (``usable()``), with every hook, policy and expert format; ``decode`` is one step's logits."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.experts = SlotExperts(state)  # one expert from its slot
        self.timing = False  # someone listens to "timing" (set per forward)

    def usable(self) -> bool:
        return True

    def reset(self) -> None:
        """Drop the per-slot views (the engine closed, or reopened with new slots)."""
        self.experts.reset()

    def decode(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, 1, V) of one decode step: ``ids`` (1, 1) at position ``start`` of the KV cache."""
        return self.forward(ids, start)

    def forward(self, ids: torch.Tensor, start: int, all_logits: bool = False, verify: bool = False) -> torch.Tensor:
        """Logits (1, 1, V) of the last token of ``ids`` (1, T) at positions ``start``..., or (1, T, V) of every
        token with ``all_logits`` (``verify``: each row as a one-token decode step computes it). The hooks
        registered now are the ones that fire."""
        state = self.state
        self.observe()
        T, chunk = ids.shape[1], state.prefill_chunk
        xs = [self.run(ids[:, c0:c0 + chunk], start + c0) for c0 in range(0, T, chunk)]  # (1, chunk, H) each
        if all_logits:
            return self.all_logits(torch.cat(xs, dim=1), decode=verify)  # (1, T, V)
        x = xs[-1]
        # exact: the LM head over every position of the (last) chunk, as the model's forward does, so that the last
        # row comes from the same kernel (a GEMM over T rows may round differently)
        return self.lm_head(x if state.exact and x.shape[1] > 1 else x[:, -1:], decode=T == 1)[:, -1:]

    def observe(self) -> None:
        """Which per-step events ("timing", "expert", "moe") are listened to, from the hooks registered now."""
        self.timing = self.state.hooks.active("timing")
        self.experts.observe()

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """The residual (1, T, H) after the last layer for ``ids`` (1, T) at positions ``start``...: one forward
        step (``state.next_step()``), the KV cache extended."""
        state = self.state
        T = ids.shape[1]
        state.next_step()
        positions = torch.arange(start, start + T, device=state.device)
        x = state.model.model.embed_tokens(ids)  # (1, T, H)
        rope = state.model.model.rotary(positions, x.dtype) if any(state.config.rope_layout) else None
        predicted: list[int] | None = None
        for i, layer in enumerate(state.layers):
            x, predicted = self._layer(i, layer, x, positions, rope, predicted)
        return x

    def _layer(self, i: int, layer, x: torch.Tensor, positions: torch.Tensor, rope, predicted: list[int] | None):
        state = self.state
        cfg, hooks, clock = state.config, state.hooks, time.perf_counter
        moe = layer.block_sparse_moe
        edits = hooks.edits  # edit hooks (smallthinker_lab.hooks / intervene): the model's points, in its order
        name = f"blocks.{i}."
        t0 = clock()
        if edits:
            x = hooks.edit(name + "hook_resid_pre", x)
        logits = moe.edit_logits(moe.route(x).reshape(-1, cfg.num_experts))  # (N, E), raw residual, before attention
        ids, weights = moe.select(logits)  # (N, K), through the top-k edit hooks
        weights = weights.to(x.dtype)
        if hooks.active("router"):
            hooks.fire("router", layer=i, logits=logits, topk_ids=ids, topk_weights=weights)
        work = self._plan(i, ids)  # reads the ids: one host sync
        if predicted is not None:
            state.record_lookahead(i, predicted, work.rows)
        if state.prefetch:
            self._request_next(work)
        nxt = None
        ahead = state.lookahead and x.shape[1] == 1 and i + 1 < len(state.layers)
        if ahead and state.lookahead_early:  # from this layer's input: a whole layer of lead
            nxt = self._speculate_next(i, x)
        t1 = clock()
        attn = layer.self_attn(layer.input_layernorm(x), positions, rope, state.kv[i])
        if edits:
            x = hooks.edit(name + "hook_resid_mid", x + hooks.edit(name + "hook_attn_out", attn))
        else:
            x = x + attn
        t2 = clock()
        if ahead and not state.lookahead_early:  # from the residual after attention: the MoE's time of lead
            nxt = self._speculate_next(i, x)
        t3 = clock()
        u = layer.post_attention_layernorm(x)
        y = self._moe(work, u, weights).view_as(x)
        if edits:
            x = hooks.edit(name + "hook_resid_post", x + hooks.edit(name + "hook_moe_out", y))
        else:
            x = x + y
        t4 = clock()
        counted = state.counters
        counted.router_seconds[i] += (t1 - t0) + (t3 - t2)
        counted.attention_seconds[i] += t2 - t1
        counted.moe_seconds[i] += t4 - t3
        if self.timing:
            for part, s in (("router", (t1 - t0) + (t3 - t2)), ("attention", t2 - t1), ("moe", t4 - t3)):
                hooks.fire("timing", step=state.step, layer=i, part=part, seconds=s)
        return x, nxt

    def _speculate_next(self, i: int, x: torch.Tensor) -> list[int]:
        """Look-ahead: layer i+1's router on the residual x; its top-k start reading (cache.speculate). The
        ``intervene()`` rules of layer i+1 apply (ablated experts are not predicted, forced ones are); other edit
        hooks see only the real routing."""
        state = self.state
        cfg = state.config
        moe = state.layers[i + 1].block_sparse_moe
        nxt_logits = moe.route(x).reshape(-1, cfg.num_experts)
        if state.hooks.edits:
            nxt = moe.select(moe.edit_logits(nxt_logits, rules_only=True), rules_only=True)[0][0].tolist()
        else:
            nxt = torch.topk(nxt_logits, cfg.top_k, dim=-1).indices[0].tolist()
        for e in sorted(nxt):
            state.cache.speculate((i + 1, e))
        return nxt

    def _plan(self, layer: int, ids: torch.Tensor) -> _Work:
        """Which experts this layer needs, in request order, split into chunks the cache can hold."""
        N, K = ids.shape
        if N == 1:
            experts = ids[0].tolist()
            rows = {e: (None, k) for k, e in enumerate(experts)}
            order = sorted(experts)
        else:  # group tokens per expert as the model's MoE loop does (slot-major)
            mask = F.one_hot(ids, self.state.config.num_experts).permute(2, 1, 0)  # (E, K, N)
            order = torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist()
            rows = {}
            for e in order:
                slot, token = torch.where(mask[e])
                rows[e] = (token, slot)
        cache = self.state.cache
        cap = cache.capacity_experts
        if len(order) > cap:  # streamed through the cache in chunks: resident experts first
            resident = [e for e in order if (layer, e) in cache]
            order = resident + [e for e in order if (layer, e) not in cache]
        chunks, double = layer_chunks(order, cap)
        return _Work(layer, chunks, rows, double)

    def _request_next(self, work: _Work) -> None:
        """Request the next chunk of the layer's experts (pins them; misses start reading)."""
        c = len(work.requested)
        if c < len(work.chunks):
            cache, ahead = self.state.cache, self.state.prefetch
            work.requested.append([cache.request((work.layer, e), ahead=ahead) for e in work.chunks[c]])

    def _chunk(self, work: _Work, c: int) -> list[Entry]:
        """Chunk c's entries, requested now if they were not yet; with ``work.double`` chunk c + 1 is requested
        too, so that it loads while c computes."""
        if len(work.requested) <= c:
            self._request_next(work)
        if work.double and len(work.requested) == c + 1:
            self._request_next(work)
        return work.requested[c]

    def _moe(self, work: _Work, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        state, experts = self.state, self.experts
        u = u.reshape(-1, state.config.hidden_size)  # (N, H)
        if u.shape[0] == 1 and experts.fusable(work.layer, work.rows):
            return self._moe_native(work, u, weights)
        outs: dict[int, torch.Tensor] = {}
        cache = state.cache
        for c in range(len(work.chunks)):
            for entry in cache.as_completed(self._chunk(work, c)):
                state.settle(entry)
                e = entry.key[1]
                token, slot = work.rows[e]
                x_e = u if token is None else u[token]  # (n, H)
                out = experts.compute(entry, x_e, token, u)  # u: the rows it pads from
                w = weights[:, slot, None] if token is None else weights[token, slot, None]
                outs[e] = out * w
                cache.release(entry)
        seen = experts.take_seen()
        if seen is not None:
            state.hooks.fire("moe", layer=work.layer, experts=seen[0], token_index=seen[1], gates=seen[2])
        y = torch.zeros_like(u)
        for e in sorted(outs):  # the model's combine order: ascending expert id
            token = work.rows[e][0]
            if token is None:
                y.add_(outs[e])
            else:
                y.index_add_(0, token, outs[e])
        return y

    def _moe_native(self, work: _Work, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``_moe`` for one token through the native Q4_0 kernel: per chunk, the experts already resident in one
        native call (``SlotExperts.layer_native``), then those still loading in another once they are in; the
        weighted sum accumulated in fp32."""
        state, experts, cache = self.state, self.experts, self.state.cache
        y = torch.zeros(1, u.shape[1], dtype=torch.float32)
        for c in range(len(work.chunks)):
            requested = self._chunk(work, c)
            ready = [e for e in requested if e.ready]
            pending = [e for e in requested if not e.ready]
            for group in (ready, pending):
                if not group:
                    continue
                entries = list(cache.as_completed(group))
                try:
                    for entry in entries:
                        state.settle(entry)
                    w = weights[0, [work.rows[e.key[1]][1] for e in entries]]
                    y.add_(experts.layer_native(entries, u, w))
                finally:
                    for entry in entries:
                        cache.release(entry)
        seen = experts.take_seen()
        if seen is not None:
            state.hooks.fire("moe", layer=work.layer, experts=seen[0], token_index=seen[1], gates=seen[2])
        return y.to(u.dtype)

    def all_logits(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """Logits (1, T, V) of every position of x (1, T, H). ``decode`` (verifying draft tokens): each row as a
        one-token decode step computes it (with a predictor, the sparse LM head's rows of that token alone)."""
        if decode and self.state.lm_head_predictor is not None:
            return torch.cat([self.lm_head(x[:, j:j + 1], decode=True) for j in range(x.shape[1])], dim=1)
        return self.lm_head(x, decode=False)

    def lm_head(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """Logits (1, T, V) of x (1, T, H): the final norm, then the LM head (``decode`` with a predictor: the
        sparse LM head, rows it skips at ``state.fill_value``). With ``state.lm_head_quant`` (a CPU kernel format,
        engine/lm_head_quant.py) the head, sparse or not, decode and prefill, is computed from its quantized rows."""
        state = self.state
        model, hooks, counters = state.model, state.hooks, state.counters
        t0 = time.perf_counter()
        h = model.model.norm(x)  # (1, 1, H)
        if hooks.edits:
            h = hooks.edit("hook_final_norm", h)
        pred, qhead = state.lm_head_predictor, state.lm_head_quant
        if decode and pred is not None:  # rows the predictor skips get fill_value (default -inf: never sampled)
            if qhead is not None:
                from ..lm_head_quant import sparse_quantized_head

                logits, rows = sparse_quantized_head(h.reshape(1, -1), qhead, pred, fill_value=state.fill_value)
            else:
                from ..lm_head import sparse_lm_head

                logits, rows = sparse_lm_head(h.reshape(1, -1), model.lm_head.weight, pred,
                                              fill_value=state.fill_value)
            logits = logits.view(1, 1, -1)
            counters.lm_head_rows += rows
            counters.lm_head_calls += 1
        elif qhead is not None and qhead.fmt == "screened":  # greedy only: the argmax exact, the rest screened
            logits, rows = qhead(h)
            counters.lm_head_rows += rows
            counters.lm_head_calls += h.shape[1]
        elif qhead is not None:
            logits = qhead(h)  # (1, T, V), through the kernel
        else:
            logits = model.lm_head(h)  # (1, 1, V)
        dt = time.perf_counter() - t0
        counters.lm_head_seconds += dt
        if self.timing:
            hooks.fire("timing", step=state.step, layer=-1, part="lm_head", seconds=dt)
        return logits
