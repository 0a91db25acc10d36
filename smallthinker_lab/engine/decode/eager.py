"""The eager backend: the engine's own loop over the layers, with experts from the expert cache.

Per layer: router on the raw residual and top-k (one host sync), the layer's experts requested at once (pre-attention
prefetch), attention (the model's modules and KV cache) while they load, optional look-ahead (the next layer's router
names experts to read early), then the experts computed as they become ready and combined in ascending expert order
(the model's order), so results do not depend on I/O timing. ``EagerSteps`` is a part of Engine (engine.py); it
steps, settles experts and counts through the engine's ``EngineState`` (engine/state.py), as the graph decoders do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import cpu_kernels, sparse
from ..cache import Entry, layer_chunks
from ..shapes import neuron_bucket, pad_index, row_bucket


@dataclass
class _Work:
    """One layer's experts for one forward chunk: request order, chunks, token rows and top-k slot per expert."""

    layer: int
    chunks: list[list[int]]
    rows: dict[int, tuple[torch.Tensor | None, torch.Tensor | int]]  # expert -> (token rows or None, k slot)
    double: bool = False  # chunk c + 1 is requested while chunk c computes
    requested: list[list[Entry] | None] = field(default_factory=list)


class EagerSteps:
    """The eager forward of one chunk of tokens (``_run``) and what it is made of; mixed into Engine."""

    def _run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        self.state.next_step()
        positions = torch.arange(start, start + T, device=self.device)
        x = self.model.model.embed_tokens(ids)  # (1, T, H)
        rope = self.model.model.rotary(positions, x.dtype) if any(self.config.rope_layout) else None
        predicted: list[int] | None = None
        for i, layer in enumerate(self.state.layers):
            x, predicted = self._layer(i, layer, x, positions, rope, predicted)
        return x

    def _layer(self, i: int, layer, x: torch.Tensor, positions: torch.Tensor, rope, predicted: list[int] | None):
        cfg, hooks, clock = self.config, self.hooks, time.perf_counter
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
            self.state.record_lookahead(i, predicted, work.rows)
        if self.prefetch:
            self._request_next(work)
        nxt = None
        ahead = self.lookahead and x.shape[1] == 1 and i + 1 < len(self.state.layers)
        if ahead and self.state.lookahead_early:  # from this layer's input: a whole layer of lead
            nxt = self._speculate_next(i, x)
        t1 = clock()
        attn = layer.self_attn(layer.input_layernorm(x), positions, rope, self.kv[i])
        if edits:
            x = hooks.edit(name + "hook_resid_mid", x + hooks.edit(name + "hook_attn_out", attn))
        else:
            x = x + attn
        t2 = clock()
        if ahead and not self.state.lookahead_early:  # from the residual after attention: the MoE's time of lead
            nxt = self._speculate_next(i, x)
        t3 = clock()
        u = layer.post_attention_layernorm(x)
        y = self._moe(work, u, weights).view_as(x)
        if edits:
            x = hooks.edit(name + "hook_resid_post", x + hooks.edit(name + "hook_moe_out", y))
        else:
            x = x + y
        t4 = clock()
        counted = self.state.counters
        counted.router_seconds[i] += (t1 - t0) + (t3 - t2)
        counted.attention_seconds[i] += t2 - t1
        counted.moe_seconds[i] += t4 - t3
        if self._timing:
            for part, s in (("router", (t1 - t0) + (t3 - t2)), ("attention", t2 - t1), ("moe", t4 - t3)):
                hooks.fire("timing", step=self.state.step, layer=i, part=part, seconds=s)
        return x, nxt

    def _speculate_next(self, i: int, x: torch.Tensor) -> list[int]:
        """Look-ahead: layer i+1's router on the residual x; its top-k start reading (cache.speculate). The
        ``intervene()`` rules of layer i+1 apply (ablated experts are not predicted, forced ones are); other edit
        hooks see only the real routing."""
        cfg = self.config
        moe = self.state.layers[i + 1].block_sparse_moe
        nxt_logits = moe.route(x).reshape(-1, cfg.num_experts)
        if self.hooks.edits:
            nxt = moe.select(moe.edit_logits(nxt_logits, rules_only=True), rules_only=True)[0][0].tolist()
        else:
            nxt = torch.topk(nxt_logits, cfg.top_k, dim=-1).indices[0].tolist()
        for e in sorted(nxt):
            self.cache.speculate((i + 1, e))
        return nxt

    def _plan(self, layer: int, ids: torch.Tensor) -> _Work:
        """Which experts this layer needs, in request order, split into chunks the cache can hold."""
        N, K = ids.shape
        if N == 1:
            experts = ids[0].tolist()
            rows = {e: (None, k) for k, e in enumerate(experts)}
            order = sorted(experts)
        else:  # group tokens per expert as the model's MoE loop does (slot-major)
            mask = F.one_hot(ids, self.config.num_experts).permute(2, 1, 0)  # (E, K, N)
            order = torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist()
            rows = {}
            for e in order:
                slot, token = torch.where(mask[e])
                rows[e] = (token, slot)
        cap = self.cache.capacity_experts
        if len(order) > cap:  # streamed through the cache in chunks: resident experts first
            resident = [e for e in order if (layer, e) in self.cache]
            order = resident + [e for e in order if (layer, e) not in self.cache]
        chunks, double = layer_chunks(order, cap)
        return _Work(layer, chunks, rows, double)

    def _request_next(self, work: _Work) -> None:
        """Request the next chunk of the layer's experts (pins them; misses start reading)."""
        c = len(work.requested)
        if c < len(work.chunks):
            work.requested.append([self.cache.request((work.layer, e), ahead=self.prefetch) for e in work.chunks[c]])

    def _moe(self, work: _Work, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        H = self.config.hidden_size
        u = u.reshape(-1, H)  # (N, H)
        self._moe_input = u  # the rows _expert pads from
        double = work.double
        outs: dict[int, torch.Tensor] = {}
        cache = self.cache
        for c in range(len(work.chunks)):
            if len(work.requested) <= c:
                self._request_next(work)
            if double and len(work.requested) == c + 1:
                self._request_next(work)  # the next chunk loads while this one computes
            for entry in cache.as_completed(work.requested[c]):
                self.state.settle(entry)
                e = entry.key[1]
                token, slot = work.rows[e]
                x_e = u if token is None else u[token]  # (n, H)
                out = self._expert(entry, x_e, token)
                w = weights[:, slot, None] if token is None else weights[token, slot, None]
                outs[e] = out * w
                cache.release(entry)
        seen = self._moe_seen
        if seen is not None and seen[0]:
            self.hooks.fire("moe", layer=work.layer, experts=seen[0], token_index=seen[1], gates=seen[2])
            self._moe_seen = ([], [], [])
        y = torch.zeros_like(u)
        for e in sorted(outs):  # the model's combine order: ascending expert id
            token = work.rows[e][0]
            if token is None:
                y.add_(outs[e])
            else:
                y.index_add_(0, token, outs[e])
        return y

    def _expert(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
        """One expert's ReGLU from its slot (settled by ``state.settle``): views of the slot's bytes for the stored
        dtype, decoded otherwise."""
        layer, expert = entry.key
        codec, dtype = self._codec, self.dtype
        shape = self.bundle.matrices["gate"].shape
        watch = self._watch_one or self._moe_seen is not None
        n = x.shape[0]
        hooks = self.hooks
        if hooks.edits and hooks.active(act := f"blocks.{layer}.moe.experts.{expert}.hook_act"):
            return self._expert_hooked(entry, x, token, act, watch)
        if self.device.type == "cpu" and n > 2:  # rows from a bounded set of sizes (engine/shapes.py)
            rows = pad_index(token if token is not None else torch.arange(n), row_bucket(n))
            if rows.shape[0] > n:
                x = self._moe_input.index_select(0, rows)
        y = self._expert_rows(entry, x, token, n, layer, expert, codec, dtype, shape, watch)
        return y[:n] if y.shape[0] > n else y

    def _expert_rows(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None, n: int, layer: int,
                     expert: int, codec, dtype: torch.dtype, shape, watch: bool) -> torch.Tensor:
        """``_expert`` on x (m >= n rows: rows past n repeat a real one); hooks and counters see the first n."""
        if self._cpu_kernel:  # torch's int4/int8 CPU kernels on the slot's bytes, as they are
            ops = self._views[entry.slot]
            if ops is None:  # views of the slot's bytes: valid whatever the slot holds
                ops = self._views[entry.slot] = cpu_kernels.expert_operands(self.state.slot_bytes(entry.slot),
                                                                            self.bundle.format, shape)
            y, g = cpu_kernels.reglu(x, ops)
            if watch:
                self._fire_expert(layer, expert, token, g[:n])
            self.state.counters.neurons_active += int(sparse.active_neurons(g[:n]).numel())
            self.state.counters.neurons_total += shape[0]
            return y
        if self.state.zero_copy:
            wg, wu, wd = self._slot_views(entry.slot)  # views of the slot's bytes, no copy
        else:
            mat = self.state.slot_bytes(entry.slot)
        if self.exact:  # the model's ops on the model's layouts (wd: [H, F]), bit-identical results
            if not self.state.zero_copy:
                wg, wu, wd = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up", "down"))
                wd = wd.t().contiguous()
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g[:n])
            if self.device.type == "cpu":
                self.state.counters.neurons_active += int(sparse.active_neurons(g).numel())
                self.state.counters.neurons_total += shape[0]
            return F.linear(F.linear(x, wu) * F.relu(g), wd)
        if self.device.type == "cuda" or not self.bundle.down_transposed:  # dense, no host sync
            if not self.state.zero_copy:
                wg, wu = (codec.decode(mat[m], shape, dtype) for m in ("gate", "up"))
                wd = self._down_fh(mat["down"], dtype)
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g)
            return (F.linear(x, wu) * F.relu(g)) @ wd
        if self.state.zero_copy:
            g = None
            if watch:  # the gate the hook sees is the one the kernel uses: computed once
                g = F.linear(x, wg)
                self._fire_expert(layer, expert, token, g[:n])
            if self.sparse_reglu is False:
                y, n_active = sparse.reglu_dense(x, wg, wu, wd, gate=g)
            else:
                y, n_active = sparse.reglu(x, wg, wu, wd, min_sparsity=-1.0 if self.sparse_reglu is True else None,
                                           gate=g)
        else:  # quantised (or another dtype): decode the gate, then only the active rows of up and down
            wg = codec.decode(mat["gate"], shape, dtype)
            g = F.linear(x, wg)  # (n, F)
            if watch:
                self._fire_expert(layer, expert, token, g[:n])
            idx = torch.nonzero((g > 0).any(dim=0)).flatten()
            n_active = int(idx.numel())
            min_sp = (sparse.default_min_sparsity(dtype, n, shape[0] * shape[1]) if self.sparse_reglu == "auto"
                      else (-1.0 if self.sparse_reglu else 1.0))
            if 1.0 - n_active / shape[0] > min_sp:
                # the up product's shape from a bounded set (engine/shapes.py)
                up_idx = pad_index(idx, neuron_bucket(n_active, shape[0])) if n_active else idx
                wu_r = codec.decode_rows(mat["up"], shape, up_idx, dtype)
                wd_r = codec.decode_rows(mat["down"], shape, idx, dtype)
                y = sparse.reglu_from_rows(x, g, idx, wu_r, wd_r)
            else:
                y, _ = sparse.reglu_dense(x, wg, codec.decode(mat["up"], shape, dtype),
                                          codec.decode(mat["down"], shape, dtype))
        self.state.counters.neurons_active += n_active
        self.state.counters.neurons_total += shape[0]
        return y

    def _expert_hooked(self, entry: Entry, x: torch.Tensor, token: torch.Tensor | None, name: str,
                       watch: bool) -> torch.Tensor:
        """An expert whose neurons are hooked (``hook_act``): dense, the model's ops, relu(gate) * up through the
        edit hooks of ``name`` before down."""
        layer, expert = entry.key
        shape = self.bundle.matrices["gate"].shape  # (F, H)
        if self.state.zero_copy:
            wg, wu, wd = self._slot_views(entry.slot)  # exact: down in the model's [H, F]; else stored [F, H]
            wd = wd if self.exact else wd.t()
        else:
            mat = self.state.slot_bytes(entry.slot)
            wg, wu = (self._codec.decode(mat[m], shape, self.dtype) for m in ("gate", "up"))
            wd = self._down_fh(mat["down"], self.dtype).t()
        g = F.linear(x, wg)  # (n, F)
        if watch:
            self._fire_expert(layer, expert, token, g)
        act = self.hooks.edit(name, F.linear(x, wu) * F.relu(g))  # (n, F)
        return F.linear(act, wd)  # (n, H)

    def _down_fh(self, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A record's down matrix decoded as [F, H]: stored so, or in the model's [H, F] (int8 / q4_0 quantized along
        F, the GPU decode kernels' layout: decoded, then transposed)."""
        spec = self.bundle.matrices["down"]
        w = self._codec.decode(buf, spec.shape, dtype)
        return w if self.bundle.down_transposed else w.t()

    def _slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down^T) as [F, H] views of a slot, made once per slot: they stay valid whatever it holds."""
        views = self._views[slot]
        if views is None:
            mat, shape = self.state.slot_bytes(slot), self.bundle.matrices["gate"].shape
            views = tuple(self._codec.decode(mat[m], shape, self.dtype) for m in ("gate", "up", "down"))
            if self.exact:  # the down matrix is kept in the model's [H, F] layout
                views = (views[0], views[1], mat["down"].view(self.dtype).view(shape[1], shape[0]))
            self._views[slot] = views
        return views

    def _fire_expert(self, layer: int, expert: int, token: torch.Tensor | None, g: torch.Tensor) -> None:
        # token_index: rows of this forward chunk that the expert received (None in "moe": every row)
        seen = self._moe_seen
        if seen is not None:
            seen[0].append(expert), seen[1].append(token), seen[2].append(g)
        if self._watch_one:
            self.hooks.fire("expert", layer=layer, expert=expert, token_index=token if token is not None else
                            torch.arange(g.shape[0], device=g.device), gate=g)

    def _all_logits(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """Logits (1, T, V) of every position of x (1, T, H). ``decode`` (verifying draft tokens): each row as a
        one-token decode step computes it (with a predictor, the sparse LM head's rows of that token alone)."""
        if decode and self.lm_head_predictor is not None:
            return torch.cat([self._lm_head(x[:, j:j + 1], decode=True) for j in range(x.shape[1])], dim=1)
        return self._lm_head(x, decode=False)

    def _lm_head(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        h = self.model.model.norm(x)  # (1, 1, H)
        if self.hooks.edits:
            h = self.hooks.edit("hook_final_norm", h)
        pred = self.lm_head_predictor
        if decode and pred is not None:  # rows the predictor skips get fill_value (default -inf: never sampled)
            from ..lm_head import sparse_lm_head

            logits, rows = sparse_lm_head(h.reshape(1, -1), self.model.lm_head.weight, pred,
                                          fill_value=self.fill_value)
            logits = logits.view(1, 1, -1)
            self.state.counters.lm_head_rows += rows
            self.state.counters.lm_head_calls += 1
        else:
            logits = self.model.lm_head(h)  # (1, 1, V)
        dt = time.perf_counter() - t0
        self.state.counters.lm_head_seconds += dt
        if self._timing:
            self.hooks.fire("timing", step=self.state.step, layer=-1, part="lm_head", seconds=dt)
        return logits
