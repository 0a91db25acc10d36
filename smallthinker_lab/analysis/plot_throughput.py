"""Throughput bars of benchmark runs (``plots.plot_throughput``; re-exported there)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .plot_style import _ink, _new_ax, _palette
from .tables import format_bytes, is_in_memory


def bench_labels(bench_df: pd.DataFrame) -> list[str]:
    """A short label per benchmark row from the columns that differ between rows (mode, device, limit, ...)."""
    cols = [c for c in ("device", "mode", "memory_limit", "policy", "prefetch")
            if c in bench_df and bench_df[c].astype(str).nunique() > 1]
    mem = is_in_memory(bench_df)
    labels = []
    for (_, row), in_mem in zip(bench_df.iterrows(), mem):
        parts = []
        for c in cols:
            v = row[c]
            if c == "memory_limit":
                parts.append(format_bytes(v))
            elif c == "prefetch":
                if not in_mem:
                    parts.append("prefetch" if v is True or v == "on" or v == 1 else "no prefetch")
            elif c == "policy":
                if not in_mem:
                    parts.append("no cache" if str(v).lower() in ("none", "off", "nan", "") else str(v))
            elif c == "mode" and in_mem and "memory_limit" in cols:
                continue
            elif not (isinstance(v, float) and math.isnan(v)) and v is not None:
                parts.append(str(v))
        labels.append(", ".join(parts) or str(row.get("mode", "")))
    return labels


def _by_memory_limit(df: pd.DataFrame, memory_limit: str = "memory_limit") -> pd.DataFrame:
    """Rows in memory first, then by memory limit, largest first (stable within one limit)."""
    if memory_limit not in df:
        return df
    key = pd.to_numeric(df[memory_limit], errors="coerce").where(~is_in_memory(df).to_numpy(), np.inf)
    order = np.argsort(-key.fillna(np.inf).to_numpy(dtype=float), kind="stable")
    return df.iloc[order].reset_index(drop=True)


def plot_throughput(bench_df: pd.DataFrame, ax: Any = None, value: str = "decode_tok_s",
                    bound_share: str = "bound_share", mode: str = "mode",
                    error: str | tuple[str, str] | None = "auto", log: bool | str = "auto", sort: bool = True):
    """Decode tokens/s per benchmark run, horizontal bars coloured by mode, each annotated with its tok/s and the
    share of the bound reached (bound time / measured time).

    Error bars: ``error="auto"`` draws the range of the repeats a row was measured over, from the columns
    ``{value}_min`` and ``{value}_max`` when the frame has them (the benchmark suites' rows do); rows with the same
    label (the same settings, run several times) are one bar at their mean with an error bar from their minimum
    to their maximum and "mean of n" in the annotation. ``error``: a column of +- errors, or a (low, high) pair of
    columns, to draw instead; None: no error bars. ``sort``: in-memory rows first, then by memory limit, largest
    first. ``log="auto"``: a log x axis when the bars span more than 30x.
    """
    df = _by_memory_limit(bench_df.reset_index(drop=True)) if sort else bench_df.reset_index(drop=True)
    if error == "auto":
        pair = (f"{value}_min", f"{value}_max")
        error = pair if all(c in df and df[c].notna().any() for c in pair) else None
    for col in ([error] if isinstance(error, str) else list(error or [])):
        if col not in df:
            raise KeyError(f"error column {col!r} is not in the benchmark frame ({list(df.columns)})")
    df = df.assign(bar_label=bench_labels(df), bar_mode=df[mode].astype(str) if mode in df else "")
    g = df.groupby(["bar_label", "bar_mode"], sort=False)
    agg = g.agg(v=(value, "mean"), lo=(value, "min"), hi=(value, "max"), n=(value, "size")).reset_index()
    if bound_share in df:
        agg["b"] = g[bound_share].mean().to_numpy()
    if isinstance(error, str):
        agg["e_lo"] = agg["e_hi"] = g[error].mean().to_numpy()
    elif error is not None:
        agg["e_lo"] = agg["v"] - g[error[0]].min().to_numpy()
        agg["e_hi"] = g[error[1]].max().to_numpy() - agg["v"]
    ax = _new_ax(ax, (7.5, 0.9 + 0.42 * len(agg)))
    modes = list(pd.unique(agg["bar_mode"]))
    colors = dict(zip(modes, _palette(len(modes))))
    ypos = np.arange(len(agg))
    v = agg["v"].to_numpy(dtype=float)
    if error is not None:
        xerr = np.vstack([agg["e_lo"].to_numpy(dtype=float), agg["e_hi"].to_numpy(dtype=float)])
        xerr = np.where(np.isfinite(xerr), np.maximum(xerr, 0.0), 0.0)
    elif (agg["n"] > 1).any():
        xerr = np.vstack([v - agg["lo"].to_numpy(dtype=float), agg["hi"].to_numpy(dtype=float) - v])
    else:
        xerr = None
    ax.barh(ypos, v, color=[colors[m] for m in agg["bar_mode"]], height=0.7, xerr=xerr,
            error_kw={"ecolor": _ink(0.75), "capsize": 3, "elinewidth": 1})
    positive = v[np.isfinite(v) & (v > 0)]
    use_log = (log is True or (log == "auto" and len(positive) > 1 and positive.max() / positive.min() > 30))
    vmax = float(np.nanmax(v)) if len(v) else 1.0
    right = np.nanmax(v + (xerr[1] if xerr is not None else 0)) if len(v) else 1.0
    for y, r in zip(ypos, agg.itertuples()):
        text = f"{r.v:.1f} tok/s"
        if r.n > 1:
            text += f" (mean of {r.n})"
        if bound_share in df and pd.notna(r.b):
            text += f" · {r.b:.0%} of bound"
        x = (r.hi if error is None else r.v + r.e_hi) if np.isfinite(r.v) else 0.0
        x = x if np.isfinite(x) else r.v
        ax.text(x * 1.1 if use_log else x + 0.02 * vmax, y, text, va="center", ha="left", fontsize="small")
    ax.set_yticks(ypos, agg["bar_label"])
    ax.invert_yaxis()
    if use_log:
        ax.set_xscale("log")
        ax.set_xlim(positive.min() / 2, right * 40)  # room for the annotations on a log axis
    else:
        ax.set_xlim(0, right * 1.75)
    label = "decode tokens/s" if value == "decode_tok_s" else value
    ax.set_xlabel(label + (" (log scale)" if use_log else ""))
    if len(modes) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colors[m], label=m) for m in modes], title=mode, frameon=False,
                  fontsize="small", loc="lower right")
    return ax
