"""Measure speculative decoding: acceptance per draft position and per domain, and the speed-up over the target alone.

Every prompt runs the target alone and then with the draft at each ``draft_tokens``, greedy, in the same round, and
rounds repeat, so a shared machine's drift reaches both sides alike; a row's speed-up is its decode tok/s over the
target-alone row of the same prompt and round. Greedy tokens with the draft are checked equal to the target's.
The target is an in-memory model or an :class:`~smallthinker_lab.Engine` (experts offloaded, the draft in memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..model.generate import GenerationStats, generate


def _prompt_sets(prompts, tokenizer) -> dict[str, list[list[int]]]:
    """{domain: token ids}: a mapping of domain -> prompts, or one list (domain "prompts"); text is encoded."""
    sets = prompts if isinstance(prompts, Mapping) else {"prompts": prompts}
    out = {}
    for name, items in sets.items():
        ids = []
        for p in items:
            if isinstance(p, str):
                if tokenizer is None:
                    raise ValueError("text prompts need the target's tokenizer, and it has none: pass token ids")
                p = tokenizer(p)["input_ids"]
            ids.append(list(p))
        out[str(name)] = ids
    return out


def measure_speculative(target: Any, draft: Any, prompts, draft_tokens: Sequence[int] = (2, 4),
                        max_new_tokens: int = 48, repeats: int = 2, max_prompt_tokens: int = 256,
                        progress: bool = True) -> pd.DataFrame:
    """One row per (round, domain, prompt, mode): ``mode`` "target" (alone) or "draft k=K"; decode tokens, seconds
    and tok/s, ``speedup`` (tok/s over the same round's and prompt's target-alone row), ``same_tokens`` (greedy
    output equal to the target's), and for draft rows ``acceptance``, ``tokens_per_target_forward``, ``reached_j``
    and ``accepted_j`` per draft position j. ``prompts``: {domain: prompts} or a list; prompts are cut to their
    last ``max_prompt_tokens`` tokens. No stop token: every run decodes ``max_new_tokens``."""
    sets = _prompt_sets(prompts, getattr(target, "tokenizer", None))
    jobs = [(r, d, i, ids[-max_prompt_tokens:]) for r in range(repeats) for d, items in sets.items()
            for i, ids in enumerate(items)]
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * (1 + len(draft_tokens)), desc="speculative", unit="run")
    try:
        for rnd, domain, i, ids in jobs:
            base = dict(round=rnd, domain=domain, prompt=i, prompt_tokens=len(ids))
            stats = GenerationStats()
            want = list(generate(target, ids, max_new_tokens, stats=stats, stop_tokens=[]))
            alone = len(stats.decode_token_seconds) / stats.decode_seconds
            rows.append({**base, "mode": "target", "draft_tokens": 0, "decode_tokens": len(stats.decode_token_seconds),
                         "decode_seconds": stats.decode_seconds, "decode_tok_s": alone, "speedup": 1.0,
                         "same_tokens": True})
            if bar is not None:
                bar.update()
            for k in draft_tokens:
                stats = GenerationStats()
                got = list(generate(target, ids, max_new_tokens, stats=stats, stop_tokens=[], draft=draft,
                                    draft_tokens=k))
                spec, tok_s = stats.speculative, len(stats.decode_token_seconds) / stats.decode_seconds
                row = {**base, "mode": f"draft k={k}", "draft_tokens": k, "decode_tokens": spec.decode_tokens,
                       "decode_seconds": stats.decode_seconds, "decode_tok_s": tok_s, "speedup": tok_s / alone,
                       "same_tokens": got == want, "acceptance": spec.acceptance_rate,
                       "tokens_per_target_forward": spec.tokens_per_target_forward,
                       "target_forwards": spec.target_forwards, "draft_forwards": spec.draft_forwards}
                for j, (r, a) in enumerate(zip(spec.reached, spec.accepted), 1):
                    row[f"reached_{j}"], row[f"accepted_{j}"] = r, a
                rows.append(row)
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows)


def speculative_summary(df: pd.DataFrame, by: Sequence[str] = ("mode",)) -> pd.DataFrame:
    """Per ``by`` group of :func:`measure_speculative`'s rows: median decode tok/s, median speed-up over the target
    alone, acceptance (kept over checked draft tokens, pooled), tokens per target forward, and ``same_tokens``: the
    share of runs whose greedy output equalled the target alone's."""
    by = list(by)
    out = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row.update(runs=len(g), decode_tok_s=g["decode_tok_s"].median(), speedup=g["speedup"].median(),
                   same_tokens=float(g["same_tokens"].mean()))
        reached = [c for c in g.columns if c.startswith("reached_")]
        if reached and g["draft_tokens"].max() > 0:
            checked = g[reached].sum().sum()
            kept = g[[c.replace("reached", "accepted") for c in reached]].sum().sum()
            row["acceptance"] = kept / checked if checked else float("nan")
            row["tokens_per_target_forward"] = g["decode_tokens"].sum() / g["target_forwards"].sum()
        out.append(row)
    return pd.DataFrame(out)


def acceptance_by_position(df: pd.DataFrame, by: Sequence[str] = ("mode",)) -> pd.DataFrame:
    """Tidy: one row per ``by`` group and draft position: reached, accepted, acceptance = P(kept | reached)."""
    rows = []
    draft_rows = df[df["draft_tokens"] > 0]
    for key, g in draft_rows.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for j in range(1, int(g["draft_tokens"].max()) + 1):
            r, a = g[f"reached_{j}"].sum(), g[f"accepted_{j}"].sum()
            rows.append({**dict(zip(by, key)), "position": j, "reached": int(r), "accepted": int(a),
                         "acceptance": a / r if r else float("nan")})
    return pd.DataFrame(rows)
