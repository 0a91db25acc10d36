"""Fit the sparse LM-head predictor on the default model's real hidden states and report its recall.

No public checkpoint ships a predictor, so this measures what the fitting routine gives on the trained default
model: final hidden states (after the final norm) of held-out validation tokens of every domain, fitted on one half
and scored on the other, for a few ranks. Writes benchmarks/results/lm_head_recall.{json,md}.

    python -m benchmarks.lm_head_recall [--tokens-per-domain 4096] [--ranks 16 32 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import smallthinker_lab as sl
from benchmarks import ceilings
from smallthinker_lab.engine.lm_head import fit_predictor, predictor_recall

DOMAINS = ("math", "code", "en", "zh")


@torch.inference_mode()
def hidden_states(model, tokens: np.ndarray, window: int = 256) -> torch.Tensor:
    """Final-norm hidden states (N, H) of consecutive windows of a token stream."""
    out = []
    for s in range(0, len(tokens) - window + 1, window):
        ids = torch.as_tensor(tokens[s:s + window].astype(np.int64))[None]
        h, _ = model.model(ids, torch.arange(window))
        out.append(h[0].float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="data/corpus/tokens")
    ap.add_argument("--tokens-per-domain", type=int, default=4096)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = sl.load_model(args.model, dtype=torch.float32)
    states = []
    for d in DOMAINS:
        toks = np.memmap(Path(args.data) / f"{d}.val.bin", dtype=np.uint16, mode="r")[:args.tokens_per_domain]
        states.append(hidden_states(model, np.asarray(toks)))
    h = torch.cat(states)
    perm = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(0))
    fit, test = h[perm[: len(perm) // 2]], h[perm[len(perm) // 2:]]
    w = model.lm_head.weight.float()
    rows = []
    for r in args.ranks:
        pred = fit_predictor(fit, w, rank=r, steps=args.steps, seed=0)
        rec = predictor_recall(pred, test, w)
        rows.append({"rank": r, **rec})
        print(r, rec)
    result = {"machine": ceilings.machine_info(), "model": str(args.model), "vocab": w.shape[0],
              "fit_states": fit.shape[0], "test_states": test.shape[0], "domains": DOMAINS, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_head_recall.json").write_text(json.dumps(result, indent=1))
    lines = ["# Sparse LM head: predictor recall on the default model's held-out hidden states", "",
             f"{fit.shape[0]} states fitted, {test.shape[0]} scored (validation tokens of {', '.join(DOMAINS)}); "
             f"vocabulary {w.shape[0]}.", "",
             "| rank | " + " | ".join(k for k in rows[0] if k != "rank") + " |",
             "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    (out / "lm_head_recall.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
