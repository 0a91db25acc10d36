"""The tidy DataFrames of a Recording (``Recording.to_dataframe(kind)``): one builder per kind, long format, one
row per (dataset, step/token, layer, expert or neuron) as the kind records it."""

from __future__ import annotations

import numpy as np
import pandas as pd


class RecordingFrames:
    """``to_dataframe``'s builders; mixed into Recording (they read its arrays and metadata)."""

    def _token_cols(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        t = self._tokens()
        return {"dataset": t["dataset"][rows], "sequence": t["sequence"][rows], "step": t["step"][rows],
                "position": t["position"][rows]}

    def _per_layer(self, build) -> pd.DataFrame:
        parts = [build(i) for i in self.layers]
        parts = [p for p in parts if p is not None]
        return pd.concat(parts, ignore_index=True) if parts else build(None)

    def _frame_experts(self) -> pd.DataFrame:
        K = self._attrs()["top_k"]

        def build(i):
            ids = self._arrays[f"layers.{i}.moe.topk_ids"] if i is not None else np.zeros((0, K), np.int64)
            w = self._arrays[f"layers.{i}.moe.topk_weights"] if i is not None else np.zeros((0, K), np.float32)
            rows = np.repeat(np.arange(len(ids)), K)
            cols = {**self._token_cols(rows), "layer": np.full(len(rows), i if i is not None else 0),
                    "slot": np.tile(np.arange(K), len(ids)), "expert": ids.reshape(-1), "weight": w.reshape(-1)}
            for name, col in (("tokens.id", "token_id"), ("tokens.piece", "token")):  # the drill-down columns
                if name in self._arrays:
                    cols[col] = self._arrays[name][rows]
            return pd.DataFrame(cols)

        return self._per_layer(build)

    def _frame_router_logits(self) -> pd.DataFrame:
        E = self._attrs()["num_experts"]
        if not self.layers or f"layers.{self.layers[0]}.moe.router_logits" not in self._arrays:
            raise KeyError("router logits were not kept: record with full=True (or full=('experts',))")

        def build(i):
            lg = self._arrays[f"layers.{i}.moe.router_logits"] if i is not None else np.zeros((0, E), np.float32)
            rows = np.repeat(np.arange(len(lg)), E)
            return pd.DataFrame({**self._token_cols(rows), "layer": np.full(len(rows), i if i is not None else 0),
                                 "expert": np.tile(np.arange(E), len(lg)), "logit": lg.reshape(-1)})

        return self._per_layer(build)

    def _frame_neurons(self) -> pd.DataFrame:
        F = self._attrs()["moe_ffn_hidden_size"]

        def build(i):
            a = self._arrays
            if i is None:
                tok, ex, ina = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int32),)
            else:
                tok, ex = a[f"layers.{i}.moe.routed_token"], a[f"layers.{i}.moe.routed_expert"]
                ina = a[f"layers.{i}.moe.inactive_neurons"]
            return pd.DataFrame({**self._token_cols(tok), "layer": np.full(len(tok), i if i is not None else 0),
                                 "expert": ex, "inactive": ina, "ffn": np.full(len(tok), F),
                                 "sparsity": ina / F})

        return self._per_layer(build)

    def _frame_neuron_counts(self) -> pd.DataFrame:
        a, ds = self._arrays, self.datasets
        E, F = self._attrs()["num_experts"], self._attrs()["moe_ffn_hidden_size"]
        t_ds = self._tokens()["dataset"]
        parts = []
        for i in self.layers:
            counts = a[f"layers.{i}.moe.neuron_counts"]  # (D, E, F)
            tok, ex = a[f"layers.{i}.moe.routed_token"], a[f"layers.{i}.moe.routed_expert"]
            for d, name in enumerate(ds):
                routed = np.bincount(ex[t_ds[tok] == name], minlength=E)  # (E,)
                parts.append(pd.DataFrame({
                    "dataset": name, "layer": i, "expert": np.repeat(np.arange(E), F),
                    "neuron": np.tile(np.arange(F), E), "active": counts[d].reshape(-1),
                    "tokens": np.repeat(routed, F)}))
        cols = ["dataset", "layer", "expert", "neuron", "active", "tokens"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)

    def _step_cols(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        a = self._arrays
        seq = a["steps.sequence"][rows]
        return {"dataset": a["sequences.dataset"][seq] if len(seq) else np.array([], dtype=str), "sequence": seq,
                "step": a["steps.step"][rows], "phase": a["steps.phase"][rows]}

    def _frame_kv(self) -> pd.DataFrame:
        a, cfg = self._arrays, self.config
        S = self.num_steps
        context = a["steps.start"] + a["steps.tokens"]
        parts = []
        for i in self.layers:
            key = f"layers.{i}.attn.kv_bytes"
            if key in a:
                parts.append(pd.DataFrame({**self._step_cols(np.arange(S)), "layer": i,
                                           "attention": "sliding" if cfg.is_sliding(i) else "global",
                                           "context": context, "bytes": a[key]}))
        cols = ["dataset", "sequence", "step", "phase", "layer", "attention", "context", "bytes"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)

    def _frame_cache(self) -> pd.DataFrame:
        a = self._arrays
        return pd.DataFrame({**self._step_cols(a["cache.step_row"]), "layer": a["cache.layer"],
                             "expert": a["cache.expert"], "event": a["cache.event"], "bytes": a["cache.bytes"],
                             "engine_step": a["cache.engine_step"]})

    def _frame_timing(self) -> pd.DataFrame:
        a = self._arrays
        S = self.num_steps
        n_tok = a["steps.tokens"] * a["steps.batch"]
        total = pd.DataFrame({**self._step_cols(np.arange(S)), "layer": -1, "part": "total",
                              "seconds": a["steps.seconds"], "tokens": n_tok, "_order": np.arange(S) * 2})
        r = a["timing.step_row"]
        parts = pd.DataFrame({**self._step_cols(r), "layer": a["timing.layer"], "part": a["timing.part"],
                              "seconds": a["timing.seconds"], "tokens": n_tok[r], "_order": r * 2 + 1})
        df = pd.concat([total, parts], ignore_index=True) if len(parts) else total
        df = df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
        return df[["dataset", "sequence", "phase", "step", "layer", "part", "seconds", "tokens"]]

    def _frame_steps(self) -> pd.DataFrame:
        a = self._arrays
        S = self.num_steps
        return pd.DataFrame({**self._step_cols(np.arange(S)), "start": a["steps.start"], "tokens": a["steps.tokens"],
                             "batch": a["steps.batch"], "seconds": a["steps.seconds"]})
