"""Decode throughput with no recording, with each instrument kind alone, and with the default kinds.

    python -m benchmarks.instrument_overhead [--rounds 15] [--new-tokens 64] [--threads 1]

Targets: the model (data/models/smallthinker-tiny when its weights exist, else the "smallthinker-tiny" preset
with random weights) and the offloading engine over the same weights (memory limit unlimited, so the numbers
are the instruments' cost and not I/O). Each round runs every configuration once, in a shuffled order, greedy,
no stop token; a configuration's overhead is 1 - median over rounds of (its decode tok/s / the same round's
no-recording tok/s), so slow drift of a shared machine cancels. Writes benchmarks/results/instrument_overhead.json
and .md. The issue's target: the default kinds (counters) within 5% of no recording.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from smallthinker_lab import SmallThinkerConfig, SmallThinkerForCausalLM, record, stream_generate
from smallthinker_lab.instruments import KINDS
from smallthinker_lab.model import GenerationStats

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "smallthinker-tiny"
HOOKS_ONLY = "hooks only"  # no-op callbacks on the points the default kinds use: the dispatch cost alone
CONFIGS: dict[str, dict | None] = {
    "none": None,
    HOOKS_ONLY: None,
    **{kind: {"kinds": (kind,)} for kind in KINDS},
    "default": {},  # every kind, counters only
    "full": {"full": True},  # every kind, raw router logits and gate tensors kept
}


def _model() -> tuple[SmallThinkerForCausalLM, str]:
    if (DEFAULT_MODEL / "model.safetensors").exists():
        from smallthinker_lab import load_model

        return load_model(DEFAULT_MODEL), f"trained {DEFAULT_MODEL.name}"
    cfg = SmallThinkerConfig.from_name("smallthinker-tiny")
    return SmallThinkerForCausalLM(cfg).init_weights(seed=0).eval(), "smallthinker-tiny preset, random weights (fp32)"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _decode_tok_s(generate, n_new: int, device) -> tuple[float, list[float]]:
    """Decode tokens/s: (n_new - 1) forwards after the prefill, over the wall time from the end of the prefill
    (the first token sampled) to the last token, the device synchronised at the end; and the per-token times."""
    stats = GenerationStats()
    _sync(device)
    t0 = time.perf_counter()
    generate(stats)
    _sync(device)
    return (n_new - 1) / (time.perf_counter() - t0 - stats.prefill_seconds), stats.decode_token_seconds


def _run_model(model, ids, n_new):
    def gen(stats):
        for _ in stream_generate(model, ids, n_new, stop_tokens=[], stats=stats):
            pass

    return lambda: _decode_tok_s(gen, n_new, model.device)


def _run_engine(engine, ids, n_new):
    def gen(stats):
        for _ in engine.stream(ids, n_new, stop_tokens=[], stats=stats):
            pass

    return lambda: _decode_tok_s(gen, n_new, engine.device)


@contextmanager
def _hooks_only(target):
    noop = lambda **kw: None  # noqa: E731
    # the points record() listens to with the default kinds (on an engine, timing comes from its clocks)
    points = ["forward", "router", "moe"] + ([] if isinstance(target, SmallThinkerForCausalLM) else ["cache_events"])
    handles = [target.hooks.add(p, noop) for p in points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hook_share(target, once, runs: int = 3) -> float:
    """Share of the generation's wall time spent inside ``hooks.fire`` (dispatch and callbacks), median of a few
    runs: a direct measure of the instruments' own work that contention scales with the rest (it leaves out what
    the target does differently when observed, e.g. extra work to produce a payload, and GC side effects)."""
    hooks = target.hooks
    spent = [0.0]

    def timed_fire(point, **payload):
        t0 = time.perf_counter()
        type(hooks).fire(hooks, point, **payload)
        spent[0] += time.perf_counter() - t0

    shares = []
    hooks.fire = timed_fire  # an instance attribute shadows the method for every caller of this registry
    try:
        for _ in range(runs):
            spent[0] = 0.0
            t0 = time.perf_counter()
            once()
            shares.append(spent[0] / (time.perf_counter() - t0))
    finally:
        del hooks.fire
    return statistics.median(shares)


def measure(target, run, rounds: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    names = list(CONFIGS)

    def once(name: str):
        cfg = CONFIGS[name]
        ctx = _hooks_only(target) if name == HOOKS_ONLY else record(target, **cfg) if cfg is not None else nullcontext()
        with ctx:
            return run()

    for name in names:  # warm up every path once
        once(name)
    tok_s = {n: [] for n in names}
    token_s = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            rate, per_token = once(name)
            tok_s[name].append(rate)
            token_s[name] += per_token
    p25 = {n: float(np.percentile(token_s[n], 25)) for n in names}
    hook_share = {n: _hook_share(target, lambda n=n: once(n)) for n in names}
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(tok_s[name], tok_s["none"])]
        cfg = CONFIGS[name]
        out[name] = {
            "kinds": "-" if cfg is None else ",".join(cfg.get("kinds", KINDS)),
            "full": bool(cfg and cfg.get("full")),
            "decode_tok_s_median": statistics.median(tok_s[name]), "decode_tok_s_min": min(tok_s[name]),
            "decode_tok_s_max": max(tok_s[name]), "runs": tok_s[name],
            "overhead_median": 1.0 - statistics.median(ratios),
            "token_seconds_p25": p25[name], "overhead_p25": p25[name] / p25["none"] - 1.0,
            "hook_share": hook_share[name],
        }
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Instrument overhead: decode throughput\n\n{results['settings']['what']}\n",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores{', ' + m['gpu'] if 'gpu' in m else ''}; "
             f"torch {m.get('torch')}.\n",
             "Overhead vs none: 1 - median over rounds of (tok/s / the same round's tok/s with no recording); "
             "p25 token: the 25th percentile of the per-token decode times, against none's (contention only adds "
             "time, so a low percentile is the steadier estimate on a shared machine).\n",
             "Time in hooks: the share of a generation's wall time spent inside `hooks.fire` (dispatch + the "
             "recorder's callbacks), timed directly in separate runs.\n"]
    cols = ["target", "configuration", "kinds", "full", "decode tok/s (median)", "min - max", "overhead vs none",
            "p25 token (ms)", "p25 overhead", "time in hooks"]
    table = []
    for target, rows in results["targets"].items():
        for name, r in rows.items():
            ov = "-" if name == "none" else f"{100 * r['overhead_median']:+.1f}%"
            ov25 = "-" if name == "none" else f"{100 * r['overhead_p25']:+.1f}%"
            table.append([target, name, str(r["kinds"]), "yes" if r["full"] else "no",
                          f"{r['decode_tok_s_median']:.1f}",
                          f"{r['decode_tok_s_min']:.1f} - {r['decode_tok_s_max']:.1f}", ov,
                          f"{1e3 * r['token_seconds_p25']:.3f}", ov25, f"{100 * r['hook_share']:.1f}%"])
    # the text is final: tabulate lays it out, the figures right-aligned
    lines.append(pd.DataFrame(table, columns=cols, dtype=object).to_markdown(
        index=False, tablefmt="pipe", disable_numparse=True, colalign=["left"] * 4 + ["right"] * 6))
    lines.append("")
    for target, ok in results["default_within_5pct"].items():
        d = results["targets"][target]["default"]
        lines.append(f"- {target}: default kinds within 5% of no recording: **{'yes' if ok else 'NO'}** "
                     f"(median of ratios {100 * d['overhead_median']:+.1f}%, "
                     f"p25 token {100 * d['overhead_p25']:+.1f}%)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 suits a tiny model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (model and engine)")
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "instrument_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.ceilings import machine_info

    model, what = _model()
    ids = torch.randint(3, model.config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    model = model.to(args.device)
    t0 = time.perf_counter()
    targets = {"model": measure(model, _run_model(model, ids, args.new_tokens), args.rounds)}
    if not args.no_engine:
        from smallthinker_lab.engine import Engine
        from smallthinker_lab.model.checkpoint import save_pretrained

        with tempfile.TemporaryDirectory(prefix="instrument_overhead_") as tmp:
            folder = save_pretrained(model.cpu(), Path(tmp) / "model")
            model.to(args.device)
            engine = Engine.from_pretrained(folder, memory_limit="unlimited", device=args.device, progress=False)
            try:
                targets["engine"] = measure(engine, _run_engine(engine, ids, args.new_tokens), args.rounds)
                targets["engine"]["none"]["engine"] = repr(engine)
            finally:
                engine.close()
    results = {
        "settings": {"what": f"{what}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; "
                             f"{args.rounds} rounds, configurations shuffled per round; torch threads "
                             f"{args.threads}; device {args.device}; engine: memory limit unlimited",
                     "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "threads": args.threads, "device": args.device, "seconds": time.perf_counter() - t0},
        "machine": machine_info(),
        "targets": targets,
        # both estimates must hold
        "default_within_5pct": {t: max(rows["default"]["overhead_median"], rows["default"]["overhead_p25"]) <= 0.05
                                for t, rows in targets.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
