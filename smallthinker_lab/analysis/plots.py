"""Plots of what SmallThinker does inside, as pure functions over the instruments' tidy DataFrames.

Each function draws on the ``ax=`` (or ``axes=``) it is given, or on a new figure, and returns the Axes (or the
Figure for multi-panel plots). matplotlib and seaborn are imported inside the functions; nothing but the figure
is changed (no rcParams, no global style), so the picture is the same in JupyterLab, a script or a saved PNG.
Colours come from the active matplotlib style: its colour cycle for series, its text colour for reference lines
and the optimal-policy curve, so a dark style (``plt.style.use("dark_background")``) keeps every line visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .plot_style import _ink, _new_ax, _palette, _paper, _tick_step  # noqa: F401  (the plot modules' helpers)
from .plot_throughput import bench_labels, plot_throughput  # noqa: F401  (re-exported)
from .tables import DEFAULT_CONTEXTS, MiB, format_bytes, format_context, torch_dtype_of

OPTIMAL_POLICIES = ("belady", "optimal", "opt", "min")


# ---------------------------------------------------------------------------------------------- experts
def _frequency_matrices(freq_df: pd.DataFrame, datasets: Sequence[str], sort_experts: bool, n_experts: int | None,
                        dataset: str, layer: str, expert: str, frequency: str) -> dict[str, pd.DataFrame]:
    layers = sorted(freq_df[layer].unique())
    experts = list(range(n_experts)) if n_experts else sorted(freq_df[expert].unique())
    mats = {ds: (freq_df[freq_df[dataset] == ds].pivot_table(index=layer, columns=expert, values=frequency,
                                                              aggfunc="mean")
                 .reindex(index=layers, columns=experts).fillna(0.0)) for ds in datasets}
    if sort_experts:  # per layer, experts by frequency summed over the datasets shown, hottest first
        total = sum(m.to_numpy() for m in mats.values())
        order = np.argsort(-total, axis=1, kind="stable")
        mats = {ds: pd.DataFrame(np.take_along_axis(m.to_numpy(), order, axis=1), index=m.index,
                                 columns=pd.RangeIndex(len(experts), name="rank")) for ds, m in mats.items()}
    return mats


def plot_expert_heatmaps(freq_df: pd.DataFrame, datasets: Sequence[str] | None = None, axes: Any = None,
                         vmax: float | None = None, cmap: str | None = None, sort_experts: bool = False,
                         n_experts: int | None = None, ncols: int | None = None, cbar: bool = True,
                         uniform: float | str | None = "auto", title: str | None = None, dataset: str = "dataset",
                         layer: str = "layer", expert: str = "expert", frequency: str = "frequency"):
    """Expert activation frequency, layer x expert, one panel per dataset (the paper's Figures 4-5).

    All panels share one colour scale (0 to ``vmax``, by default the largest frequency shown) and one colour bar.
    The scale is centred on uniform routing: a diverging map (``cmap``, default "RdBu_r") with its middle, white,
    at ``uniform`` = k/E (a ``TwoSlopeNorm``), so a cold expert (blue) and an expert used as often as uniform
    routing would use it (white) look different; hot ones are red. ``uniform="auto"``: k/E from the frame's attrs
    (``top_k``, ``num_experts``), else the mean frequency of a layer (k/E when every expert is listed);
    ``uniform=None``: a sequential map from 0 (default "rocket_r"). ``title``: the figure's title (say the model
    and the prompt sets).
    ``sort_experts=True`` orders the experts of each layer by their frequency summed over the datasets shown
    (the same order in every panel), so the x axis becomes the expert's rank. ``n_experts`` adds experts that
    no token reached. ``ncols``: panels per row of a new figure (all in one row by default). ``axes``: a sequence
    of Axes, one per dataset, to draw on instead. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = list(datasets) if datasets is not None else list(pd.unique(freq_df[dataset]))
    mats = _frequency_matrices(freq_df, datasets, sort_experts, n_experts, dataset, layer, expert, frequency)
    if vmax is None:
        vmax = max(float(m.to_numpy().max()) for m in mats.values()) or 1.0
    if isinstance(uniform, str):
        if uniform != "auto":
            raise ValueError(f"uniform= takes a frequency, 'auto' or None, got {uniform!r}")
        k, E = freq_df.attrs.get("top_k"), freq_df.attrs.get("num_experts")
        uniform = (k / E if k and E else
                   float(freq_df.groupby([dataset, layer])[frequency].mean().mean()) if len(freq_df) else None)
    norm = None
    if uniform is not None and 0.0 < uniform < vmax:
        from matplotlib.colors import TwoSlopeNorm

        norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=vmax)
    cmap = cmap or ("RdBu_r" if norm is not None else "rocket_r")
    n_layers, n_exp = next(iter(mats.values())).shape
    if axes is None:
        ncols = min(ncols or len(datasets), len(datasets))
        nrows = math.ceil(len(datasets) / ncols)
        width = min(5.0, 1.5 + 0.06 * n_exp)
        height = min(7.0, max(2.6, 1.3 + 0.12 * n_layers))
        fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.2, height * nrows), sharey=True,
                                 squeeze=False, layout="constrained")
        for extra in grid.ravel()[len(datasets):]:
            extra.remove()
        axes = list(grid.ravel()[:len(datasets)])
        first_col = [i % ncols == 0 for i in range(len(datasets))]
        aspect = 25 * nrows  # a thin bar, however many rows it spans
    else:
        axes = list(np.ravel(axes))
        if len(axes) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(axes)} axes")
        fig = axes[0].figure
        first_col = [i == 0 for i in range(len(datasets))]
        aspect = 25
    xstep, ystep = _tick_step(n_exp, 8), _tick_step(n_layers, 13)
    for i, (ax, ds) in enumerate(zip(axes, datasets)):
        scale = {"norm": norm} if norm is not None else {"vmin": 0.0, "vmax": vmax}
        sns.heatmap(mats[ds], ax=ax, cmap=cmap, cbar=False, square=False, xticklabels=xstep, yticklabels=ystep,
                    **scale)
        ax.set_title(str(ds))
        ax.set_xlabel("expert (by overall frequency)" if sort_experts else "expert")
        ax.set_ylabel(layer if first_col[i] else "")
        ax.tick_params(axis="x", labelrotation=0)
        ax.tick_params(axis="y", labelrotation=0)
    if cbar:
        label = "activation frequency" + (f"\n(white: uniform routing, k/E = {uniform:.3g})" if norm else "")
        bar = fig.colorbar(axes[0].collections[0], ax=list(axes), label=label, shrink=0.9, pad=0.02, aspect=aspect)
        if norm is not None:
            from matplotlib.ticker import MaxNLocator

            above = MaxNLocator(4).tick_values(uniform, vmax)
            ticks = sorted({0.0, float(uniform), *[float(t) for t in above
                                                   if uniform + 0.08 * vmax < t <= vmax * (1 + 1e-9)]})
            bar.set_ticks(ticks)
            bar.set_ticklabels([f"{t:.3g}" for t in ticks])
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def plot_expert_frequency_distribution(freq_df: pd.DataFrame, threshold: float = 0.14, ax: Any = None,
                                       datasets: Sequence[str] | None = None, dataset: str = "dataset",
                                       frequency: str = "frequency"):
    """ECDF of expert activation frequency per dataset over every (layer, expert), with the ``threshold`` line;
    each dataset's share under the threshold (the paper: 70-80% under 0.14) is marked and written in the legend."""
    import seaborn as sns

    ax = _new_ax(ax, (6, 4))
    datasets = list(datasets) if datasets is not None else list(pd.unique(freq_df[dataset]))
    colors = _palette(len(datasets))
    for ds, color in zip(datasets, colors):
        f = freq_df.loc[freq_df[dataset] == ds, frequency].astype(float)
        share = float((f < threshold).mean())
        sns.ecdfplot(x=f.to_numpy(), ax=ax, color=color, label=f"{ds}: {share:.0%} under {threshold:g}")
        ax.plot([threshold], [share], "o", color=color, markersize=5)
    ax.axvline(threshold, color=_ink(0.7), linestyle="--", linewidth=1)
    ax.text(threshold, 0.02, f" {threshold:g}", color=_ink(0.7), ha="left", va="bottom")
    ax.set_xlim(0, max(1.0, float(freq_df[frequency].max())))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("activation frequency (share of tokens routed to the expert)")
    ax.set_ylabel("share of experts")
    ax.legend(loc="lower right", frameon=False, fontsize="small")
    return ax


