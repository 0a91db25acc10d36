"""Train a SmallThinker from scratch: the paper's recipe at small scale, with checkpoint and exact resume.

Recipe (technical report section 3): AdamW betas (0.9, 0.95), weight decay 0.1, linear warmup then cosine decay
to 10% of the peak learning rate; loss = cross-entropy + coef * load-balance loss (``losses.py``: the DP-group
global loss or the conventional micro-batch loss) [+ z-loss]. Weight decay applies to the matrices (attention,
router, experts) and not to norms or the embedding (tied to the LM head in the tiny preset).
bf16 autocast on CUDA (fp32 master weights), plain fp32 on CPU.

Output folder::

    train_log.csv    one row per step: step, tokens, lr, loss, ce, balance (the optimised one), bal_microbatch,
                     bal_global (both statistics, whichever is optimised), z_loss, load_entropy (mean over layers
                     of the entropy of the batch's expert-load fractions / log E), grad_norm (before clipping),
                     tokens_per_s, elapsed_s, ce_{domain} (train CE of the step's windows of that domain)
    eval_log.csv     step, tokens, domain, ce, ppl on the {domain}.val.bin files
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
import csv
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.atomic import pid_alive
from ..model.checkpoint import CheckpointError
from ..model.config import SmallThinkerConfig
from ..model.layers import RMSNorm
from ..model.model import SmallThinkerForCausalLM
from .data import WindowSampler, validation_sets
from .forwards import dense_moe_forward, train_attention_forward, training_forwards  # noqa: F401
from .losses import (
    cross_entropy_per_sequence,
    global_balance_loss,
    load_entropy,
    microbatch_balance_loss,
    router_z_loss,
)

TRAIN_COLUMNS = ["step", "tokens", "lr", "loss", "ce", "balance", "bal_microbatch", "bal_global", "z_loss",
                 "load_entropy", "grad_norm", "tokens_per_s", "elapsed_s"]
EVAL_COLUMNS = ["step", "tokens", "domain", "ce", "ppl"]
# arguments that may change between a run and its resumption; the others must match the checkpoint
_RESUMABLE = {"stop_at", "max_time_s", "eval_every", "eval_windows", "ckpt_every", "log_every", "progress",
              "tokenizer_dir", "export_dtype", "export", "resume", "compile", "device", "fast", "dense_moe"}


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
    balance: str = "global"  # "global" | "microbatch"
    balance_coef: float = 0.01
    group_size: int | None = None  # sequences per balance group (global); None = the whole batch
    microbatch_size: int = 1  # sequences per micro-batch (microbatch balance)
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
    compile: bool = False
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
        if self.balance not in ("global", "microbatch"):
            raise ValueError(f"balance must be 'global' or 'microbatch', got {self.balance!r}")
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be >= 0 and min_lr_ratio in [0, 1]")
        for name, g in (("group_size", self.group_size), ("microbatch_size", self.microbatch_size)):
            if g is not None and (g < 1 or self.batch_size % g):
                raise ValueError(f"{name}={g} must divide batch_size={self.batch_size}")


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


def _csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _truncate_csv(path: Path, columns: list[str], keep) -> None:
    """Rewrite a log keeping the rows for which keep(row) is true (rows after a checkpoint are dropped)."""
    rows = [r for r in _csv_rows(path) if keep(r)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def _append_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerows(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


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

    ckpt_path, log_path, eval_path = out / "checkpoint.pt", out / "train_log.csv", out / "eval_log.csv"
    start = 0
    if args.resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, model, opt, args, cfg, device)
        _truncate_csv(log_path, _train_columns(sampler), lambda r: int(r["step"]) < start)
        _truncate_csv(eval_path, EVAL_COLUMNS, lambda r: int(r["step"]) <= start)
    else:
        for p in (log_path, eval_path):
            p.unlink(missing_ok=True)
    (out / "args.json").write_text(json.dumps({"config": cfg.to_dict(), "data_dir": str(data_dir), **asdict(args)},
                                              indent=2, default=str) + "\n")

    stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    k, columns = cfg.top_k, _train_columns(sampler)
    tokens_per_step = args.batch_size * args.seq_len
    dense = args.dense_moe if args.dense_moe is not None else device.type == "cuda"
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
            with _autocast(device):
                output = fwd(x[:, :-1], output_router_logits=True)
            logits = output.logits  # (B, T, V)
            router_logits = [r.view(x.shape[0], -1, r.shape[-1]) for r in output.router_logits]  # L x (B, T, E)
            ce_seq = cross_entropy_per_sequence(logits, x[:, 1:])  # (B,)
            ce = ce_seq.mean()
            if args.balance == "global":
                bal = global_balance_loss(router_logits, k, args.group_size)
                with torch.no_grad():
                    other = microbatch_balance_loss(router_logits, k, args.microbatch_size)
                bal_mb, bal_g = other, bal.detach()
            else:
                bal = microbatch_balance_loss(router_logits, k, args.microbatch_size)
                with torch.no_grad():
                    other = global_balance_loss(router_logits, k, args.group_size)
                bal_mb, bal_g = bal.detach(), other
            loss = ce + args.balance_coef * bal
            z = router_z_loss(router_logits) if args.z_loss_coef > 0 else torch.zeros((), device=device)
            if args.z_loss_coef > 0:
                loss = loss + args.z_loss_coef * z
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            with torch.no_grad():
                D = len(sampler.domains)
                dom_sum = torch.zeros(D, device=device).index_add_(0, dom, ce_seq.detach())
                dom_n = torch.zeros(D, device=device).index_add_(0, dom, torch.ones_like(ce_seq))
                pending.append(torch.cat([
                    torch.stack([loss.detach(), ce.detach(), bal.detach(), bal_mb, bal_g, z.detach(),
                                 load_entropy(router_logits, k).mean(), gnorm.float()]).float(),
                    dom_sum / dom_n,  # nan where the step has no window of that domain
                ]))
                pending_lr.append(lr)
            steps_since += 1
            done = step + 1
            time_up = args.max_time_s is not None and time.perf_counter() - t_start > args.max_time_s
            if done % args.log_every == 0 or done == stop or time_up:
                vals = torch.stack(pending).cpu().tolist()  # one host sync per flush
                now = time.perf_counter()
                tps = steps_since * tokens_per_step / (now - t_flush)
                rows = [_row(done - len(vals) + i, v, lr_, tps, now - t_start, tokens_per_step, sampler.domains)
                        for i, (v, lr_) in enumerate(zip(vals, pending_lr))]
                _append_csv(log_path, columns, rows)
                pending, pending_lr, t_flush, steps_since = [], [], now, 0
                if pbar is not None:
                    pbar.update(len(rows))
                    r = rows[-1]
                    pbar.set_postfix(loss=f"{r['loss']:.3f}", bal=f"{r['balance']:.3f}", tok_s=f"{tps:,.0f}",
                                     refresh=False)
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
    rows = _csv_rows(log_path)
    summary = {
        "steps_done": done, "steps_planned": args.steps, "stopped_by_time": stopped_by_time,
        "tokens_seen": done * tokens_per_step, "wall_s_this_run": round(wall, 2),
        "tokens_per_s_this_run": round((done - start) * tokens_per_step / wall, 1) if done > start else None,
        "last_train": {c: float(rows[-1][c]) for c in columns[3:] if c not in ("tokens_per_s", "elapsed_s")}
        if rows else None,
        "val_ce": last_eval, "device": _device_name(device), "export_dir": str(export_dir) if export_dir else None,
        "num_parameters": model.num_parameters(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train_columns(sampler: WindowSampler) -> list[str]:
    return TRAIN_COLUMNS + [f"ce_{d}" for d in sampler.domains]


def _row(step: int, v: list[float], lr: float, tps: float, elapsed: float, tokens_per_step: int,
         domains: list[str]) -> dict:
    loss, ce, bal, bal_mb, bal_g, z, ent, gnorm = v[:8]
    row = {"step": step, "tokens": (step + 1) * tokens_per_step, "lr": lr, "loss": loss, "ce": ce,
           "balance": bal, "bal_microbatch": bal_mb, "bal_global": bal_g, "z_loss": z, "load_entropy": ent,
           "grad_norm": gnorm, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3)}
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
    _append_csv(path, EVAL_COLUMNS, [{"step": step, "tokens": step * tokens_per_step, "domain": d, "ce": c,
                                      "ppl": math.exp(min(c, 50.0))} for d, c in res.items()])
    if args.progress:
        print(f"step {step}: val CE " + ", ".join(f"{d} {c:.3f}" for d, c in res.items()), flush=True)
    return res


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------ checkpoints and export
# checkpoint.pt is a torch zip archive of plain containers (dict, list, tuple, str, int, float, bool, None) and
# tensors only, read back with ``torch.load(weights_only=True)``: loading it runs no code. Anything else in that
# file (a pickle of other objects, the pickled numpy RNG state of older versions) is refused, never unpickled.
CHECKPOINT_FORMAT = "smallthinker-lab train state"
CHECKPOINT_VERSION = 2


def _plain(obj):
    """A JSON round trip: what the checkpoint stores of args and config is plain data (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def _rng_state(device) -> dict:
    """Every RNG state the run may depend on, as tensors and plain containers."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {"kind": str(kind), "key": [int(v) for v in key], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def _set_rng_state(rng: dict, device, path: Path) -> None:
    try:
        torch.set_rng_state(rng["torch"].cpu())
        n = rng["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
        py = rng["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))
        if rng.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path}: the stored RNG state is malformed ({type(e).__name__}: {e})") from None


def _save_checkpoint(path: Path, model, opt, step: int, args: TrainArgs, cfg: SmallThinkerConfig, device) -> None:
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "step": int(step), "model": model.state_dict(), "optimizer": opt.state_dict(), "args": _plain(asdict(args)),
        "config": _plain(cfg.to_dict()), "rng": _rng_state(device),
    }
    _write_atomic(path, state)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of writers of ``path`` that died (``<name>.tmp-<pid>`` of no live process, and the
    ``<stem>.pt.tmp`` of older versions)."""
    for p in path.parent.glob(f"{path.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
    path.with_suffix(".pt.tmp").unlink(missing_ok=True)


def _write_atomic(path: Path, state: dict) -> None:
    """torch.save into ``<name>.tmp-<pid>`` (created afresh, never through a symlink), fsync, then os.replace:
    a kill at any point leaves the previous checkpoint or the new one, never a partial file under ``path``."""
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_START_OVER = "delete it or pass resume=False (--no-resume) to start over"


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The training state in ``path`` (checkpoint.pt), loaded without running code.

    Raises :class:`CheckpointError` naming the file when it is not a torch zip archive, holds anything but
    tensors and plain containers (a planted pickle, or a checkpoint of an older version that pickled numpy
    objects: neither is unpickled), or lacks this format's marker and fields.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"refusing to load {path}: it is not a torch zip archive of training state (an old "
                              f"or foreign file, or a plain pickle); it was not unpickled; {_START_OVER}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers ({why}), so loading "
            f"it could run code; it is a checkpoint of an older smallthinker-lab version (pickled numpy RNG state) "
            f"or a planted file, and was not unpickled; {_START_OVER}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}; {_START_OVER}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a smallthinker-lab training checkpoint (no format marker "
                              f"{CHECKPOINT_FORMAT!r}); {_START_OVER}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has training-state version {state.get('version')!r}; this version reads "
                              f"{CHECKPOINT_VERSION}; {_START_OVER}")
    kinds = {"step": int, "model": dict, "optimizer": dict, "args": dict, "config": dict, "rng": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: field {key!r} is {type(state.get(key)).__name__}, expected "
                                  f"{kind.__name__}; {_START_OVER}")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: step {state['step']} is negative; {_START_OVER}")
    return state


def _load_checkpoint(path: Path, model, opt, args: TrainArgs, cfg: SmallThinkerConfig, device) -> int:
    state = read_checkpoint(path, map_location=device)
    saved = state["args"]
    diff = {f.name: (saved.get(f.name), getattr(args, f.name)) for f in fields(TrainArgs)
            if f.name not in _RESUMABLE and _norm(saved.get(f.name)) != _norm(getattr(args, f.name))}
    if diff:
        raise ValueError(f"cannot resume from {path}: arguments differ from the checkpoint's "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
                         + "; pass resume=False (--no-resume) to start over")
    now = _plain(cfg.to_dict())
    cdiff = {k: (state["config"].get(k), now.get(k)) for k in sorted(set(now) | set(state["config"]))
             if state["config"].get(k) != now.get(k)}
    if cdiff:
        raise ValueError(f"cannot resume from {path}: the model config differs from the checkpoint's "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in cdiff.items())
                         + "; pass resume=False (--no-resume) to start over")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: the stored model or optimizer state does not fit this model "
                              f"({type(e).__name__}: {e}); {_START_OVER}") from None
    _set_rng_state(state["rng"], device, path)
    return state["step"]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")


def export_model(model: SmallThinkerForCausalLM, folder: str | os.PathLike, dtype: str = "bfloat16",
                 tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """save_pretrained in the HF layout (weights in ``dtype``), plus the tokenizer files of ``tokenizer_dir``."""
    from ..model.checkpoint import save_pretrained

    folder = Path(folder)
    save_pretrained(model, folder, dtype=dtype)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
        if not files:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
        for f in files:
            if f.resolve() != (folder / f.name).resolve():
                shutil.copyfile(f, folder / f.name)
    return folder
