"""The engine's counters as ``stats()``, ``stats_frame()`` and ``clocks()`` report them: requests, hits, misses and
bytes of its expert cache, tokens and seconds per phase, time per layer part, look-ahead accuracy, neuron sparsity,
and the peak of resident bytes against the memory plan. The counters live in ``engine.state.counters``
(engine/state.py), where the decoders update them."""

from __future__ import annotations


class EngineStats:
    """``stats()``, ``stats_frame()``, ``reset_stats()``, ``clocks()`` and ``trace``; mixed into Engine."""

    def clocks(self) -> tuple[int, tuple[list[float], list[float], list[float], float]]:
        """(forward steps so far, copies of the cumulative seconds per layer of router, attention and MoE, and of the
        LM head): what the instruments read at each forward's end to time its parts."""
        c = self.state.counters
        return self.state.step, (list(c.router_seconds), list(c.attention_seconds), list(c.moe_seconds),
                                 c.lm_head_seconds)

    def reset_stats(self, clear_cache: bool = False) -> None:
        """Zero the counters and the trace; ``clear_cache=True`` also empties the expert cache (a replay of the
        trace through simulate() then starts from the same empty cache as the engine did)."""
        if getattr(self, "decoder", None) is not None:
            self.decoder.flush()
        if clear_cache:
            self.cache.clear()
        self.cache.reset_stats()
        self.state.reset_counters()

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
        c, counted = self.cache.stats, self.state.counters
        s = counted.phases
        predicted, correct = sum(counted.lookahead_predicted), sum(counted.lookahead_correct)
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
            "io_wait_seconds": c.io_wait_seconds, "router_seconds": sum(counted.router_seconds),
            "attention_seconds": sum(counted.attention_seconds), "moe_seconds": sum(counted.moe_seconds),
            "lm_head_seconds": counted.lm_head_seconds, "lm_head": self.lm_head_description(),
            "attention": self.attention_description(),
            "lm_head_rows_per_token": (counted.lm_head_rows / counted.lm_head_calls if counted.lm_head_calls
                                       else float("nan")),
            "prefill_tokens": s["prefill_tokens"], "prefill_seconds": s["prefill_seconds"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] else float("nan"),
            "decode_tokens": s["decode_tokens"], "decode_seconds": s["decode_seconds"],
            "decode_tok_s": s["decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else float("nan"),
            "verify_forwards": s["verify_forwards"], "verify_tokens": s["verify_tokens"],
            "verify_seconds": s["verify_seconds"], "verify_bytes": s["verify_bytes"],
            "rolled_back_tokens": s["rolled_back_tokens"],
            "neuron_sparsity": (1 - counted.neurons_active / counted.neurons_total if counted.neurons_total
                                else float("nan")),
            "capacity_experts": self.cache.capacity_experts, "expert_nbytes": self.cache.expert_nbytes,
            "resident_bytes": self.resident_bytes(), "peak_accounted_bytes": counted.peak_accounted,
            "memory_limit": self.plan.limit, "policy": self.policy, "prefetch": self.prefetch,
            "lookahead": self.lookahead, "format": self.bundle.format, "device": self.device.type,
        }

    def lm_head_description(self) -> str:
        """Which LM head runs: "model" (the model's own, in its dtype) or the CPU kernel format of its quantized
        copy (engine/lm_head_quant.py), "+ sparse" with a predictor (at decode)."""
        st = self.state
        name = st.lm_head_format or "model"
        return name + (" + sparse" if st.lm_head_predictor is not None else "")

    def attention_description(self) -> str:
        """Which attention projections run: "model" (the model's own Linear modules, in its dtype) or "q4_0" (q/k/v
        fused, o, in ggml Q4_0 through the native kernel: engine/attention_quant.py)."""
        return self.state.attention_format or "model"

    def stats_frame(self):
        """One row per layer (hits, misses, hit rate, I/O wait, router/attention/MoE seconds, look-ahead
        accuracy), then an "all" row (a pandas DataFrame indexed by layer)."""
        import pandas as pd

        per, counted = self.cache.stats.per_layer, self.state.counters
        rows = []
        for i in range(self.config.num_hidden_layers):
            h, m, w = per[i] if i in per else (0, 0, 0.0)
            rows.append({"layer": i, "hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else float("nan"),
                         "bytes_read": m * self.cache.expert_nbytes, "io_wait_seconds": w,
                         "router_seconds": counted.router_seconds[i],
                         "attention_seconds": counted.attention_seconds[i], "moe_seconds": counted.moe_seconds[i],
                         "lookahead_predicted": counted.lookahead_predicted[i],
                         "lookahead_correct": counted.lookahead_correct[i]})
        total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}
        n = total["hits"] + total["misses"]
        rows.append({"layer": "all", **total, "hit_rate": total["hits"] / n if n else float("nan")})
        df = pd.DataFrame(rows)
        df["lookahead_accuracy"] = df["lookahead_correct"] / df["lookahead_predicted"].where(
            df["lookahead_predicted"] > 0)
        return df.set_index("layer")

    def resident_bytes(self) -> int:
        """What the engine holds now, by its own accounting: weights, KV cache as allocated, occupied cache slots,
        plus the planned workspace and staging (temporaries are not tracked one by one)."""
        return self.state.resident_bytes()

    @property
    def trace(self) -> list[tuple[int, int, int]]:
        """Demand requests since the last reset: (step, layer, expert), in request order."""
        if self.decoder is not None:
            self.decoder.flush()
        return self.cache.trace
