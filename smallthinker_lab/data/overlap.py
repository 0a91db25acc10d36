"""How held out are the prompt sets? n-gram overlap of each prompt set with its domain's training text.

One implementation for the corpus builder, the committed overlap table (``data/prompts/overlap.csv``), the
committed n-gram index the tests read (``data/prompts/overlap_index.json``) and the model card's
``quality_prompt_overlap.csv`` (``smallthinker_lab.quality.contamination`` re-exports :func:`prompt_overlap`).

The unit is the n-gram of a lowercased text whose digit runs are masked to ``0`` (a copy of a problem with other
numbers still counts): word 8-grams for English, code and math; for Chinese, which has no spaces, 12-grams of
non-space characters (about 8 words: a Chinese word is 1.5 characters on average). A prompt's overlap is the share
of its distinct n-grams that occur anywhere in the training documents of its domain (``split`` not ``"val"``).

The index keeps, per domain, the 64-bit hashes of the prompt sets' n-grams that the training text contains
(the only corpus n-grams the overlap needs, so it is a few kB instead of the corpus's ~50 M n-grams), with the
sha256 of every prompt file it was built for: a changed prompt set no longer matches the index and
:func:`overlap_from_index` refuses it (rebuild with ``smallthinker-lab data prepare`` or :func:`build_index`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..prompt_sets import PROMPT_SETS, SET_DOMAIN  # the registry's names and domains

__all__ = [
    "INDEX_FILE",
    "OVERLAP_N",
    "SET_DOMAIN",
    "build_index",
    "ngram_hashes",
    "ngrams",
    "overlap_from_index",
    "prompt_overlap",
    "training_texts",
]

OVERLAP_N = {"words": 8, "chars": 12}
INDEX_FILE = "overlap_index.json"
COLUMNS = ["set", "domain", "prompts", "ngram", "mean_overlap", "over_half"]
_DIGITS = re.compile(r"\d+")


def ngrams(text: str, chars: bool = False) -> set[str]:
    """Distinct n-grams of ``text`` lowercased with digit runs masked as ``0``: word 8-grams, or with
    ``chars`` 12-grams of the non-space characters (a text shorter than n has none)."""
    t = _DIGITS.sub("0", text.lower())
    if chars:
        u = "".join(t.split())
        n = OVERLAP_N["chars"]
        return {u[i: i + n] for i in range(len(u) - n + 1)}
    w = t.split()
    n = OVERLAP_N["words"]
    return {" ".join(w[i: i + n]) for i in range(len(w) - n + 1)}


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(text: str, chars: bool = False) -> set[int]:
    """64-bit hashes (blake2b) of :func:`ngrams`."""
    return {_hash(g) for g in ngrams(text, chars)}


def _unit(chars: bool) -> str:
    return f"{OVERLAP_N['chars']}-character grams" if chars else f"word {OVERLAP_N['words']}-grams"


def _read_prompts(path: Path, limit: int | None = None) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"no prompt set at {path}")
    with path.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:limit] if limit is not None else texts


def training_texts(path: str | Path) -> Iterator[str]:
    """The ``text`` of every training document of a corpus JSONL (documents marked ``"split": "val"`` skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d.get("split", "train") != "val":
                    yield d["text"]


def _row(s: str, domain: str, hashes: list[set[int]], found: set[int]) -> dict[str, Any]:
    shares = np.array([len(h & found) / len(h) if h else 0.0 for h in hashes])
    return {"set": s, "domain": domain, "prompts": len(hashes), "ngram": _unit(domain == "zh"),
            "mean_overlap": float(shares.mean()) if len(shares) else 0.0,
            "over_half": float((shares > 0.5).mean()) if len(shares) else 0.0}


def _found(prompts: Sequence[str], texts: Iterable[str], chars: bool) -> set[int]:
    """Hashes of the n-grams of ``prompts`` that occur in ``texts`` (compared as strings, hashed once)."""
    wanted: set[str] = set().union(*(ngrams(p, chars) for p in prompts)) if prompts else set()
    found: set[str] = set()
    for t in texts:
        found |= ngrams(t, chars) & wanted
    return {_hash(g) for g in found}


def prompt_overlap(prompts_dir: str | Path, corpus_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                   limit: int | None = None) -> pd.DataFrame:
    """Per prompt set, the share of each prompt's n-grams that occur in its domain's training text
    ``{corpus_dir}/{domain}.jsonl``.

    Columns: set, domain, prompts, ngram, mean_overlap (mean over prompts), over_half (share of prompts with more
    than half of their n-grams in the training text). Sets whose corpus file is missing are left out."""
    rows = []
    for s in sets:
        domain = SET_DOMAIN.get(s)
        path = Path(corpus_dir) / f"{domain}.jsonl"
        if domain is None or not path.exists():
            continue
        chars = domain == "zh"
        texts = _read_prompts(Path(prompts_dir) / f"{s}.jsonl", limit)
        hashes = [ngram_hashes(t, chars) for t in texts]
        rows.append(_row(s, domain, hashes, _found(texts, training_texts(path), chars)))
    return pd.DataFrame(rows, columns=COLUMNS)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_index(prompts_dir: str | Path, corpus_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                out: str | Path | None = None) -> dict[str, Any]:
    """The overlap index of the training corpus for the prompt sets ``sets``: per set, the prompt file's sha256
    and the sorted hashes of its n-grams found in the domain's training text (hex). Written to ``out`` (JSON)
    when given. Every set needs its corpus file."""
    prompts_dir, corpus_dir = Path(prompts_dir), Path(corpus_dir)
    index: dict[str, Any] = {
        "what": "hashes (blake2b, 8 bytes, hex) of the prompt sets' n-grams that occur in the training text of "
                "their domain; built by smallthinker_lab.data.overlap.build_index",
        "ngram": {"words": OVERLAP_N["words"], "chars": OVERLAP_N["chars"], "lowercase": True, "digits": "0"},
        "sets": {},
    }
    for s in sets:
        domain = SET_DOMAIN.get(s)
        if domain is None:
            raise ValueError(f"unknown prompt set {s!r}; known: {sorted(SET_DOMAIN)}")
        corpus = corpus_dir / f"{domain}.jsonl"
        if not corpus.exists():
            raise FileNotFoundError(f"{corpus} missing: run `smallthinker-lab data prepare` first")
        chars = domain == "zh"
        pfile = prompts_dir / f"{s}.jsonl"
        texts = _read_prompts(pfile)
        hashes = [ngram_hashes(t, chars) for t in texts]
        found = _found(texts, training_texts(corpus), chars)
        index["sets"][s] = {"domain": domain, "prompt_sha256": _file_sha256(pfile), "corpus_sha256":
                            _file_sha256(corpus), "prompt_ngrams": len(set().union(*hashes)),
                            "found": [f"{h:016x}" for h in sorted(found)]}
    if out is not None:
        Path(out).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def overlap_from_index(prompts_dir: str | Path, index: str | Path | dict[str, Any],
                       sets: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`prompt_overlap` from a committed index instead of the corpus (same columns, same numbers).

    Raises ``ValueError`` when a prompt file is not the one the index was built for (sha256 differs)."""
    if not isinstance(index, dict):
        index = json.loads(Path(index).read_text(encoding="utf-8"))
    if index.get("ngram", {}).get("words") != OVERLAP_N["words"] or index["ngram"].get("chars") != OVERLAP_N["chars"]:
        raise ValueError(f"the index was built with n-grams {index.get('ngram')}, not {OVERLAP_N}: rebuild it")
    rows = []
    for s in sets if sets is not None else list(index["sets"]):
        if s not in index["sets"]:
            raise KeyError(f"prompt set {s!r} is not in the index (it has {sorted(index['sets'])})")
        entry = index["sets"][s]
        pfile = Path(prompts_dir) / f"{s}.jsonl"
        sha = _file_sha256(pfile)
        if sha != entry["prompt_sha256"]:
            raise ValueError(f"{pfile} (sha256 {sha}) is not the prompt set the index was built for "
                             f"({entry['prompt_sha256']}): rebuild the index (smallthinker-lab data prepare)")
        chars = entry["domain"] == "zh"
        hashes = [ngram_hashes(t, chars) for t in _read_prompts(pfile)]
        rows.append(_row(s, entry["domain"], hashes, {int(h, 16) for h in entry["found"]}))
    return pd.DataFrame(rows, columns=COLUMNS)
