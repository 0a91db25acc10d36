"""TRAINING.md of a trained model, written from its run's own files (nothing typed in by hand).

    python -m smallthinker_lab.train.report MODEL_DIR TRAINING_DIR [--name smallthinker-tiny] [--sweep SWEEP_MD]

MODEL_DIR holds config.json and model.safetensors; TRAINING_DIR the run's args.json, summary.json,
eval_log.jsonl, train_log.jsonl (or .jsonl.gz) and, from the GPU job, plan.json and nvidia_smi.txt. Every number
in the file is read from those: the parameter count from the weights, tokens/s and MFU from the summary (with the
peak they are measured against), losses from the logs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import textwrap
from pathlib import Path

from ..model.atomic import sha256_file
from .flops import MEASURED_H200_TFLOPS


def _log(folder: Path, stem: str) -> list[dict]:
    for name, opener in ((f"{stem}.jsonl", open), (f"{stem}.jsonl.gz", gzip.open)):
        p = folder / name
        if p.exists():
            with opener(p, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
    raise FileNotFoundError(f"no {stem}.jsonl(.gz) in {folder}")


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _model_lines(model_dir: Path) -> tuple[list[str], object]:
    import torch

    from ..model.config import SmallThinkerConfig
    from ..model.model import SmallThinkerForCausalLM

    cfg = SmallThinkerConfig.from_json(model_dir / "config.json")
    with torch.device("meta"):
        n = SmallThinkerForCausalLM(cfg).num_parameters()
    weights = model_dir / "model.safetensors"
    glob = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    nope = [i for i in range(cfg.num_hidden_layers) if not cfg.uses_rope(i)]
    lines = [f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query heads and "
             f"{cfg.num_key_value_heads} KV heads of dim {cfg.head_dim} (GQA); global attention in layers "
             f"{', '.join(map(str, glob))}, the others a sliding window of {cfg.sliding_window_size} tokens; NoPE in "
             f"layers {', '.join(map(str, nope)) or 'none'}, RoPE (theta {cfg.rope_theta:g}) in the others; per layer "
             f"a pre-attention router ({'softmax' if cfg.moe_primary_router_apply_softmax else 'sigmoid'} scores) "
             f"and {cfg.num_experts} ReGLU experts of ffn size {cfg.moe_ffn_hidden_size}, top-{cfg.top_k}; "
             f"vocabulary {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embedding / LM head. "
             f"{n:,} parameters; `model.safetensors` is {weights.stat().st_size:,} bytes "
             f"(sha256 `{sha256_file(weights)}`)."]
    return lines, cfg


def render(model_dir: str | Path, training_dir: str | Path, name: str | None = None,
           sweep_md: str | Path | None = None) -> str:
    model_dir, training_dir = Path(model_dir), Path(training_dir)
    name = name or model_dir.name
    args = json.loads((training_dir / "args.json").read_text())
    summary = json.loads((training_dir / "summary.json").read_text())
    plan_p = training_dir / "plan.json"
    plan = json.loads(plan_p.read_text()) if plan_p.exists() else {}
    smi_p = training_dir / "nvidia_smi.txt"
    smi = smi_p.read_text().strip().replace("\n", "; ") if smi_p.exists() else None
    log, ev = _log(training_dir, "train_log"), _log(training_dir, "eval_log")
    model_lines, cfg = _model_lines(model_dir)
    B, T, steps = args["batch_size"], args["seq_len"], summary["steps_done"]
    domains = [k[3:] for k in log[0] if k.startswith("ce_")]
    tail = log[-50:]
    final_step = ev[-1]["step"] if ev else None
    val = {r["domain"]: r["ce"] for r in ev if r["step"] == final_step}
    best = {d: min((r for r in ev if r["domain"] == d), key=lambda r: r["ce"]) for d in val}
    fl = summary["flops_per_token"]
    mfu, peak = summary.get("mfu_this_run"), summary.get("peak_tflops")
    group = args["balance_group"]
    group_text = (f"the conventional micro-batch loss over micro-batches of {args['microbatch_size']} sequences"
                  if group == "micro-batch" else
                  f"DP-group global balance loss over groups of {B if group == 'batch' else group} sequences"
                  + (" (the whole batch)" if group in ("batch", B) else ""))
    out = [f"# {name}: how it was trained", "",
           "Written by `python -m smallthinker_lab.train.report` from the run's own files in `training/` (per-step "
           "`train_log.jsonl.gz`, `eval_log.jsonl`, `args.json`, `summary.json`"
           + (", `plan.json`" if plan else "") + "): every number below is read from them.", "",
           "## Model", "", *model_lines, "",
           "## Data", "",
           f"Token folder `{args['data_dir']}`, domains {', '.join(domains)}, mixed `{args['domain_weights']}`: each "
           f"step takes {B} windows of {T + 1} tokens at seeded random offsets (the batch of step s is a function "
           f"of the seed and s).", ""]
    if plan.get("unique_train_tokens"):
        out += [f"Unique training tokens: {plan['unique_train_tokens']:,}; the run saw {summary['tokens_seen']:,} "
                f"tokens, {summary['tokens_seen'] / plan['unique_train_tokens']:.2f} passes (at most "
                f"{plan['max_passes']:g} planned).", ""]
    lr, warm = args["lr"], args["warmup"]
    out += ["## Recipe", "", "| | |", "| --- | --- |",
            f"| steps | {steps:,} of {summary['steps_planned']:,} planned"
            + (" (stopped by the time guard)" if summary["stopped_by_time"] else "") + " |",
            f"| batch | {B} sequences x {T} tokens = {B * T:,} tokens |",
            f"| tokens seen | {summary['tokens_seen']:,} |",
            f"| optimizer | AdamW, betas ({args['betas'][0]:g}, {args['betas'][1]:g}), eps {args['eps']:g}, "
            f"weight decay {args['weight_decay']:g} on matrices (none on norms and the embedding), gradient "
            f"clipping at {args['grad_clip']:g} |",
            f"| learning rate | linear warmup over {warm} steps to {lr:g}, cosine decay to "
            f"{lr * args['min_lr_ratio']:g} ({args['min_lr_ratio']:.0%} of peak) at the last step |",
            f"| loss | cross-entropy + {args['balance_coef']:g} x {group_text}"
            + (f" + {args['z_loss_coef']:g} x z-loss" if args["z_loss_coef"] else "; no other auxiliary loss") + " |",
            f"| precision | {'bf16 autocast, fp32 master weights' if 'cuda' in args['device'] else 'fp32'}; "
            f"exported in {args['export_dtype']} |",
            f"| torch.compile | {'yes' if summary.get('compiled') else 'no'} |",
            f"| seed | {args['seed']} (weights and data order) |", "",
            "## Hardware and time", "",
            f"Device: {summary['device']}" + (f" (`nvidia-smi`: {smi})" if smi else "") + ". "
            f"Training loop wall time {summary['wall_s_this_run']:,.1f} s at {summary['tokens_per_s_this_run']:,.0f} "
            f"tokens/s" + (f" (the probe before it measured {plan['probe_tokens_per_s']:,.0f})" if plan else "") + "."
            + _probes(plan), "",
            f"Model FLOPs per token ({T}-token windows, `smallthinker_lab/train/flops.py`): 6 x "
            f"{fl['active_matmul_params']:,.0f} active matmul parameters = {fl['dense']:,.0f}, plus attention "
            f"{fl['attention']:,.0f} = {fl['total']:,.0f}. "]
    if mfu is not None:
        out[-1] += (f"MFU {mfu:.2%} against {peak:g} TFLOP/s ({summary['peak_source']})"
                    + (f"; {mfu * peak / MEASURED_H200_TFLOPS:.2%} against the {MEASURED_H200_TFLOPS:g} TFLOP/s an "
                       f"8192^3 bf16 matmul reached on the device's H200" if "H200" in summary["device"] else "")
                    + ". The dense training MoE multiplies all experts, "
                    f"{cfg.num_experts // cfg.top_k}x the routed experts' work, which model FLOPs do not count.")
    else:
        out[-1] += "No peak is known for this device, so no MFU."
    out += ["", "## Losses", "",
            f"Cross-entropy in nats per token. Train: mean of the last {len(tail)} steps (the windows of each domain "
            f"in those steps). Validation: the `{{domain}}.val.bin` windows evaluated after step {final_step}. First "
            f"step: {log[0]['ce']:.3f} (ln {cfg.vocab_size} = {math.log(cfg.vocab_size):.3f}).", "",
            "| domain | train CE | validation CE | validation perplexity | lowest validation CE (step) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for d in domains:
        v = val.get(d)
        out.append(f"| {d} | {_mean(r.get(f'ce_{d}') for r in tail):.3f} | "
                   + (f"{v:.3f} | {math.exp(v):.2f} | {best[d]['ce']:.3f} ({best[d]['step']:,})" if v is not None
                      else "| | ") + " |")
    out += [f"| all | {_mean(r['ce'] for r in tail):.3f} | "
            + (f"{_mean(val.values()):.3f} (mean of domains) | | |" if val else "| | |"), "",
            f"Balance statistics, last {len(tail)} steps (1.0 = perfectly even): per sequence "
            f"{_mean(r['bal_sequence'] for r in tail):.3f}, over the whole batch "
            f"{_mean(r['bal_batch'] for r in tail):.3f}; expert-load entropy / log E "
            f"{_mean(r['load_entropy'] for r in tail):.3f}.", ""]
    if sweep_md is not None:
        out += ["## Balance-group sweep", "", Path(sweep_md).read_text().strip(), ""]
    cmd = (f"smallthinker-lab train --config {_config_arg(args)} --data {args['data_dir']} "
           f"--out runs/{name} --device {args['device']} --steps {summary['steps_planned']} --batch-size {B} "
           f"--seq-len {T} --lr {lr:g} --warmup {warm} --balance-group {group} --microbatch-size "
           f"{args['microbatch_size']} --balance-coef {args['balance_coef']:g} --seed {args['seed']}"
           + (" --compile" if args.get("compile") else "") + " --tokenizer data/models/smallthinker-tiny")
    out += ["## Reproduce", "", "```bash", cmd, "```", "",
            "On CPU a run is bit-identical for a seed (tested). On CUDA, scatter/index-add gradients use atomics, so "
            "a rerun matches only to rounding."]
    return "\n".join(_wrap(out)) + "\n"


def _wrap(lines: list[str], width: int = 115) -> list[str]:
    """Prose lines wrapped at ``width``; headings, tables and code blocks as they are."""
    wrapped, code = [], False
    for line in lines:
        for part in line.split("\n"):
            if part.startswith("```"):
                code = not code
            if code or part.startswith(("#", "|", "```")) or len(part) <= width:
                wrapped.append(part)
            else:
                wrapped.extend(textwrap.wrap(part, width, break_long_words=False, break_on_hyphens=False))
    return wrapped


def _probes(plan: dict) -> str:
    """The eager / torch.compile probes of the GPU job, when it ran both: what decided ``--compile``."""
    probes, compiled = plan.get("probes_tokens_per_s") or {}, plan.get("probes_compiled") or {}
    if len(probes) < 2:
        return ""
    parts = [f"{'compiled' if compiled.get(n) else 'eager'} {v:,.0f}" for n, v in probes.items()]
    return (f" The job's 40-step probes measured {', '.join(parts)} tokens/s (steps 21-40) and trained "
            f"{'compiled' if plan.get('compile') else 'eagerly'}.")


def _config_arg(args: dict) -> str:
    from ..model.config import PRESETS, SmallThinkerConfig

    for preset in PRESETS:
        if json.loads(json.dumps(SmallThinkerConfig.from_name(preset).to_dict(), default=str)) == args["config"]:
            return preset
    return "config.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smallthinker_lab.train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("training_dir", type=Path)
    p.add_argument("--name", default=None)
    p.add_argument("--sweep", type=Path, default=None, help="sweep_table.md to include")
    p.add_argument("--out", type=Path, default=None, help="default: MODEL_DIR/TRAINING.md")
    a = p.parse_args(argv)
    text = render(a.model_dir, a.training_dir, a.name, a.sweep)
    path = a.out or a.model_dir / "TRAINING.md"
    path.write_text(text, encoding="utf-8")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
