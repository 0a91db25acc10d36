"""Drawing helpers shared by the plot modules: new axes, colours from the active matplotlib style."""

from __future__ import annotations

import math
from typing import Any


def _new_ax(ax: Any, figsize: tuple[float, float]):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _palette(n: int) -> list:
    """``n`` colours of the active style's colour cycle (``axes.prop_cycle``), repeated when it has fewer."""
    import matplotlib as mpl

    cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    return [cycle[i % len(cycle)] for i in range(max(0, n))]


def _ink(alpha: float = 1.0) -> Any:
    """The active style's foreground (its text colour: black on light styles, white on dark ones) at ``alpha``."""
    import matplotlib as mpl

    color = mpl.rcParams["text.color"]
    return color if alpha == 1.0 else mpl.colors.to_rgba(color, alpha)


def _paper() -> Any:
    """The active style's axes background, for marker edges that separate a point from the lines under it."""
    import matplotlib as mpl

    return mpl.rcParams["axes.facecolor"]


def _tick_step(n: int, max_labels: int) -> int:
    """The smallest of 1, 2, 4, 8, ... that shows at most ``max_labels`` of ``n`` tick labels."""
    return 2 ** max(0, math.ceil(math.log2(max(1.0, n / max_labels))))
