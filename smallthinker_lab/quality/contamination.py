"""Are the prompt sets held out? Word n-gram overlap of each prompt set with its domain's training text, and the
facts of the trainer's TRAINING.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# one implementation of the held-out measurement, shared with the corpus builder and its committed index
from ..data.overlap import OVERLAP_N, prompt_overlap  # noqa: F401
from ..prompt_sets import PROMPT_SETS, SET_DOMAIN, read_prompts  # noqa: F401  (the registry's, re-exported)


# ============================================================================================ training facts
def _clean_md(s: str) -> str:
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)
    return s.replace("**", "").replace("`", "").strip()


def read_training(model_dir: str | Path) -> dict[str, Any]:
    """What the trainer's ``TRAINING.md`` states: {"facts": key -> value, "sections": title -> text}.

    facts: the rows of two-column markdown tables and ``- key: value`` bullets (markup stripped, first
    occurrence kept); sections: the text under each ``## `` heading, verbatim. Empty when there is no file.
    """
    path = Path(model_dir) / "TRAINING.md"
    if not path.exists():
        return {}
    facts: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if len(cells) != 2 or all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                continue
            key, val = _clean_md(cells[0]), _clean_md(cells[1])
            if key and val and key.lower() not in ("key", "what", "item", "field", "fact"):
                facts.setdefault(key, val)
            continue
        m = re.match(r"^[-*]\s+(.+?)\s*:\s+(.+)$", s)
        if m:
            key, val = _clean_md(m.group(1)), _clean_md(m.group(2))
            if key and val and len(key) <= 60:
                facts.setdefault(key, val)
    return {"facts": facts, "sections": {k: "\n".join(v).strip() for k, v in sections.items()}}


def _fact(facts: dict[str, str], *patterns: str) -> str | None:
    for p in patterns:
        for k, v in facts.items():
            if re.search(p, k, re.IGNORECASE):
                return v
    return None