# ---------------------------------------------------------------------------------------------- neurons
_BOX_STATS = ("min", "q1", "median", "q3", "max")


def _box_stats(data: pd.DataFrame, by: str, value: str) -> pd.DataFrame:
    """Per ``by``: min, q1, median, q3, max, samples; from raw values (column ``value``) or a summary that has
    them already (e.g. ``neuron_sparsity_definitions`` of one definition and one dataset)."""
    if all(c in data for c in _BOX_STATS):
        if data[by].duplicated().any():
            raise ValueError(f"the summary has several rows per {by}: filter it to one definition and one dataset")
        out = data.set_index(by)[[*_BOX_STATS] + (["samples"] if "samples" in data else [])]
        return out.sort_index()
    if value not in data:
        raise KeyError(f"plot_sparsity_boxplots needs a column {value!r} (raw values) or the columns "
                       f"{list(_BOX_STATS)} (a summary); got {list(data.columns)}")
    g = data.groupby(by)[value]
    return pd.DataFrame({"min": g.min(), "q1": g.quantile(0.25), "median": g.median(), "q3": g.quantile(0.75),
                         "max": g.max(), "samples": g.size()}).sort_index()


def plot_sparsity_boxplots(data: pd.DataFrame, ax: Any = None, value: str = "sparsity", by: str = "layer",
                           reference: float | None = 0.6, palette: str = "viridis",
                           baseline: pd.DataFrame | None = None, baseline_label: str = "random init (chance)",
                           show_n: bool = True, ylabel: str = "neuron sparsity", title: str | None = None):
    """Neuron sparsity per layer, as the paper's Figure 6: one box per layer (quartiles, median line, whiskers to
    the minimum and maximum), early-to-late colours, y from 0 to 1, and a dashed line at ``reference`` (the
    paper's median, 0.6).

    ``data``: raw values, one row per sample with columns ``by`` and ``value`` (``rec.to_dataframe("neurons")``
    gives per-pair sparsity, ``neuron_sparsity_by_neuron`` per-neuron sparsity), or a summary with one row per
    ``by`` and the columns min, q1, median, q3, max (and samples). ``baseline``: the same for a reference model,
    e.g. the random initialisation of the same config (what chance gives), drawn as a hollow box beside each
    box. ``show_n``: the number of samples per box under the layer's tick label (with many layers, their range
    in the x label). ``title``: the axes' title (say the model and the prompt sets).
    """
    import matplotlib as mpl
    from matplotlib.patches import Patch

    stats = _box_stats(data, by, value)
    base = _box_stats(baseline, by, value) if baseline is not None else None
    layers = list(stats.index)
    per_box = (0.8 if base is not None else 0.55) if show_n and len(layers) <= 16 else (0.42 if base is not None
                                                                                      else 0.26)
    ax = _new_ax(ax, (max(5.0, 1.5 + per_box * len(layers)), 3.8))
    cmap = mpl.colormaps[palette]
    colors = [cmap(x) for x in (np.linspace(0, 1, len(layers)) if len(layers) > 1 else [0.5])]
    pos = np.arange(len(layers), dtype=float)
    width, shift = (0.36, 0.2) if base is not None else (0.6, 0.0)

    def bxp(st: pd.DataFrame, where, props: dict, **kw):
        boxes = [{"med": r["median"], "q1": r["q1"], "q3": r["q3"], "whislo": r["min"], "whishi": r["max"],
                  "fliers": [], "label": ""} for _, r in st.iterrows()]
        return ax.bxp(boxes, positions=where, widths=width, patch_artist=True, showfliers=False,
                      manage_ticks=False, boxprops=props, whiskerprops={"color": props["edgecolor"], "linewidth": 0.8},
                      capprops={"color": props["edgecolor"], "linewidth": 0.8}, **kw)

    out = bxp(stats, pos - shift, {"edgecolor": _ink(0.8), "linewidth": 0.8},
              medianprops={"color": _ink(), "linewidth": 1.2})
    for patch, color in zip(out["boxes"], colors):
        patch.set_facecolor(color)
    handles = []
    if base is not None:
        base = base.reindex(layers)
        have = base["median"].notna().to_numpy()
        bxp(base[have], (pos + shift)[have], {"edgecolor": _ink(0.55), "facecolor": "none", "linewidth": 0.9,
                                               "hatch": "///"},
            medianprops={"color": _ink(0.55), "linewidth": 1.2})
        handles.append(Patch(facecolor="none", edgecolor=_ink(0.55), hatch="///", label=baseline_label))
    if reference is not None:
        line = ax.axhline(reference, color=_ink(0.7), linestyle="--", linewidth=1, zorder=0.5,
                          label=f"paper's median ({reference:g})")
        handles.insert(0, line)
    if handles:  # a light frame: the legend may sit over a whisker
        legend = ax.legend(handles=handles, loc="lower left", frameon=True, framealpha=0.85, fontsize="small")
        legend.get_frame().set_edgecolor("none")
        legend.get_frame().set_facecolor(_paper())
    names = [str(int(x)) if isinstance(x, (int, np.integer, float)) and float(x).is_integer() else str(x)
             for x in layers]
    step = _tick_step(len(layers), 26)
    xlabel = by
    if show_n and "samples" in stats and len(layers) <= 16:
        n = stats["samples"].astype(int).to_numpy()
        names = [f"{name}\nn={v:,}" for name, v in zip(names, n)]
        if base is not None and "samples" in base:
            xlabel += f" (n: samples per box; hatched boxes: n={int(base['samples'].min()):,}"
            xlabel += "" if base["samples"].min() == base["samples"].max() else f"-{int(base['samples'].max()):,}"
            xlabel += ")"
    elif show_n and "samples" in stats:
        xlabel += f" (samples per box: {int(stats['samples'].min()):,}-{int(stats['samples'].max()):,})"
    ax.set_xticks(pos[::step], names[::step], fontsize="small" if len(layers) > 8 or show_n else None)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(0, 1.02)  # a little room so boxes and whiskers at 1.0 stay visible
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


