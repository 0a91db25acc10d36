"""Train a SmallThinker from scratch: the paper's recipe at small scale, with checkpoint and exact resume.

Recipe (technical report section 3): AdamW betas (0.9, 0.95), weight decay 0.1, linear warmup then cosine decay
to 10% of the peak learning rate; loss = cross-entropy + coef * load-balance loss over groups of ``balance_group``
sequences (``losses.py``: g sequences, the whole batch, or the conventional per-micro-batch loss) [+ z-loss, off by
default]. Weight decay applies to the matrices (attention, router, experts) and not to norms or the embedding
(tied to the LM head in the tiny presets). bf16 autocast on CUDA (fp32 master weights, fused AdamW), plain fp32
on CPU (foreach AdamW).

Output folder::

    train_log.jsonl  one JSON object per step: step, tokens, lr, loss, ce, balance (the optimised one),
                     bal_sequence and bal_batch (the statistic per sequence and over the whole batch, whichever is
                     optimised), z_loss, load_entropy (mean over layers of the entropy of the batch's expert-load
                     fractions / log E), grad_norm (before clipping), tokens_per_s and mfu (over the steps since
                     the last flush; mfu null where no peak is known, ``flops.py``), elapsed_s, ce_{domain} (train
                     CE of the step's windows of that domain; null where the step has none)
    eval_log.jsonl   step, tokens, domain, ce, ppl on the {domain}.val.bin files
    checkpoint.pt    model + optimizer + step + RNG states + args + config as tensors and plain containers
                     (loaded with weights_only=True: no code runs); ``resume=True`` continues from it
    args.json, summary.json
    model/           the final model in the HF layout (config.json, model.safetensors in ``export_dtype``),
                     plus the tokenizer files of ``tokenizer_dir``

Determinism: the batch of step s is a function of (seed, s), the weights are initialised from ``seed``, the
schedule is a function of the step, and nothing else draws random numbers; on CPU a run is bit-identical for a
seed, and a run stopped (``stop_at``) and resumed reproduces the uninterrupted run's losses exactly.

Speed: training swaps in two forwards that compute the same function as the model's (tested equal).
On CUDA the MoE runs as three dense matmuls over all experts' concatenated weights, with the top-k weights
scattered into an (N, E) matrix: non-routed experts get weight 0, so outputs and gradients equal the sparse
loop's, and for E*F = 2048 this beats looping over 32 experts with gathers, index_add and host syncs (on CPU the
model's sparse loop is faster and is kept). Attention repeats the KV heads so that global layers run as plain
causal SDPA (flash kernels on CUDA). Per-step statistics stay on the device and are fetched every ``log_every``
steps, so the host does not wait for the GPU each step.
Shape letters: B sequences, T tokens, N = B*T, H hidden, E experts, F expert ffn size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import SmallThinkerConfig
from ..model.layers import RMSNorm
from ..model.model import SmallThinkerForCausalLM
from .checkpoint import (  # noqa: F401  (re-exported: the checkpoint API lived here)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    TOKENIZER_FILES,
    _plain,
    export_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .data import WindowSampler, validation_sets
from .flops import flops_per_token, peak_tflops
from .forwards import dense_moe_forward, train_attention_forward, training_forwards  # noqa: F401
from .losses import (
    balance_loss,
    balance_statistic,
    cross_entropy_per_sequence,
    group_sequences,
    load_entropy,
    router_z_loss,
)

TRAIN_COLUMNS = ["step", "tokens", "lr", "loss", "ce", "balance", "bal_sequence", "bal_batch", "z_loss",
                 "load_entropy", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"]
EVAL_COLUMNS = ["step", "tokens", "domain", "ce", "ppl"]
# arguments that may change between a run and its resumption; the others must match the checkpoint
_RESUMABLE = {"stop_at", "max_time_s", "eval_every", "eval_windows", "ckpt_every", "log_every", "progress",
              "tokenizer_dir", "export_dtype", "export", "resume", "compile", "device", "fast", "dense_moe",
              "peak_tflops"}


@dataclass
class TrainArgs:
    steps: int = 1000
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    balance_group: int | str = "batch"  # sequences per balance group, "batch" (all) or "micro-batch"
    balance_coef: float = 0.01
    microbatch_size: int = 1  # sequences per micro-batch of the "micro-batch" loss (the conventional one)
    z_loss_coef: float = 0.0
    grad_clip: float = 1.0
    device: str = "cpu"
    seed: int = 0
    domain_weights: str | dict = "balanced"
    eval_every: int = 0  # 0: only at the end
    eval_windows: int = 32  # validation windows of seq_len per domain
    ckpt_every: int = 0  # 0: only at the end (and at stop_at / max_time_s)
    log_every: int = 10  # steps between CSV flushes / progress updates (one host sync each)
    resume: bool = True
    compile: bool = False  # torch.compile the model; falls back to eager (with a warning) if compiling fails
    peak_tflops: float | None = None  # the peak MFU is measured against; None: the GPU's dense bf16 spec
    fast: bool = True  # the training-only attention forward, and the dense MoE where ``dense_moe`` says
    dense_moe: bool | None = None  # None: dense MoE on CUDA, the model's sparse expert loop on CPU (faster there)
    stop_at: int | None = None  # stop after this many steps (checkpointed), the schedule still spans ``steps``
    max_time_s: float | None = None  # stop, checkpoint and export when this much wall time has passed
    tokenizer_dir: str | None = None
    export: bool = True
    export_dtype: str = "bfloat16"
    progress: bool = True
    domains: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be >= 0 and min_lr_ratio in [0, 1]")
        if isinstance(self.balance_group, str) and self.balance_group.isdigit():
            self.balance_group = int(self.balance_group)
        group_sequences(self.balance_group, self.batch_size, self.microbatch_size)  # raises naming a bad value
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup to ``peak`` over ``warmup`` steps, then cosine
    decay reaching ``min_ratio * peak`` at the last step ``total - 1``. Warmup values do not depend on ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------ setup helpers
def resolve_config(config: SmallThinkerConfig | str | os.PathLike) -> SmallThinkerConfig:
    """A config object, a preset name, or a config.json path / checkpoint folder."""
    if isinstance(config, SmallThinkerConfig):
        return config
    p = Path(config)
    if p.exists():
        return SmallThinkerConfig.from_json(p)
    return SmallThinkerConfig.from_name(str(config))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms and the (tied) embedding."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, (RMSNorm, torch.nn.Embedding))}
    decay, other, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (other if id(p) in no_decay or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (train_log.jsonl, eval_log.jsonl); [] if the file does not exist.
    Values that were NaN are null."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write_log(path: Path, rows: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n")


def _truncate_log(path: Path, keep) -> None:
    """Rewrite a log keeping the records for which keep(record) is true (records after a checkpoint are dropped)."""
    _write_log(path, [r for r in read_log(path) if keep(r)], "w")


@torch.no_grad()
def evaluate(model: SmallThinkerForCausalLM, val: dict[str, torch.Tensor], batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Mean token cross-entropy per domain over its validation windows (N, T + 1)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for domain, windows in val.items():
            total, count = 0.0, 0
            for i in range(0, len(windows), batch_size):
                x = windows[i: i + batch_size].to(device)
                with _autocast(device):
                    logits = model(x[:, :-1]).logits
                ce = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                total += ce.item()
                count += x[:, 1:].numel()
            out[domain] = total / count
    finally:
        model.train(was_training)
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_vocab(sampler: WindowSampler, vocab_size: int) -> None:
    for d, a in zip(sampler.domains, sampler.arrays):
        top = int(np.max(a))
        if top >= vocab_size:
            raise ValueError(f"domain {d!r} holds token id {top}, outside the model's vocab_size {vocab_size}")


# ------------------------------------------------------------------ the training loop
def train(config: SmallThinkerConfig | str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
          **kwargs) -> dict:
    """Train ``config`` (object, preset name or config.json) on the token files of ``data_dir`` into ``out_dir``.

    Keyword arguments are the fields of :class:`TrainArgs`. Returns the summary (also in summary.json):
    steps done, tokens seen, wall time, last train losses, last validation CE per domain, export folder.
    """
    args = TrainArgs(**kwargs)
    cfg = resolve_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {args.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")

    sampler = WindowSampler(data_dir, args.seq_len, args.batch_size, args.seed, args.domain_weights, args.domains)
    _check_vocab(sampler, cfg.vocab_size)
    val = validation_sets(data_dir, sampler.domains, args.seq_len, args.eval_windows)

    model = SmallThinkerForCausalLM(cfg).init_weights(seed=args.seed).to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=args.betas, eps=args.eps,
                            fused=fused or None, foreach=None if fused else True)

    ckpt_path, log_path, eval_path = out / "checkpoint.pt", out / "train_log.jsonl", out / "eval_log.jsonl"
    start = 0
    if args.resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, model, opt, args, cfg, device)
        _truncate_log(log_path, lambda r: int(r["step"]) < start)
        _truncate_log(eval_path, lambda r: int(r["step"]) <= start)
    else:
        for p in (log_path, eval_path):
            p.unlink(missing_ok=True)
    (out / "args.json").write_text(json.dumps({"config": cfg.to_dict(), "data_dir": str(data_dir), **asdict(args)},
                                              indent=2, default=str) + "\n")

    stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    k, columns = cfg.top_k, _train_columns(sampler)
    group = group_sequences(args.balance_group, args.batch_size, args.microbatch_size)
    tokens_per_step = args.batch_size * args.seq_len
    flops = flops_per_token(cfg, args.seq_len)
    peak, peak_source = peak_tflops(_device_name(device), args.peak_tflops)
    dense = args.dense_moe if args.dense_moe is not None else device.type == "cuda"
    D = len(sampler.domains)
    compiled_ok = None if args.compile else False

    def step_fn(fwd, x, dom):
        """Forward, losses, backward: the per-step statistics (on the device) and the gradient norm."""
        with _autocast(device):
            output = fwd(x[:, :-1], output_router_logits=True)
        router_logits = [r.view(x.shape[0], -1, r.shape[-1]) for r in output.router_logits]  # L x (B, T, E)
        ce_seq = cross_entropy_per_sequence(output.logits, x[:, 1:])  # (B,)
        ce = ce_seq.mean()
        bal = balance_loss(router_logits, k, group)
        loss = ce + args.balance_coef * bal
        z = router_z_loss(router_logits) if args.z_loss_coef > 0 else torch.zeros((), device=device)
        if args.z_loss_coef > 0:
            loss = loss + args.z_loss_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            bal_seq = torch.stack([balance_statistic(lg, k, 1).mean() for lg in router_logits]).mean()
            bal_batch = torch.stack([balance_statistic(lg, k, None).mean() for lg in router_logits]).mean()
            dom_sum = torch.zeros(D, device=device).index_add_(0, dom, ce_seq.detach())
            dom_n = torch.zeros(D, device=device).index_add_(0, dom, torch.ones_like(ce_seq))
            return torch.stack([loss.detach(), ce.detach(), bal.detach(), bal_seq, bal_batch, z.detach(),
                                load_entropy(router_logits, k).mean()]).float(), dom_sum / dom_n

    with training_forwards(model, dense) if args.fast else contextlib.nullcontext():
        fwd = torch.compile(model) if args.compile else model
        step, t_start, last_eval = start, time.perf_counter(), None
        pbar = _progress(args, start, stop)
        pending: list[torch.Tensor] = []
        pending_lr: list[float] = []
        t_flush, steps_since = time.perf_counter(), 0
        stopped_by_time = False
        for step in range(start, stop):
            lr = lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = sampler.batch(step)
            x, dom = batch.tokens, batch.domains
            if device.type == "cuda":
                x, dom = x.pin_memory(), dom.pin_memory()
            x = x.to(device, non_blocking=True)  # (B, T + 1)
            dom = dom.to(device, non_blocking=True)  # (B,)
            if compiled_ok is None:  # the first compiled step: compile errors surface here; fall back to eager
                try:
                    stats, dom_ce = step_fn(fwd, x, dom)
                    compiled_ok = True
                except Exception as e:  # noqa: BLE001 - any compiler failure; the eager model is the reference
                    print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"training eagerly", file=sys.stderr, flush=True)
                    compiled_ok, fwd = False, model
                    stats, dom_ce = step_fn(fwd, x, dom)
            else:
                stats, dom_ce = step_fn(fwd, x, dom)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            pending.append(torch.cat([stats, gnorm.float().reshape(1), dom_ce]))  # nan: no window of a domain
            pending_lr.append(lr)
            steps_since += 1
            done = step + 1
            time_up = args.max_time_s is not None and time.perf_counter() - t_start > args.max_time_s
            if done % args.log_every == 0 or done == stop or time_up:
                vals = torch.stack(pending).cpu().tolist()  # one host sync per flush
                now = time.perf_counter()
                tps = steps_since * tokens_per_step / (now - t_flush)
                mfu = tps * flops["total"] / (peak * 1e12) if peak else None
                rows = [_row(done - len(vals) + i, v, lr_, tps, mfu, now - t_start, tokens_per_step, sampler.domains)
                        for i, (v, lr_) in enumerate(zip(vals, pending_lr))]
                _write_log(log_path, rows, "a")
                pending, pending_lr, t_flush, steps_since = [], [], now, 0
                if pbar is not None:
                    pbar.update(len(rows))
                    r = rows[-1]
                    post = {"loss": f"{r['loss']:.3f}", "bal": f"{r['balance']:.3f}", "tok_s": f"{tps:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{mfu:.1%}"
                    pbar.set_postfix(post, refresh=False)
            if args.eval_every and done % args.eval_every == 0 and done != stop and val:
                last_eval = _eval_and_log(model, val, args, device, done, tokens_per_step, eval_path)
            if args.ckpt_every and done % args.ckpt_every == 0 and done != stop:
                _save_checkpoint(ckpt_path, model, opt, done, args, cfg, device)
            if time_up:
                stopped_by_time = True
                break
        done = step + 1 if stop > start else start
        if pbar is not None:
            pbar.close()
        wall = time.perf_counter() - t_start
        if stop > start:
            _save_checkpoint(ckpt_path, model, opt, done, args, cfg, device)
        if val:
            last_eval = _eval_and_log(model, val, args, device, done, tokens_per_step, eval_path)
    export_dir = None
    if args.export and (done >= args.steps or stopped_by_time):
        export_dir = export_model(model, out / "model", args.export_dtype, args.tokenizer_dir)
    rows = read_log(log_path)
    tps_run = (done - start) * tokens_per_step / wall if done > start else None
    summary = {
        "steps_done": done, "steps_planned": args.steps, "stopped_by_time": stopped_by_time,
        "tokens_seen": done * tokens_per_step, "wall_s_this_run": round(wall, 2),
        "tokens_per_s_this_run": round(tps_run, 1) if tps_run else None,
        "flops_per_token": flops, "peak_tflops": peak, "peak_source": peak_source,
        "mfu_this_run": tps_run * flops["total"] / (peak * 1e12) if tps_run and peak else None,
        "compiled": bool(compiled_ok),
        "last_train": {c: rows[-1][c] for c in columns[3:] if c not in ("tokens_per_s", "mfu", "elapsed_s")}
        if rows else None,
        "val_ce": last_eval, "device": _device_name(device), "export_dir": str(export_dir) if export_dir else None,
        "num_parameters": model.num_parameters(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train_columns(sampler: WindowSampler) -> list[str]:
    return TRAIN_COLUMNS + [f"ce_{d}" for d in sampler.domains]


def _row(step: int, v: list[float], lr: float, tps: float, mfu: float | None, elapsed: float, tokens_per_step: int,
         domains: list[str]) -> dict:
    loss, ce, bal, bal_seq, bal_batch, z, ent, gnorm = v[:8]
    row = {"step": step, "tokens": (step + 1) * tokens_per_step, "lr": lr, "loss": loss, "ce": ce,
           "balance": bal, "bal_sequence": bal_seq, "bal_batch": bal_batch, "z_loss": z, "load_entropy": ent,
           "grad_norm": gnorm, "tokens_per_s": round(tps, 1), "mfu": mfu, "elapsed_s": round(elapsed, 3)}
    row.update({f"ce_{d}": c for d, c in zip(domains, v[8:])})
    return row


def _progress(args: TrainArgs, start: int, stop: int):
    if not args.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


def _eval_and_log(model, val, args: TrainArgs, device, step: int, tokens_per_step: int, path: Path) -> dict:
    res = evaluate(model, val, args.batch_size, device)
    _write_log(path, [{"step": step, "tokens": step * tokens_per_step, "domain": d, "ce": c,
                       "ppl": math.exp(min(c, 50.0))} for d, c in res.items()], "a")
    if args.progress:
        print(f"step {step}: val CE " + ", ".join(f"{d} {c:.3f}" for d, c in res.items()), flush=True)
    return res


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _save_checkpoint(path: Path, model, opt, step: int, args: TrainArgs, cfg: SmallThinkerConfig, device) -> None:
    save_checkpoint(path, model, opt, step, args, cfg, device)


def _load_checkpoint(path: Path, model, opt, args: TrainArgs, cfg: SmallThinkerConfig, device) -> int:
    return load_checkpoint(path, model, opt, args, cfg, device, _RESUMABLE)
