"""Names shared by the quality measurements: the domains, the prompt sets (from the registry, prompt_sets.py), the
paper's reference figures, formats."""

from __future__ import annotations

import re
from pathlib import Path

from ..prompt_sets import PROMPT_SETS, SET_DOMAIN  # noqa: F401  (the registry's; re-exported for quality/)

DOMAINS = ("math", "code", "en", "zh")


CONTINUATION_PROMPTS = (("humaneval", 0), ("humaneval", 1), ("gsm8k", 0), ("gsm8k", 1), ("zh-news", 0),
                        ("wiki-en", 0))


COLD, HOT = 0.14, 0.4


SETTING_KEYS = ("max_tokens", "window", "stride", "new_tokens", "prompt_limit", "continuation_tokens")


PAPER_COLD = (0.70, 0.80)


PAPER_HOT = (0.20, 0.30)


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


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower().split("(")[0]).strip("-") or "model"


def _uniform(m) -> float:  # m: a ModelQuality
    c = m.info["config"]
    return c["moe_num_active_primary_experts"] / c["moe_num_primary_experts"]