# ---------------------------------------------------------------------------------------------- KV cache
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _auto_unit(n: float) -> str:
    return next((u for u in ("GiB", "MiB", "KiB") if n >= 2 * _UNITS[u]), "B")


def _kv_per_layer(kv: Any, config: Any, step: int | None, layer: str, attention: str, value: str
                  ) -> tuple[pd.DataFrame, int | None]:
    """(layer, attention, bytes) rows and the context length they hold (None when unknown)."""
    if isinstance(kv, pd.DataFrame):
        df = kv if attention in kv else kv.assign(**{attention: "unknown"})
        if step is not None:  # that step of every sequence, averaged
            df = df[df["step"] == step]
        else:  # the step of the sequence that held the most bytes
            keys = [c for c in ("dataset", "sequence", "step") if c in df]
            if keys:
                biggest = df.groupby(keys, sort=False)[value].sum().idxmax()
                mask = np.ones(len(df), dtype=bool)
                for c, v in zip(keys, biggest if len(keys) > 1 else (biggest,)):
                    mask &= (df[c] == v).to_numpy()
                df = df[mask]
        context = int(df["context"].max()) if "context" in df and len(df) else None
        out = (df.groupby([layer, attention], as_index=False)[value].mean()
               .rename(columns={layer: "layer", attention: "attention", value: "bytes"}))
        return out, context
    sizes = list(kv.values() if isinstance(kv, Mapping) else kv)
    kinds = (["sliding" if config.is_sliding(i) else "global" for i in range(len(sizes))] if config is not None
             else ["unknown"] * len(sizes))
    return pd.DataFrame({"layer": range(len(sizes)), "attention": kinds, "bytes": sizes}), None


