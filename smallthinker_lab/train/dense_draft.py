"""Train a small dense (Qwen2-shaped) draft model for a target, on the target's token files and tokenizer.

The draft shares the target's vocabulary (it is trained on the same token ids) and, by default, starts from the
target's trained token embedding (tied to its LM head), kept frozen: the draft then only learns its few layers,
which is what a short CPU run can afford. Every layer attends over a sliding window of ``seq_len`` tokens, the
length it is trained on, so at any context length it sees what it saw in training.

Recipe: AdamW (0.9, 0.95), weight decay 0.1 on the layers' matrices, linear warmup then cosine decay to 10%,
plain cross-entropy, fp32 on a CPU or bf16 autocast on a GPU (``--device cuda``); batches from
:class:`~.data.WindowSampler` (balanced over the domains, a pure function of (seed, step)). Re-create the shipped
draft with::

    python -m smallthinker_lab.train.dense_draft --data data/corpus/tokens --out data/models/smallthinker-tiny-draft

Output folder: config.json, model.safetensors (bf16), the target's tokenizer files, and ``training/`` with
train_log.csv (step, tokens, lr, loss, grad_norm, tokens_per_s, elapsed_s), eval_log.csv (validation CE per
domain), args.json and summary.json. Shape letters: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.dense import DenseForCausalLM
from ..model.dense_config import DenseConfig
from ..resources import default_model_dir
from .data import WindowSampler, validation_sets
from .forwards import training_forwards
from .trainer import export_model, lr_at, param_groups

EMBEDDING = "model.embed_tokens.weight"


@dataclass
class DraftArgs:
    data_dir: str = "data/corpus/tokens"
    out_dir: str = "data/models/smallthinker-tiny-draft"
    target: str = "default"  # the target's folder: its tokenizer, and its embedding unless init_embedding is off
    preset: str = "smallthinker-tiny-draft"
    steps: int = 220
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    init_embedding: bool = True  # start from the target's embedding (tied LM head) ...
    freeze_embedding: bool = True  # ... and keep it fixed
    eval_windows: int = 32  # validation windows of seq_len tokens per domain
    log_every: int = 10
    device: str = "cpu"  # "cuda": bf16 autocast on the GPU, fp32 master weights

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "threads", "eval_windows", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.freeze_embedding and not self.init_embedding:
            raise ValueError("freeze_embedding=True needs init_embedding=True (a frozen random embedding learns "
                             "nothing)")


def draft_config(args: DraftArgs, target_config) -> DenseConfig:
    """The preset, with the target's vocabulary, special ids and RoPE base, and a window of ``seq_len``."""
    cfg = DenseConfig.from_name(args.preset)
    return cfg.replace(vocab_size=target_config.vocab_size, bos_token_id=target_config.bos_token_id,
                       eos_token_id=target_config.eos_token_id, pad_token_id=target_config.pad_token_id,
                       rope_theta=target_config.rope_theta, use_sliding_window=True, sliding_window=args.seq_len,
                       max_window_layers=0, layer_types=["sliding_attention"] * cfg.num_hidden_layers)


def build_draft(args: DraftArgs) -> tuple[DenseForCausalLM, Path]:
    """The untrained draft for the target of ``args`` (embedding from the target if asked) and the target folder."""
    from safetensors import safe_open

    from ..model.checkpoint import resolve_path
    from ..model.config import SmallThinkerConfig

    target_dir = resolve_path(args.target)
    tcfg = SmallThinkerConfig.from_json(target_dir / "config.json")
    cfg = draft_config(args, tcfg)
    torch.manual_seed(args.seed)
    model = DenseForCausalLM(cfg).init_weights(seed=args.seed).float()
    if args.init_embedding:
        if tcfg.hidden_size != cfg.hidden_size:
            raise ValueError(f"init_embedding needs the draft's hidden_size ({cfg.hidden_size}) to equal the "
                             f"target's ({tcfg.hidden_size}, {target_dir})")
        with safe_open(str(target_dir / "model.safetensors"), "pt") as f:
            emb = f.get_tensor(EMBEDDING).float()  # (V, H)
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(emb)
    model.model.embed_tokens.weight.requires_grad_(not args.freeze_embedding)
    return model, target_dir


