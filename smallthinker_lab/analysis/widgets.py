"""The memory-limit explorer: an ipywidgets dashboard over the offloading engine, testable without a browser.

``MemoryLimitExplorer(model, prompt_sets)`` records each prompt set's expert trace once (an engine with no memory
limit, greedy decoding: the demand requests do not depend on the limit or the policy), and from it the hit-rate
curve of each policy at every cache size (LRU in one stack-distance pass, LFU by replay). Moving the memory-limit
slider maps the limit to the expert-cache capacity exactly as the engine's memory planner does and shows the
curve's hit rate there at once, with its misses split: compulsory (first touch of an expert: a cache that starts
empty misses these at any size, so a short run's hit rate stays below the trace's ceiling even when every expert
fits), capacity (evicted earlier, needed again) and, against the optimal policy (Belady) at the same size, the
policy's share of them. The run button opens an engine under that limit, policy and prefetch setting, streams the
generated text in, and shows the measured hit rate and its misses split, tok/s, I/O wait and per-layer hit rates.
With the warm-start toggle on, the run measures the prompts twice: from an empty cache (cold), then from a cache
filled by a warm-up (``engine.warm.warm_start`` from the recorded trace of the warm-up prompt set: the cache the
cold run of that set leaves), side by side, and checks that both gave the same tokens.

Stable CSS classes for a browser: ``st-explorer`` (the whole box), ``st-limit-slider``, ``st-limit-share``,
``st-predicted-hit-rate``, ``st-miss-breakdown``, ``st-measured``, ``st-layer-bars``, ``st-generated-text``,
``st-status``, ``st-run``, ``st-warm-toggle``, ``st-warm-from``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..resources import prompts_dir
from .prompts import PROMPT_SETS, load_prompt_set, load_prompt_sets

MiB = 2**20
SAME_SET = "same prompts"  # the warm-up dropdown's entry for the selected prompt set itself
PROMPTS_DIR = prompts_dir()
__all__ = ["PROMPT_SETS", "MemoryLimitExplorer", "load_prompt_set", "load_prompt_sets"]


# ------------------------------------------------------------------ the explorer
class MemoryLimitExplorer:
    """A memory-limit slider, policy dropdown, prefetch toggle, prompt-set selector and run button over an engine.

    ``model``: a checkpoint folder or "default" (opened with ``Engine.from_pretrained``), or ``engine_factory``: a
    callable ``factory(memory_limit=bytes | None, policy=str, prefetch=bool) -> Engine``. ``prompt_sets``: names
    of shipped prompt sets, or {name: prompts}. ``trace``: a recorded expert trace ((step, layer, expert) demand
    requests) of the first prompt set's prompts, or {set name: trace}; sets without one are recorded on first use.
    ``max_prompts`` / ``max_new_tokens`` / ``max_prompt_tokens`` bound each run. ``warm``: start with the warm-start
    toggle on; ``warm_from``: the warm-up prompt set (default: the selected set itself).
    """

    def __init__(self, model: str | Path = "default", prompt_sets=None, trace=None, *,
                 engine_factory: Callable[..., Any] | None = None, device: str = "cpu", max_prompts: int = 4,
                 max_new_tokens: int = 16, max_prompt_tokens: int | None = 256, limit_mib: float | None = None,
                 policy: str = "lru", prefetch: bool = True, policies: Sequence[str] = ("lru", "lfu"),
                 engine_kwargs: Mapping[str, Any] | None = None, warm: bool = False,
                 warm_from: str | None = None) -> None:
        import ipywidgets as w

        if engine_factory is None:
            from ..engine import Engine

            kwargs = {"device": device, "progress": False, **dict(engine_kwargs or {})}

            def engine_factory(**kw):
                return Engine.from_pretrained(model, **kwargs, **kw)

        self._factory = engine_factory
        self.max_prompts, self.max_new_tokens, self.max_prompt_tokens = max_prompts, max_new_tokens, max_prompt_tokens
        self.prompt_sets = load_prompt_sets(prompt_sets, max_prompts)
        if not self.prompt_sets:
            raise ValueError("no prompt sets: give at least one name or {name: prompts}")
        names = list(self.prompt_sets)
        if trace is not None and not isinstance(trace, Mapping):
            trace = {names[0]: trace}
        self._traces: dict[str, list[tuple[int, int, int]]] = {k: list(v) for k, v in dict(trace or {}).items()}
        self._prompt_ids: dict[str, list[list[int]]] = {}
        self._curves: dict[tuple[str, str], np.ndarray] = {}
        self._distances: dict[str, np.ndarray] = {}
        self._optimal: dict[tuple[str, int], float] = {}  # (prompt set, capacity) -> Belady's hit rate
        self._plan: dict[str, Any] | None = None
        self._tokenizer = None
        self.last_stats: dict[str, Any] | None = None
        self.last_layers: pd.DataFrame | None = None
        self.last_warm_layers: pd.DataFrame | None = None
        self.last_text: str = ""

        # probe once: the memory plan (what does not depend on the limit) and the tokenizer
        probe = self._factory(memory_limit=None, policy="lru", prefetch=True)
        try:
            self._plan = dict(probe.memory_plan())
            self._tokenizer = getattr(probe, "tokenizer", None)
            self.num_layers = int(probe.config.num_hidden_layers)
        finally:
            probe.close()
        plan = self._plan
        self.expert_nbytes = int(plan["expert_slot_bytes"])
        self.num_experts_total = int(plan["total_expert_bytes"] // self.expert_nbytes)
        self.minimum_bytes = int(plan["minimum_bytes"])
        self.full_bytes = int(plan["fixed_bytes"] + plan["total_expert_bytes"])

        # widgets
        step = _nice_step(self.expert_nbytes / MiB)
        lo = np.ceil(self.minimum_bytes / MiB / step) * step
        hi = np.ceil(self.full_bytes / MiB / step) * step
        value = limit_mib if limit_mib is not None else lo + 0.5 * (hi - lo)
        value = lo + round((float(np.clip(value, lo, hi)) - lo) / step) * step  # on the slider's grid
        self.slider = w.FloatSlider(value=float(np.clip(value, lo, hi)), min=float(lo), max=float(hi), step=step,
                                    description="Memory limit (MiB)", readout_format=".2f", continuous_update=True,
                                    style={"description_width": "initial"}, layout=w.Layout(width="520px"))
        self.slider.add_class("st-limit-slider")
        self.share_label = w.HTML()
        self.share_label.add_class("st-limit-share")
        self.policy = w.Dropdown(options=list(policies), value=policy, description="Policy")
        self.prefetch = w.ToggleButton(value=bool(prefetch), description="prefetch", icon="bolt",
                                       tooltip="pre-attention prefetch: read the router's experts while attention runs")
        self.prompt_set = w.Dropdown(options=names, value=names[0], description="Prompts")
        self.warm = w.ToggleButton(value=bool(warm), description="warm start", icon="fire",
                                   tooltip="also measure from a cache filled by a warm-up, beside the cold run")
        self.warm.add_class("st-warm-toggle")
        if warm_from is not None and warm_from not in names:
            raise ValueError(f"warm_from {warm_from!r} is not one of the prompt sets: {', '.join(names)}")
        self.warm_from = w.Dropdown(options=[SAME_SET, *names], value=warm_from or SAME_SET, description="warm-up")
        self.warm_from.add_class("st-warm-from")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.run_button.add_class("st-run")
        self.predicted = w.HTML()
        self.predicted.add_class("st-predicted-hit-rate")
        self.breakdown = w.HTML()
        self.breakdown.add_class("st-miss-breakdown")
        self.measured = w.HTML("<i>not run yet: press Run</i>")
        self.measured.add_class("st-measured")
        self.status = w.HTML()
        self.status.add_class("st-status")
        self.bars = w.Output()
        self.bars.add_class("st-layer-bars")
        self.text = w.HTML()
        self.text.add_class("st-generated-text")
        self.widget = w.VBox([
            w.HTML("<b>SmallThinker memory-limit explorer</b>"),
            w.HBox([self.slider, self.share_label]),
            w.HBox([self.policy, self.prefetch, self.prompt_set, self.run_button]),
            w.HBox([self.warm, self.warm_from]),
            self.predicted, self.breakdown, self.status, self.measured, self.bars, self.text,
        ])
        self.widget.add_class("st-explorer")

        self.slider.observe(self._refresh, "value")
        self.policy.observe(self._refresh, "value")
        self.prompt_set.observe(self._refresh, "value")
        self.run_button.on_click(self._on_click)
        self._refresh()

    # ------------------------------------------------------------------ limit -> cache
    @property
    def limit_mib(self) -> float:
        return float(self.slider.value)

    @property
    def limit_bytes(self) -> int:
        return max(int(round(self.slider.value * MiB)), self.minimum_bytes)

    def set_limit_mib(self, mib: float) -> None:
        """Move the slider (clamped to its range), as a user would."""
        self.slider.value = float(np.clip(mib, self.slider.min, self.slider.max))

    def capacity_for(self, limit_bytes: int | None) -> int:
        """Experts the engine's cache holds under ``limit_bytes``: the engine's own memory planner."""
        from ..engine.memory import plan_memory

        p = self._plan
        return plan_memory(
            limit_bytes, device=p["device"], non_expert=p["non_expert_bytes"], kv_cache=p["kv_cache_bytes"],
            workspace=p["workspace_bytes"], staging=p["staging_bytes"], slot_bytes=p["expert_slot_bytes"],
            num_experts_total=self.num_experts_total, top_k=p["top_k"], max_context=p["max_context"],
            host_bytes=p.get("host_bytes", 0)).capacity_experts

    @property
    def capacity_experts(self) -> int:
        return self.capacity_for(self.limit_bytes)

    @property
    def expert_share(self) -> float:
        """Share of all expert bytes the cache holds at the slider's limit."""
        return self.capacity_experts / self.num_experts_total

    # ------------------------------------------------------------------ traces and curves
    def trace(self, name: str | None = None) -> list[tuple[int, int, int]]:
        """The recorded demand trace of a prompt set (recorded now if needed)."""
        name = name or self.prompt_set.value
        if name not in self._traces:
            self._record(name)
        return self._traces[name]

    def prompt_ids(self, name: str | None = None) -> list[list[int]]:
        name = name or self.prompt_set.value
        if name not in self._prompt_ids:
            ids = []
            for p in self.prompt_sets[name]:
                if isinstance(p, str):
                    if self._tokenizer is None:
                        raise ValueError("text prompts need a checkpoint with a tokenizer; pass token ids instead")
                    p = self._tokenizer(p)["input_ids"]
                p = [int(t) for t in p]
                ids.append(p[: self.max_prompt_tokens] if self.max_prompt_tokens else p)
            self._prompt_ids[name] = ids
        return self._prompt_ids[name]

    def _record(self, name: str) -> None:
        self.status.value = f"recording the expert trace of <b>{html.escape(name)}</b> (no memory limit)..."
        engine = self._factory(memory_limit=None, policy="lru", prefetch=True)
        try:
            engine.reset_stats(clear_cache=True)
            for ids in self.prompt_ids(name):
                for _ in engine.stream(ids, self.max_new_tokens):
                    pass
            self._traces[name] = list(engine.trace)
        finally:
            engine.close()
        self.status.value = ""

    def curve(self, name: str | None = None, policy: str | None = None) -> np.ndarray:
        """Hit rate at every capacity 0 .. all experts, for a prompt set's trace and a policy (computed once)."""
        from ..instruments.curves import hit_rate_curves

        name, policy = name or self.prompt_set.value, policy or self.policy.value
        key = (name, policy)
        if key not in self._curves:
            caps = np.arange(self.num_experts_total + 1)
            df = hit_rate_curves(self.trace(name), capacities=caps, policies=[policy])
            self._curves[key] = df.sort_values("capacity_experts")["hit_rate"].to_numpy(dtype=float)
        return self._curves[key]

    @property
    def predicted_hit_rate(self) -> float:
        """The curve's hit rate at the slider's cache capacity (selected prompt set and policy)."""
        return float(self.curve()[self.capacity_experts])

    def predicted_misses(self, capacity: int | None = None, name: str | None = None,
                         policy: str | None = None) -> dict[str, float]:
        """The curve's misses at ``capacity`` (default: the slider's) as shares of the requests: compulsory (first
        touches: the same at every size), capacity (the rest), policy (misses - Belady's at the same capacity, one
        replay, kept), and the ceiling (1 - compulsory share, the best hit rate any cache reaches on the trace)."""
        from ..instruments.curves import compulsory_ceiling, policy_hit_curve

        name, policy = name or self.prompt_set.value, policy or self.policy.value
        cap = self.capacity_experts if capacity is None else int(capacity)
        trace = self.trace(name)
        n = len(trace)
        hit = float(self.curve(name, policy)[cap])
        ceiling = compulsory_ceiling(trace)
        if (name, cap) not in self._optimal:
            self._optimal[(name, cap)] = float(policy_hit_curve(trace, [cap], "belady").iloc[0])
        return {"hit_rate": hit, "compulsory_share": 1.0 - ceiling if n else float("nan"),
                "capacity_share": ceiling - hit, "policy_share": self._optimal[(name, cap)] - hit,
                "ceiling": ceiling}

    def predicted_layer_hit_rates(self, capacity: int | None = None, name: str | None = None) -> pd.Series:
        """Per-layer LRU hit rates at ``capacity`` (one cache shared by all layers), from stack distances."""
        from ..instruments.curves import stack_distances

        name = name or self.prompt_set.value
        cap = self.capacity_experts if capacity is None else capacity
        if name not in self._distances:
            self._distances[name] = stack_distances(self.trace(name))
        d = self._distances[name]
        layers = np.array([t[-2] for t in self.trace(name)], dtype=np.int64)
        hit = (d >= 0) & (d < cap)
        out = pd.Series(np.nan, index=pd.RangeIndex(self.num_layers, name="layer"), name="hit_rate")
        for i in range(self.num_layers):
            m = layers == i
            if m.any():
                out[i] = hit[m].mean()
        return out

    # ------------------------------------------------------------------ display
    def _refresh(self, *_: Any) -> None:
        cap = self.capacity_experts
        self.share_label.value = (f"holds <b>{self.expert_share:.0%}</b> of expert bytes "
                                  f"({cap}/{self.num_experts_total} experts of {self.expert_nbytes / MiB:.3g} MiB)")
        rate = self.predicted_hit_rate
        self.predicted.value = (f"Predicted hit rate ({html.escape(self.policy.value)}, "
                                f"{html.escape(self.prompt_set.value)}): <b class='st-predicted-value'>{rate:.1%}</b>"
                                f" at {self.limit_mib:.2f} MiB")
        m = self.predicted_misses(cap)
        policy = "" if self.policy.value == "belady" else (
            f", of which <b>{m['policy_share']:.1%}</b> {html.escape(self.policy.value)} misses that the optimal "
            f"policy (Belady) avoids at this size")
        self.breakdown.value = (
            f"misses: <b>{m['compulsory_share']:.1%}</b> compulsory (first touch of an expert: a cache that starts "
            f"empty misses these at any size), <b>{m['capacity_share']:.1%}</b> capacity (evicted, needed again)"
            f"{policy}. Ceiling for these prompts: <b>{m['ceiling']:.1%}</b> from a cold start; a warm cache "
            f"(toggle <i>warm start</i>) avoids the first touches.")

    def _on_click(self, _button) -> None:
        try:
            self.run()
        except Exception as e:  # shown in the dashboard, not lost in the kernel log
            self.status.value = f"<span style='color:#b00'>error: {html.escape(f'{type(e).__name__}: {e}')}</span>"
            raise

    def run(self) -> dict[str, Any]:
        """Open an engine under the slider's limit, policy and prefetch setting, generate the selected prompts
        from an empty cache (text streams into the dashboard), and return the engine's stats with the misses split
        (also shown, with per-layer bars). With warm start on, the same prompts run again from a cache warmed by
        the warm-up set's recorded trace; those stats are under ``"warm"`` (with ``same_tokens``: whether the
        warm run generated exactly the cold run's tokens) and shown beside the cold ones."""
        from ..engine.warm import warm_start

        name, policy, prefetch = self.prompt_set.value, self.policy.value, bool(self.prefetch.value)
        warm = bool(self.warm.value)
        warm_name = name if self.warm_from.value == SAME_SET else self.warm_from.value
        warm_trace = self.trace(warm_name) if warm else None  # recorded before the engine opens
        limit = self.limit_bytes
        predicted = self.predicted_hit_rate
        predicted_misses = self.predicted_misses()
        all_ids = self.prompt_ids(name)
        self.run_button.disabled = True
        self.text.value = ""
        pieces: list[str] = []
        t0 = time.perf_counter()
        try:
            engine = self._factory(memory_limit=limit, policy=policy, prefetch=prefetch)
            try:
                engine.reset_stats(clear_cache=True)
                cold_tokens = []
                for n, ids in enumerate(all_ids, start=1):
                    self.status.value = f"running prompt {n}/{len(all_ids)} of {html.escape(name)}..."
                    head = self._decode(ids[-24:])
                    pieces.append(f"<span style='color:#888'>[{n}] ...{html.escape(head)}</span>")
                    out: list[int] = []
                    for tok in engine.stream(ids, self.max_new_tokens):
                        out.append(tok)
                        pieces[-1] = (f"<span style='color:#888'>[{n}] ...{html.escape(head)}</span>"
                                      f"<b>{html.escape(self._decode(out))}</b>")
                        self.text.value = _pre(pieces)
                    cold_tokens.append(out)
                stats = dict(engine.stats(), **engine.cache.stats.miss_breakdown())
                layers = engine.stats_frame()
                warm_stats = warm_layers = None
                if warm:
                    self.status.value = f"warming the cache from the trace of {html.escape(warm_name)}..."
                    ws = warm_start(engine, warm_trace)
                    warm_tokens = []
                    for n, ids in enumerate(all_ids, start=1):
                        self.status.value = f"warm run: prompt {n}/{len(all_ids)} of {html.escape(name)}..."
                        warm_tokens.append(list(engine.stream(ids, self.max_new_tokens)))
                    warm_stats = dict(engine.stats(), **engine.cache.stats.miss_breakdown(), warm_from=warm_name,
                                      warm_experts_read=ws.experts_read, same_tokens=warm_tokens == cold_tokens)
                    warm_layers = engine.stats_frame()
            finally:
                engine.close()
        finally:
            self.run_button.disabled = False
        self.last_text = "\n".join(pieces)
        stats = dict(stats, prompt_set=name, predicted_hit_rate=predicted, run_seconds=time.perf_counter() - t0,
                     predicted_misses=predicted_misses, warm=warm_stats)
        self.last_stats, self.last_layers, self.last_warm_layers = stats, layers, warm_layers
        self.status.value = f"done in {stats['run_seconds']:.1f} s"
        self.measured.value = _measured_html(stats)
        self._draw_bars(layers, stats, warm_layers)
        return stats

    def _decode(self, ids: Sequence[int]) -> str:
        if self._tokenizer is None:
            return " ".join(map(str, ids))
        return self._tokenizer.decode(list(ids))

    def _draw_bars(self, layers: pd.DataFrame, stats: dict[str, Any], warm_layers: pd.DataFrame | None = None) -> None:
        """Per-layer measured hit rates (bars; cold and warm side by side after a warm run) and, for LRU, the
        curve's per-layer prediction (dots), as a PNG set straight into the Output widget (works in a kernel and
        outside one)."""
        import base64
        import io

        from matplotlib.figure import Figure

        per = layers.drop(index="all", errors="ignore")
        x = np.arange(len(per))
        fig = Figure(figsize=(8.2, 2.6), layout="constrained")
        ax = fig.subplots()
        if warm_layers is None:
            ax.bar(x, per["hit_rate"].astype(float).fillna(0.0), color="#4c72b0", label="measured")
        else:
            wper = warm_layers.drop(index="all", errors="ignore")
            ax.bar(x - 0.2, per["hit_rate"].astype(float).fillna(0.0), width=0.4, color="#4c72b0",
                   label="measured, cold")
            ax.bar(x + 0.2, wper["hit_rate"].astype(float).fillna(0.0), width=0.4, color="#55a868",
                   label=f"measured, warm ({stats['warm']['warm_from']})")
        if stats["policy"] == "lru":
            pred = self.predicted_layer_hit_rates(int(stats["capacity_experts"]), stats["prompt_set"])
            px = x if warm_layers is None else x - 0.2  # the prediction is the cold run's
            ax.plot(px, pred.to_numpy(), "o", color="#dd8452", label="predicted (LRU curve, cold)")
        ax.set_xticks(x, [str(i) for i in per.index])
        ax.set(xlabel="layer", ylabel="hit rate", ylim=(0, 1.05),
               title=f"per-layer hit rate: {stats['policy']}, prefetch {'on' if stats['prefetch'] else 'off'}, "
                     f"{(stats['memory_limit'] or 0) / MiB:.2f} MiB")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        self.bars.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"image/png": png, "text/plain": "<per-layer hit rates>"}},)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _pre(pieces: Sequence[str]) -> str:
    return ("<pre style='white-space:pre-wrap;max-height:260px;overflow:auto;font-size:12px'>"
            + "\n".join(pieces) + "</pre>")