def plot_kv_per_layer(kv: Any, config: Any = None, step: int | None = None, unit: str = "auto", ax: Any = None,
                      layer: str = "layer", attention: str = "attention", value: str = "bytes"):
    """KV-cache bytes held by each layer, bars coloured by attention kind (global / sliding).

    ``kv``: the instruments' kv frame (dataset, sequence, step, layer, attention, context, bytes: by default the
    step of the sequence that held the most bytes; with ``step=``, that step averaged over sequences), or
    per-layer bytes (a sequence, e.g. ``kv_cache_bytes(cfg, T, per_layer=True)``) with the ``config`` that names
    each layer's kind. The title gives the total (and the context length when the frame has it).
    """

    df, context = _kv_per_layer(kv, config, step, layer, attention, value)
    unit = _auto_unit(float(df["bytes"].max())) if unit == "auto" else unit
    df = df.assign(size=df["bytes"] / _UNITS[unit])
    ax = _new_ax(ax, (max(5.0, 1.5 + 0.16 * df["layer"].nunique()), 3.5))
    kinds = [k for k in ("global", "sliding") if k in set(df["attention"])]
    kinds += sorted(set(df["attention"]) - set(kinds))
    colors = dict(zip(("global", "sliding"), _palette(2)))
    for kind in kinds:
        d = df[df["attention"] == kind]
        ax.bar(d["layer"], d["size"], width=0.8, color=colors.get(kind, _ink(0.5)), label=kind)
    n = int(df["layer"].max()) + 1
    step_ = _tick_step(n, 26)
    ax.set_xticks(range(0, n, step_))
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"KV cache ({unit})")
    ax.legend(frameon=False, fontsize="small", loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(kinds),
              borderaxespad=0.2)
    title = f"total {format_bytes(float(df['bytes'].sum()))}" + (f" at {context} tokens" if context else "")
    ax.set_title(title, loc="left", fontsize="medium")
    return ax


