"""Pictures of interventions: the logit lens and the causal specialisation table. Pure functions returning an Axes;
matplotlib imported inside."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _visible(piece, max_chars: int) -> str:
    """A token piece as a short label: escapes for newlines and tabs, spaces shown as the open box."""
    return repr(str(piece))[1:-1].replace(" ", "\u2423")[:max_chars]


def plot_logit_lens(df: pd.DataFrame, ax=None, max_chars: int = 6):
    """Heatmap of the top-1 probability per (layer, position) of :func:`logit_lens`'s frame, each cell labelled with
    its top-1 token (the piece, or the id); the x ticks are the input tokens."""
    import matplotlib.pyplot as plt

    top1 = df[df["rank"] == 0]
    grid = top1.pivot(index="layer", columns="position", values="prob")
    label_col = "pred" if "pred" in top1 else "pred_id"
    labels = top1.pivot(index="layer", columns="position", values=label_col)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.6 * grid.shape[1] + 2), max(2.5, 0.45 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for (r, c), text in np.ndenumerate(labels.to_numpy()):
        s = _visible(text, max_chars)
        ax.text(c, r, s, ha="center", va="center", fontsize=7,
                color="black" if grid.to_numpy()[r, c] > 0.6 else "white")
    inputs = df[(df["layer"] == grid.index[0]) & (df["rank"] == 0)]
    xt = inputs["token"] if "token" in inputs else inputs["token_id"]
    ax.set_xticks(range(grid.shape[1]), [_visible(t, max_chars) for t in xt], rotation=60, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer (residual after it)")
    ax.set_title("logit lens: top-1 prediction and its probability")
    ax.figure.colorbar(im, ax=ax, label="top-1 probability")
    return ax


def plot_specialisation(table: pd.DataFrame, ax=None, value: str = "ratio"):
    """Heatmap of :func:`causal_specialisation`'s table: rows the ablated set (each domain's hottest experts, and
    the random control), columns the evaluated domain, cells ``value`` ("ratio": perplexity / unablated, or "ppl")."""
    import matplotlib.pyplot as plt

    grid = table.pivot(index="ablated", columns="domain", values=value)
    order = [r for r in table["ablated"].drop_duplicates() if r in grid.index]
    grid = grid.loc[order, [c for c in table["domain"].drop_duplicates() if c in grid.columns]]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * grid.shape[1] + 3, 0.6 * grid.shape[0] + 1.8))
    from matplotlib.colors import LogNorm

    values = grid.to_numpy()
    norm = LogNorm(vmin=max(np.nanmin(values), 1e-3), vmax=max(np.nanmax(values), np.nanmin(values) * 1.01))
    im = ax.imshow(values, aspect="auto", cmap="magma_r", norm=norm)  # log: ratios span orders of magnitude
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if norm(v) > 0.55 else "black")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("held-out text of domain")
    ax.set_ylabel("experts ablated")
    label = "perplexity / unablated perplexity" if value == "ratio" else value
    ax.set_title(f"causal specialisation: {label}")
    ax.figure.colorbar(im, ax=ax, label=label)
    return ax
