"""Are the prompt sets held out? Word n-gram overlap of each prompt set with its domain's training text, and the
facts of the trainer's TRAINING.md."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..prompt_sets import PROMPT_SETS, SET_DOMAIN, read_prompts

OVERLAP_N = {"words": 8, "chars": 12}


def _grams(text: str, chars: bool) -> set[str]:
    """Word 8-grams (or, for Chinese, 12-grams of non-space characters) with every digit run masked as 0."""
    t = re.sub(r"\d+", "0", text)
    if chars:
        u = "".join(t.split())
        n = OVERLAP_N["chars"]
        return {u[i: i + n] for i in range(len(u) - n + 1)}
    w = t.split()
    n = OVERLAP_N["words"]
    return {" ".join(w[i: i + n]) for i in range(len(w) - n + 1)}


def prompt_overlap(prompts_dir: str | Path, corpus_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                   limit: int | None = None) -> pd.DataFrame:
    """How held out the prompt sets are: per set, the share of each prompt's n-grams (digits masked, so a copy
    with other numbers counts) that occur anywhere in its domain's training text ``{corpus_dir}/{domain}.jsonl``.

    Columns: set, domain, prompts, ngram, mean_overlap (mean over prompts), over_half (share of prompts with more
    than half of their n-grams in the corpus). Sets whose corpus file is missing are left out.
    """
    rows = []
    for s in sets:
        domain = SET_DOMAIN.get(s)
        path = Path(corpus_dir) / f"{domain}.jsonl"
        if domain is None or not path.exists():
            continue
        chars = domain == "zh"
        grams = [_grams(r["text"], chars) for r in read_prompts(Path(prompts_dir) / f"{s}.jsonl", limit)]
        wanted = set().union(*grams)
        found: set[str] = set()
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    found |= _grams(json.loads(line)["text"], chars) & wanted
        shares = np.array([len(g & found) / len(g) if g else 0.0 for g in grams])
        unit = f"{OVERLAP_N['chars']}-character grams" if chars else f"word {OVERLAP_N['words']}-grams"
        rows.append({"set": s, "domain": domain, "prompts": len(grams), "ngram": unit,
                     "mean_overlap": float(shares.mean()), "over_half": float((shares > 0.5).mean())})
    return pd.DataFrame(rows, columns=["set", "domain", "prompts", "ngram", "mean_overlap", "over_half"])


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
