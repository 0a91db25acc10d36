"""The engine's counters: requests, hits, misses and bytes of its expert cache, tokens and seconds per phase, time per
layer part, look-ahead accuracy, neuron sparsity, and the peak of resident bytes against the memory plan."""

from __future__ import annotations


class EngineStats:
    """``stats()``, ``stats_frame()``, ``reset_stats()``, ``clocks()`` and ``trace``; mixed into Engine."""

    def clocks(self) -> tuple[int, tuple[list[float], list[float], list[float], float]]:
        """(forward steps so far, copies of the cumulative seconds per layer of router, attention and MoE, and of the
        LM head): what the instruments read at each forward's end to time its parts."""
        return self._step, (list(self._t_router), list(self._t_attn), list(self._t_moe), self._t_lm_head)

    def reset_stats(self, clear_cache: bool = False) -> None:
        """Zero the counters and the trace; ``clear_cache=True`` also empties the expert cache (a replay of the
        trace through simulate() then starts from the same empty cache as the engine did)."""
        L = self.config.num_hidden_layers
        if getattr(self, "decoder", None) is not None:
            self.decoder.flush()
        if clear_cache:
            self.cache.clear()
        self.cache.reset_stats()
        self._step = 0
        self._stats = {k: 0 for k in ("prefill_tokens", "prefill_seconds", "prefill_bytes", "decode_tokens",
                                      "decode_seconds", "decode_bytes", "verify_tokens", "verify_seconds",
                                      "verify_bytes", "verify_forwards", "rolled_back_tokens")}
        self._t_router, self._t_attn, self._t_moe = [0.0] * L, [0.0] * L, [0.0] * L
        self._t_lm_head = 0.0
        self._lm_rows = self._lm_calls = 0
        self._la_predicted, self._la_correct = [0] * L, [0] * L
        self._neurons_active = self._neurons_total = 0
        self._peak_accounted = self.resident_bytes()

    def stats(self) -> dict:
        """The counters since the last reset. Tokens are positions computed: ``prefill_*`` the forwards that start
        a sequence or add several tokens, ``decode_*`` one-token steps, ``verify_*`` the forwards of
        ``forward(all_logits=True)`` that continue a sequence (speculative decoding's verification of k draft
        tokens plus one: all k + 1 positions count, rejected ones included; ``verify_forwards`` how many), and
        ``rolled_back_tokens`` the positions :meth:`truncate` discarded since. Expert requests, hits, misses and
        bytes count what each forward asked of the cache (a verify forward requests the union of its positions'
        experts once per layer), whatever happens to its positions later."""
        if self.decoder is not None:
            self.decoder.flush()
        c, s = self.cache.stats, self._stats
        predicted, correct = sum(self._la_predicted), sum(self._la_correct)
        tokens = s["prefill_tokens"] + s["decode_tokens"] + s["verify_tokens"]
        return {
            "requests": c.requests, "hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate,
            "compulsory_misses": c.compulsory_misses, "capacity_misses": c.capacity_misses, "preloads": c.preloads,
            "bytes_read": c.bytes_read, "bytes_read_per_token": c.bytes_read / tokens if tokens else float("nan"),
            "decode_bytes_read_per_token": (s["decode_bytes"] / s["decode_tokens"] if s["decode_tokens"]
                                            else float("nan")),
            "evictions": c.evictions, "prefetch_issued": c.prefetch_issued, "prefetch_used": c.prefetch_used,
            "prefetch_wasted": c.prefetch_wasted, "wasted_bytes": c.wasted_bytes,
            "speculative_reads": c.speculative_reads, "lookahead_predicted": predicted,
            "lookahead_correct": correct, "lookahead_accuracy": correct / predicted if predicted else float("nan"),
            "io_wait_seconds": c.io_wait_seconds, "router_seconds": sum(self._t_router),
            "attention_seconds": sum(self._t_attn), "moe_seconds": sum(self._t_moe),
            "lm_head_seconds": self._t_lm_head,
            "lm_head_rows_per_token": self._lm_rows / self._lm_calls if self._lm_calls else float("nan"),
            "prefill_tokens": s["prefill_tokens"], "prefill_seconds": s["prefill_seconds"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] else float("nan"),
            "decode_tokens": s["decode_tokens"], "decode_seconds": s["decode_seconds"],
            "decode_tok_s": s["decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else float("nan"),
            "verify_forwards": s["verify_forwards"], "verify_tokens": s["verify_tokens"],
            "verify_seconds": s["verify_seconds"], "verify_bytes": s["verify_bytes"],
            "rolled_back_tokens": s["rolled_back_tokens"],
            "neuron_sparsity": (1 - self._neurons_active / self._neurons_total if self._neurons_total
                                else float("nan")),
            "capacity_experts": self.cache.capacity_experts, "expert_nbytes": self.cache.expert_nbytes,
            "resident_bytes": self.resident_bytes(), "peak_accounted_bytes": self._peak_accounted,
            "memory_limit": self.plan.limit, "policy": self.policy, "prefetch": self.prefetch,
            "lookahead": self.lookahead, "format": self.bundle.format, "device": self.device.type,
        }

    def stats_frame(self):
        """One row per layer (hits, misses, hit rate, I/O wait, router/attention/MoE seconds, look-ahead
        accuracy), then an "all" row (a pandas DataFrame indexed by layer)."""
        import pandas as pd

        per = self.cache.stats.per_layer
        rows = []
        for i in range(self.config.num_hidden_layers):
            h, m, w = per[i] if i in per else (0, 0, 0.0)
            rows.append({"layer": i, "hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else float("nan"),
                         "bytes_read": m * self.cache.expert_nbytes, "io_wait_seconds": w,
                         "router_seconds": self._t_router[i], "attention_seconds": self._t_attn[i],
                         "moe_seconds": self._t_moe[i], "lookahead_predicted": self._la_predicted[i],
                         "lookahead_correct": self._la_correct[i]})
        total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}
        n = total["hits"] + total["misses"]
        rows.append({"layer": "all", **total, "hit_rate": total["hits"] / n if n else float("nan")})
        df = pd.DataFrame(rows)
        df["lookahead_accuracy"] = df["lookahead_correct"] / df["lookahead_predicted"].where(
            df["lookahead_predicted"] > 0)
        return df.set_index("layer")

    def _count(self, phase: str, tokens: int, seconds: float, nbytes: int) -> None:
        """A forward's tokens, seconds and bytes read in the engine's counters, and the peak of resident bytes."""
        st = self._stats
        st[phase + "_tokens"] += tokens
        st[phase + "_seconds"] += seconds
        st[phase + "_bytes"] += nbytes
        self._peak_accounted = max(self._peak_accounted, self.resident_bytes())

    def resident_bytes(self) -> int:
        """What the engine holds now, by its own accounting: weights, KV cache as allocated, occupied cache slots,
        plus the planned workspace and staging (temporaries are not tracked one by one)."""
        kv = sum(layer.allocated_bytes for layer in self.kv.layers)
        return (self._non_expert_bytes + kv + self.cache.resident_bytes + self.plan.workspace_bytes
                + self.plan.staging_bytes)

    @property
    def trace(self) -> list[tuple[int, int, int]]:
        """Demand requests since the last reset: (step, layer, expert), in request order."""
        if self.decoder is not None:
            self.decoder.flush()
        return self.cache.trace