def _measured_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    busy = (s.get("prefill_seconds") or 0.0) + (s.get("decode_seconds") or 0.0)
    share = s["io_wait_seconds"] / busy if busy else float("nan")
    return [
        ("measured hit rate", f"{s['hit_rate']:.1%}"),
        ("compulsory misses", f"{s['compulsory_share']:.1%} ({s['compulsory_misses']} first touches)"),
        ("capacity misses", f"{s['capacity_share']:.1%} ({s['capacity_misses']} evicted, needed again)"),
        ("decode", f"{s['decode_tok_s']:.1f} tok/s"),
        ("prefill", f"{s['prefill_tok_s']:.1f} tok/s"),
        ("I/O wait", f"{s['io_wait_seconds'] * 1e3:.1f} ms ({share:.1%} of compute time)"),
        ("read per token", f"{s['bytes_read_per_token'] / MiB:.3f} MiB"),
    ]


def _measured_html(s: dict[str, Any]) -> str:
    """The cold run's measurements (and the warm run's beside them), each row with a stable class."""
    warm = s.get("warm")
    cols = [_measured_rows(s)] + ([_measured_rows(warm)] if warm else [])
    p = s.get("predicted_misses") or {}
    cols[0][0] = (cols[0][0][0], f"{s['hit_rate']:.1%} (predicted {s['predicted_hit_rate']:.1%})")
    if p:
        cols[0][1] = (cols[0][1][0], f"{cols[0][1][1]} (predicted {p['compulsory_share']:.1%})")
    head = "<tr><td></td><th>cold (empty cache)</th>"
    if warm:
        head += (f"<th>warm (from {html.escape(str(warm['warm_from']))}: {warm['warm_experts_read']} experts "
                 f"read first)</th>")
    head += "</tr>"
    body = ""
    for i, (k, _) in enumerate(cols[0]):
        cls = f"st-{k.replace(' ', '-').replace('/', '')}"
        cells = "".join(f"<td class='{cls}{'' if j == 0 else '-warm'}' style='padding-right:1.5em'>"
                        f"{html.escape(c[i][1])}</td>" for j, c in enumerate(cols))
        body += f"<tr><td style='padding-right:1em'>{k}</td>{cells}</tr>"
    cache = (f"{s['capacity_experts']} experts, {s['policy']}, prefetch {'on' if s['prefetch'] else 'off'}")
    body += f"<tr><td>cache</td><td class='st-cache' colspan='{len(cols)}'>{html.escape(cache)}</td></tr>"
    if warm:
        same = "yes" if warm["same_tokens"] else "NO: the warm run generated other tokens"
        body += (f"<tr><td>same tokens</td><td class='st-same-tokens' colspan='2'>{html.escape(same)}</td></tr>")
    return f"<table>{head}{body}</table>"


def _nice_step(mib: float) -> float:
    """The largest of 1, 2, 5 x 10^k MiB not above ``mib`` (one expert's bytes): a slider step under one expert."""
    if mib <= 0:
        return 1.0
    k = np.floor(np.log10(mib))
    for m in (5, 2, 1):
        if m * 10**k <= mib:
            return float(m * 10**k)
    return float(10**k)
