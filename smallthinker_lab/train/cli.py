"""``smallthinker-lab train``: train a SmallThinker config from scratch on prepared token files."""

from __future__ import annotations

import argparse
import json
import math
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a SmallThinker config from scratch on token files",
        description="Train a SmallThinker config from scratch (AdamW 0.9/0.95, wd 0.1, cosine to 10%, "
                    "CE + load-balance loss). Writes train_log.jsonl, eval_log.jsonl, checkpoint.pt and the final "
                    "model (Hugging Face layout) under --out; reruns resume from the checkpoint.")
    p.add_argument("--config", default="smallthinker-tiny-wide", help="preset name or config.json / checkpoint folder")
    p.add_argument("--data", default="data/corpus/tokens", help="folder of {domain}.bin / {domain}.val.bin")
    p.add_argument("--out", default="runs/tiny", help="output folder")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (the schedule's length)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (on matrices; not on norms and the embedding)")
    p.add_argument("--balance-group", default="batch",
                   help="sequences per load-balance group (the DP-group loss over groups of g sequences), 'batch' "
                        "(one group: the whole batch) or 'micro-batch' (the conventional loss per micro-batch of "
                        "--microbatch-size sequences)")
    p.add_argument("--balance-coef", type=float, default=0.01, help="weight of the load-balance loss")
    p.add_argument("--microbatch-size", type=int, default=1,
                   help="sequences per micro-batch of --balance-group micro-batch")
    p.add_argument("--z-loss-coef", type=float, default=0.0, help="weight of the router z-loss (0: off)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    p.add_argument("--domain-weights", default="balanced",
                   help="balanced, proportional, or JSON like '{\"math\": 2, \"code\": 1}'")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: at the end only)")
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows per domain")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log flushes")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (falls back to eager, with a warning, if compiling fails)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s that MFU is measured against (default: the GPU's dense bf16 spec, e.g. "
                        "989.4 for an H200; none on a CPU)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) after this many steps")
    p.add_argument("--max-time", type=float, default=None, help="stop, checkpoint and export after this many s")
    p.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied into OUT/model")
    p.add_argument("--export-dtype", default="bfloat16", help="dtype of the exported model.safetensors")
    p.add_argument("--no-export", action="store_true", help="do not write OUT/model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or validation prints")
    p.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _group(value: str) -> int | str:
    if value in ("batch", "micro-batch"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--balance-group {value!r} is not a number of sequences, 'batch' or 'micro-batch'") from None


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    weights = args.domain_weights
    if weights not in ("balanced", "proportional"):
        try:
            weights = json.loads(weights)
        except json.JSONDecodeError:
            weights = None
        if not isinstance(weights, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in weights.values()):
            raise ValueError(f"--domain-weights {args.domain_weights!r} is not 'balanced', 'proportional' or a JSON "
                             f"object of weights >= 0 like '{{\"math\": 2, \"code\": 1}}'")
    summary = train(
        args.config, args.data, args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        balance_group=_group(args.balance_group), balance_coef=args.balance_coef,
        microbatch_size=args.microbatch_size, z_loss_coef=args.z_loss_coef, grad_clip=args.grad_clip,
        device=args.device, seed=args.seed, domain_weights=weights, eval_every=args.eval_every,
        eval_windows=args.eval_windows, ckpt_every=args.ckpt_every, log_every=args.log_every, resume=args.resume,
        compile=args.compile, peak_tflops=args.peak_tflops, stop_at=args.stop_at, max_time_s=args.max_time,
        tokenizer_dir=args.tokenizer,
        export=not args.no_export, export_dtype=args.export_dtype, progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m smallthinker_lab.train.cli train ...``: the train subcommand alone (errors as the main CLI)."""
    from ..cli import sub_main

    return sub_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
