"""``python -m smallthinker_lab.quality``: measure a trained model (and a comparison model) and write its card."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from .card import findings, write_card
from .common import BASELINE_SEED
from .contamination import prompt_overlap, read_training
from .measure import QualityResult, measure, plot_figures, remeasure_phenomena


# ============================================================================================ CLI
def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smallthinker_lab.quality", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smallthinker-tiny")
    ap.add_argument("--compare", default=None, help="a second model, e.g. trained with the micro-batch balance loss")
    ap.add_argument("--out", default=None, help="folder for README.md, PNGs and CSVs (default: --model)")
    ap.add_argument("--label", default="global (DP-group)")
    ap.add_argument("--compare-label", default="micro-batch")
    ap.add_argument("--tokens", default="data/corpus/tokens")
    ap.add_argument("--prompts", default="data/prompts")
    ap.add_argument("--corpus", default="data/corpus",
                    help="training text ({domain}.jsonl) to check the prompt sets against (skipped if missing)")
    ap.add_argument("--max-tokens", type=int, default=50_000, help="tokens per validation file (0: all)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens after each profiled prompt")
    ap.add_argument("--prompt-limit", type=int, default=None, help="prompts per set (default: all)")
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for this small model on a busy machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-seed", type=int, default=BASELINE_SEED,
                    help="seed of the random initialisation measured as the sparsity baseline (chance)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the random-initialisation baseline")
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the saved quality_*.csv")
    ap.add_argument("--phenomena-only", action="store_true",
                    help="measure again only the prompt-set phenomena (routing, sparsity definitions, frequency "
                         "normalisations) and the random-init baseline; keep the saved perplexity and continuations")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)

    import warnings

    import torch
    import transformers

    out = Path(args.out or args.model)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    try:
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            if args.phenomena_only and not args.card_only:
                result = QualityResult.load(out)
                folders = {args.label: args.model, **({args.compare_label: args.compare} if args.compare else {})}
                result = remeasure_phenomena(result, folders, args.prompts,
                                             None if args.no_baseline else args.baseline_seed,
                                             not args.no_progress, log)
                for p in result.save(out):
                    log(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
            elif not args.card_only:
                result = measure(
                    args.model, args.compare, args.tokens, args.prompts, args.label, args.compare_label,
                    max_tokens=args.max_tokens or None, window=args.window, stride=args.stride,
                    batch_size=args.batch_size, new_tokens=args.new_tokens, prompt_limit=args.prompt_limit,
                    continuation_tokens=args.continuation_tokens, device=args.device,
                    baseline_seed=None if args.no_baseline else args.baseline_seed,
                    progress=not args.no_progress, log=log)
                for p in result.save(out):
                    log(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    # the figures and the card are always drawn from the saved tables, so --card-only gives the same files
    result = QualityResult.load(out)
    for p in plot_figures(result, out):
        log(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
    result.training = read_training(args.model)
    if Path(args.corpus).is_dir():  # model-independent and cheap: recomputed whenever the corpus is here
        ov = prompt_overlap(args.prompts, args.corpus, result.settings["sets"], result.settings.get("prompt_limit"))
        if len(ov):
            ov.to_csv(out / "quality_prompt_overlap.csv", index=False, float_format="%.6g")
            result = QualityResult.load(out)
            result.training = read_training(args.model)
    path = write_card(result, out)
    log(f"wrote {path}")
    for s in findings(result):
        log("- " + s)
    return 0