def plot_kv_vs_context(configs: Any, contexts: Sequence[int] = DEFAULT_CONTEXTS, dtype: Any = "bf16",
                       ax: Any = None, annotate: bool = True):
    """Analytic KV-cache size of one sequence against context length, per config: the config's own layout
    (hybrid, solid) and every layer global (dashed). MiB on the y axis, a log2 x axis with 1K..32K ticks;
    the saving at the longest context is written in the hybrid curve's label. A config with no sliding layer
    (the released 4B) gets a single curve."""

    from ..model.kv_cache import kv_cache_bytes
    from .tables import model_configs

    ax = _new_ax(ax, (6, 4))
    tdtype = torch_dtype_of(dtype)
    contexts = [int(t) for t in contexts]
    cfgs = model_configs(configs)
    for (name, cfg), color in zip(cfgs.items(), _palette(len(cfgs))):
        hybrid = [kv_cache_bytes(cfg, t, dtype=tdtype) / MiB for t in contexts]
        full = [kv_cache_bytes(cfg, t, dtype=tdtype, all_global=True) / MiB for t in contexts]
        if np.allclose(hybrid, full):  # no sliding layers: one curve
            ax.plot(contexts, full, "-o", color=color, markersize=4, label=f"{name} (every layer global)")
            continue
        ax.plot(contexts, full, "--", color=color, alpha=0.8, label=f"{name}, all global")
        saving = f" ({full[-1] / hybrid[-1]:.2f}x smaller at {format_context(contexts[-1])})" if annotate else ""
        ax.plot(contexts, hybrid, "-o", color=color, markersize=4, label=f"{name}, hybrid{saving}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [format_context(t) for t in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    return ax


# ---------------------------------------------------------------------------------------------- expert cache
def _is_optimal(policy: Any) -> bool:
    return str(policy).lower() in OPTIMAL_POLICIES


def plot_hit_rate_curves(curves_df: pd.DataFrame, measured: pd.DataFrame | None = None, ax: Any = None,
                         x: str | None = None, measured_x: str | None = None, limit: float | None = None,
                         total_bytes: float | None = None, logx: bool = False, unit: str = "MiB",
                         policy: str = "policy", hit_rate: str = "hit_rate"):
    """Expert-cache hit rate against cache capacity, one curve per policy; the optimal policy (Belady) as the
    ceiling (dashed, in the style's text colour, "optimal (Belady)"); with a ``ceiling`` column
    (``hit_rate_curves``), the compulsory ceiling as a dash-dot line: the best hit rate any cache of any size
    reaches on the trace.

    x: ``capacity_bytes`` in ``unit`` (MiB; 'auto' picks KiB/MiB/GiB) when the column exists, else
    ``capacity_experts``. ``measured``: engine runs
    (policy, hit_rate and the x column, or ``measured_x``, e.g. memory_limit in bytes) drawn as markers in
    their policy's colour. ``limit``: a vertical line at this x (bytes when x is in bytes), e.g. the explorer's
    slider. ``total_bytes``: all expert bytes; adds a top axis with the capacity as a share of them.
    """

    ax = _new_ax(ax, (6, 4))
    if x is None:
        x = "capacity_bytes" if "capacity_bytes" in curves_df and curves_df["capacity_bytes"].notna().any() \
            else "capacity_experts"
    in_bytes = "bytes" in x
    if in_bytes and unit == "auto":
        unit = _auto_unit(float(curves_df[x].max()))
    scale = _UNITS[unit] if in_bytes else 1.0
    policies = list(pd.unique(curves_df[policy]))
    others = [p for p in policies if not _is_optimal(p)]
    colors = dict(zip(others, _palette(max(1, len(others)))))
    for p in [q for q in policies if _is_optimal(q)] + others:
        d = curves_df[curves_df[policy] == p].sort_values(x)
        if _is_optimal(p):
            ax.plot(d[x] / scale, d[hit_rate], "--", color=_ink(), linewidth=1.6, label="optimal (Belady)",
                    zorder=3)
        else:
            ax.plot(d[x] / scale, d[hit_rate], "-", color=colors[p], linewidth=1.6, label=str(p).upper(), zorder=2)
    ceilings = pd.unique(curves_df["ceiling"].dropna()) if "ceiling" in curves_df else []
    if len(ceilings) == 1:  # hit_rate_curves' compulsory ceiling: first touches miss in a cache of any size
        ax.axhline(float(ceilings[0]), color="0.35", linestyle="-.", linewidth=1.1, zorder=1,
                   label=f"compulsory ceiling ({float(ceilings[0]):.0%}: any size)")
    if measured is not None and len(measured):
        mx = measured_x or (x if x in measured else "memory_limit")
        mscale = scale if ("bytes" in mx or "limit" in mx) and in_bytes else 1.0
        groups = measured.groupby(policy, sort=False) if policy in measured else [(None, measured)]
        for p, d in groups:
            color = _ink() if _is_optimal(p) else colors.get(p, _ink(0.6))
            ax.scatter(d[mx] / mscale, d[hit_rate], s=40, marker="o", facecolor=color, edgecolor=_paper(),
                       linewidth=1.0, zorder=4, label=f"measured ({str(p).upper()})" if p is not None else "measured")
    if limit is not None:
        ax.axvline(limit / scale, color=_ink(0.6), linestyle=":", linewidth=1.2, label="limit")
    if logx:
        ax.set_xscale("log", base=2)
    else:
        ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"expert cache capacity ({unit})" if in_bytes else "expert cache capacity (experts)")
    ax.set_ylabel("hit rate")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    if total_bytes:
        t = float(total_bytes) / scale
        top = ax.secondary_xaxis("top", functions=(lambda v: v / t, lambda s: s * t))
        top.set_xlabel("share of all expert bytes")
    return ax