@torch.no_grad()
def evaluate(model: DenseForCausalLM, val: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain over the validation windows (N, T + 1)."""
    device = next(model.parameters()).device
    model.eval()
    out = {}
    with training_forwards(model, dense_moe=False):
        for domain, windows in val.items():
            total, n = 0.0, 0
            for i in range(0, len(windows), batch_size):
                w = windows[i:i + batch_size].to(device)
                with _autocast(device):
                    logits = model(w[:, :-1]).logits.float()  # (B, T, V)
                total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
                n += w[:, 1:].numel()
            out[domain] = total / n
    model.train()
    return out


def train_draft(args: DraftArgs, progress: bool = True) -> dict:
    """Train, export to ``args.out_dir`` and return the summary (also written to training/summary.json)."""
    out = Path(args.out_dir)
    logs = out / "training"
    logs.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, target_dir = build_draft(args)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        model = model.to(device)
        sampler = WindowSampler(args.data_dir, args.seq_len, args.batch_size, seed=args.seed)
        val = validation_sets(args.data_dir, sampler.domains, args.seq_len, args.eval_windows)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in g["params"] if p.requires_grad], "weight_decay": g["weight_decay"]}
                  for g in param_groups(model, args.weight_decay)]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        (logs / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        first_eval = evaluate(model, val)
        rows, evals = [], [{"step": 0, "tokens": 0, **first_eval}]
        tokens_per_step = args.batch_size * args.seq_len
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=args.steps, desc="train draft", unit="step", dynamic_ncols=True)
        t_start = t_log = time.perf_counter()
        model.train()
        with training_forwards(model, dense_moe=False):
            for step in range(1, args.steps + 1):
                lr = lr_at(step - 1, args.lr, args.warmup, args.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                tokens = sampler.batch(step).tokens.to(device)  # (B, T + 1)
                with _autocast(device):
                    logits = model(tokens[:, :-1]).logits  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip))
                opt.step()
                if step % args.log_every == 0 or step == args.steps:
                    now = time.perf_counter()
                    n = args.log_every if step % args.log_every == 0 else step % args.log_every
                    rows.append({"step": step, "tokens": step * tokens_per_step, "lr": lr, "loss": loss.item(),
                                 "grad_norm": gnorm, "tokens_per_s": n * tokens_per_step / (now - t_log),
                                 "elapsed_s": now - t_start})
                    t_log = now
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t_start
        final = evaluate(model, val)
        evals.append({"step": args.steps, "tokens": args.steps * tokens_per_step, **final})
        _write_csv(logs / "train_log.csv", rows)
        _write_csv(logs / "eval_log.csv", evals)
        export_model(model.cpu(), out, dtype="bfloat16", tokenizer_dir=target_dir)
        last = rows[-min(len(rows), 5):]
        summary = {
            "parameters": model.num_parameters(), "trainable_parameters": sum(p.numel() for p in trainable),
            "model_safetensors_bytes": (out / "model.safetensors").stat().st_size, "steps": args.steps,
            "tokens_seen": args.steps * tokens_per_step, "train_seconds": wall,
            "tokens_per_s": args.steps * tokens_per_step / wall,
            "train_loss_last": sum(r["loss"] for r in last) / len(last),
            "val_ce_initial": first_eval, "val_ce_final": final, "threads": args.threads,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "target": _shown(target_dir),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        (logs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        torch.set_num_threads(threads)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (fp32 master weights); plain fp32 on the CPU."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (logs that do not name the machine)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})


def main(argv: list[str] | None = None) -> dict:
    defaults = DraftArgs()
    p = argparse.ArgumentParser(prog="python -m smallthinker_lab.train.dense_draft",
                                description="Train a small dense draft model for a target on its token files.")
    p.add_argument("--data", default=defaults.data_dir, help="folder of {domain}.bin / {domain}.val.bin")
    p.add_argument("--out", default=defaults.out_dir, help="output folder (the draft in the HF layout)")
    p.add_argument("--target", default=defaults.target, help=f"target checkpoint folder (default: "
                                                             f"{default_model_dir()})")
    p.add_argument("--preset", default=defaults.preset, help="DenseConfig preset of the draft's shape")
    for name in ("steps", "batch_size", "seq_len", "warmup", "seed", "threads", "eval_windows"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--train-embedding", action="store_true", help="train the embedding taken from the target")
    p.add_argument("--random-embedding", action="store_true", help="do not start from the target's embedding")
    p.add_argument("--device", default=defaults.device, help="cpu, or cuda (bf16 autocast)")
    a = p.parse_args(argv)
    args = DraftArgs(data_dir=a.data, out_dir=a.out, target=a.target, preset=a.preset, steps=a.steps,
                     batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup, seed=a.seed,
                     threads=a.threads, eval_windows=a.eval_windows, init_embedding=not a.random_embedding,
                     freeze_embedding=not (a.train_embedding or a.random_embedding), device=a.device)
    summary = train_draft(args)
    print(json.dumps({k: summary[k] for k in ("parameters", "steps", "train_seconds", "train_loss_last",
                                               "val_ce_final")}, indent=1))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
