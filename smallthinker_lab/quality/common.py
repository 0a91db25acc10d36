"""Names shared by the quality measurements: the domains, the prompt sets (from the registry, prompt_sets.py), the
paper's reference figures, formats."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from ..prompt_sets import DOMAINS, PROMPT_SETS, SET_DOMAIN  # noqa: F401  (the registry's; re-exported for quality/)

CONTINUATION_PROMPTS = (("humaneval", 0), ("humaneval", 1), ("gsm8k", 0), ("gsm8k", 1), ("zh-news", 0),
                        ("wiki-en", 0))


COLD, HOT = 0.14, 0.4


SETTING_KEYS = ("max_tokens", "window", "stride", "new_tokens", "prompt_limit", "continuation_tokens")


PAPER_COLD = (0.70, 0.80)


PAPER_HOT = (0.20, 0.30)


PAPER_HOT_BAND = (0.4, 0.6)  # the paper's hot experts have activation frequencies in this band


PAPER_21B = {"num_experts": 64, "top_k": 6}  # SmallThinker-21B-A3B, for the hot-share cap k / (0.4 E)


BASELINE_SEED = 0  # the random initialisation measured as chance: the trainer's seed, so the trained model's start


PAPER_SPARSITY_MEDIAN = 0.6


REPO = Path(__file__).resolve().parents[1]


CARD_SECTIONS = ("## Model", "## Data", "## Training", "## Quality", "### Held-out perplexity",
                 "### Expert usage differs across domains", "### Skew of expert activation frequency",
                 "### ReGLU neuron sparsity", "### What the DP-group balance loss changes", "### Greedy continuations",
                 "## Limitations", "## Licences", "## Reproduce")


# ============================================================================================ formatting
def fmt_ppl(x: float) -> str:
    return f"{x:,.2f}"


def fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_js(x: float) -> str:
    return f"{x:.3f}"


def fmt_sparsity(x: float) -> str:
    return f"{x:.3f}"


def fmt_int(x: float) -> str:
    return f"{int(x):,}"


def fmt_range(r: tuple[float, float]) -> str:
    return f"{100 * r[0]:.0f}-{100 * r[1]:.0f}%"


def _table(df: pd.DataFrame) -> list[str]:
    """A markdown table of ``df`` (NaN and None as empty cells)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                                       for v in row) + " |")
    return lines


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower().split("(")[0]).strip("-") or "model"


def _uniform(m) -> float:  # m: a ModelQuality
    c = m.info["config"]
    return c["moe_num_active_primary_experts"] / c["moe_num_primary_experts"]