# ---------------------------------------------------------------------------------------------- training
def plot_loss_curve(log_df: pd.DataFrame, ax: Any = None, smooth: int | None = None, step: str = "step",
                    columns: Sequence[str] = ("loss", "ce"), secondary: Sequence[str] = ("balance",)):
    """Training loss against step: ``columns`` on the left axis, ``secondary`` (the balance loss, much smaller)
    on a right axis, dashed. ``smooth``: a rolling-mean window in steps; the raw left-axis curves are then drawn
    faint behind."""

    ax = _new_ax(ax, (6, 3.8))
    cols = [c for c in columns if c in log_df]
    sec = [c for c in secondary if c in log_df]
    palette = _palette(len(cols) + len(sec))
    df = log_df.sort_values(step)
    handles = []

    def draw(axis, col, color, dashed=False):
        y = df[col].astype(float)
        if smooth and smooth > 1:
            if not dashed:  # the raw curve, faint; not for the secondary axis, where it would hide the rest
                axis.plot(df[step], y, color=color, alpha=0.25, linewidth=0.8)
            y = y.rolling(int(smooth), min_periods=1).mean()
        (h,) = axis.plot(df[step], y, color=color, linewidth=1.5, linestyle="--" if dashed else "-", label=col)
        handles.append(h)

    for col, color in zip(cols, palette):
        draw(ax, col, color)
    ax.set_xlabel(step)
    ax.set_ylabel("loss" if cols else "")
    if sec:
        ax2 = ax.twinx()
        for col, color in zip(sec, palette[len(cols):]):
            draw(ax2, col, color, dashed=True)
        ax2.set_ylabel(", ".join(sec) + " (right)")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, frameon=False, fontsize="small", loc="upper right")
    return ax


# ---------------------------------------------------------------------------------------------- warm starts
_MISS_COLORS = {"hits": "#4c72b0", "capacity_misses": "#dd8452", "compulsory_misses": "#c44e52"}


def plot_domain_hit_rates(domain_df: pd.DataFrame, ax: Any = None, domain: str = "domain",
                          warm_from: str = "warm_from"):
    """Per domain and warm-up (``engine.warm.domain_hit_rates``): one horizontal bar per run, split into hits,
    capacity misses and compulsory misses as shares of its requests (each bar sums to 1). Returns the Axes."""
    d = domain_df.reset_index(drop=True)
    ax = _new_ax(ax, (7, 0.35 * len(d) + 1.4))
    y = np.arange(len(d))[::-1]
    left = np.zeros(len(d))
    for col, label in (("hits", "hits"), ("capacity_misses", "capacity misses (evicted earlier)"),
                       ("compulsory_misses", "compulsory misses (first touch)")):
        share = d[col].to_numpy(dtype=float) / d["requests"].to_numpy(dtype=float)
        ax.barh(y, share, left=left, color=_MISS_COLORS[col], label=label, height=0.75)
        left += share
    for yi, r in zip(y, d.to_dict("records")):
        ax.text(0.01, yi, f"{r['hits'] / r['requests']:.1%}", va="center", ha="left", color="white",
                fontsize="x-small")
    labels = [f"{r[domain]}  (cold)" if r[warm_from] in ("none", None) else f"{r[domain]}  warm: {r[warm_from]}"
              for r in d.to_dict("records")]
    ax.set_yticks(y, labels, fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of demand requests")
    cap = d["capacity_experts"].iloc[0] if "capacity_experts" in d else None
    ax.set_title("hit rate per domain, cold and warm" + (f" ({cap} experts cached)" if cap is not None else ""))
    ax.legend(frameon=False, fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12 * 8 / max(8, len(d))
                                                                                         - 0.05), ncols=3)
    return ax


def plot_domain_switch(switch_df: pd.DataFrame, axes: Any = None, window: int = 8):
    """A cache serving one domain and then another (``engine.warm.switch_domains``), per forward step: top, the
    hit rate over the last ``window`` steps (hits / requests, so a prefill weighs as its requests) and each
    step's own (dots), with the share of resident experts read during the current phase (dashed, right axis);
    bottom, each step's misses, compulsory and capacity, stacked. Phases are shaded and labelled. Returns the
    Figure."""
    import matplotlib.pyplot as plt

    d = switch_df.sort_values("step").reset_index(drop=True)
    if axes is None:
        fig, axes = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True, height_ratios=(3, 2), layout="constrained")
    top, bottom = axes
    fig = top.figure
    x = d["step"].to_numpy()
    roll = (d["hits"].rolling(window, min_periods=1).sum()
            / d["requests"].rolling(window, min_periods=1).sum().replace(0, np.nan))
    shades = ("#f2f2f2", "#e3ecf7")
    for i, (_, g) in enumerate(d.groupby("phase_index", sort=True)):
        lo, hi = g["step"].min() - 0.5, g["step"].max() + 0.5
        for ax in axes:
            ax.axvspan(lo, hi, color=shades[i % 2], zorder=0)
        top.text((lo + hi) / 2, 1.04, str(g["phase"].iloc[0]), ha="center", va="bottom", fontsize="small")
        if i:
            for ax in axes:
                ax.axvline(lo, color="0.3", linewidth=1.0, linestyle=":")
    top.scatter(x, d["hit_rate"], s=8, color=_MISS_COLORS["hits"], alpha=0.35, label="hit rate of the step")
    top.plot(x, roll, color=_MISS_COLORS["hits"], linewidth=1.8, label=f"hit rate, last {window} steps")
    top.plot(x, d["phase_share"], "--", color="0.25", linewidth=1.2,
             label="resident experts read in this phase")
    top.set_ylim(0, 1.12)
    top.set_ylabel("share")
    top.legend(frameon=False, fontsize="x-small", loc="lower right", ncols=3)
    bottom.bar(x, d["capacity_misses"], width=1.0, color=_MISS_COLORS["capacity_misses"],
               label="capacity misses (evicted earlier)")
    bottom.bar(x, d["compulsory_misses"], width=1.0, bottom=d["capacity_misses"],
               color=_MISS_COLORS["compulsory_misses"], label="compulsory misses (first touch)")
    bottom.set_ylabel("misses per step")
    bottom.set_xlabel("forward step (a prompt's prefill, then one per generated token)")
    bottom.set_xlim(x.min() - 0.5, x.max() + 0.5)
    bottom.legend(frameon=False, fontsize="x-small", loc="upper right")
    return fig
