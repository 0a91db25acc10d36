"""Measurements of one sweep run, and the per-arm table across seeds.

Per run (``measure_run``, written to ``<run>/measure.json``), all with the project's existing functions:

- routing on the prompt sets (one per domain: gsm8k math, humaneval code, wiki-en English, zh-news Chinese; the
  first ``prompt_limit`` prompts of each, prefill + ``new_tokens`` greedy tokens): ``quality.phenomena`` gives
  the expert frequencies per set, the JS divergence between sets per layer (``js_layer_<l>``: mean over the 6
  pairs; ``js_mean``: mean over layers), the hot (>= 0.4) and cold (< 0.14) expert shares and the usage entropy
  per set (``hot_share_<set>`` ...; ``hot_share`` etc.: mean over sets), and neuron sparsity per (token, expert)
  pair (``sparsity_median_layer_<l>``: the median over the layer's pairs, all sets pooled; ``sparsity_median``:
  mean over layers) and per expert (``sparsity_expert_median_layer_<l>``: the median over the layer's experts of
  each expert's mean over its routed tokens; ``sparsity_expert_median``: mean over layers);
- validation cross-entropy per domain (``val_ce_<domain>``, ``val_ce``: mean): the trainer's last evaluation on
  ``{domain}.val.bin`` (eval_log.jsonl), computed on the training device right after the last step;
- the engine's LRU hit rate at a fixed expert cache (``cache_share`` of all experts) per prompt set
  (``engine.warm.domain_hit_rates``, own warm-up only): ``lru_hit_cold_<set>`` from an empty cache and
  ``lru_hit_warm_<set>`` after the set's first 4 prompts, on the next ``hit_prompts - 4`` prompts;
- from training: the mean over the last 50 steps of train CE, load entropy and both balance statistics, the run's
  tokens/s and MFU.

``write_tables`` pools the runs: sweep_runs.csv (a row per run), sweep_table.csv (per arm and measurement: runs,
mean, std over seeds with ddof 1, min, max) and sweep_table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

SETS = ("gsm8k", "humaneval", "wiki-en", "zh-news")
MAIN = ("js_mean", "hot_share", "cold_share", "usage_entropy", "sparsity_median", "sparsity_expert_median", "val_ce",
        "lru_hit_cold", "lru_hit_warm", "train_ce", "train_load_entropy", "tokens_per_s", "mfu")


def run_name(arm: str, seed: int) -> str:
    """A run's folder name: g<sequences>-s<seed>, or microbatch-s<seed>."""
    return f"{'microbatch' if arm == 'micro-batch' else 'g' + arm}-s{seed}"


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def routing_measures(model, tokenizer, prompts_dir: str | Path, sets: Sequence[str], prompt_limit: int,
                     new_tokens: int) -> dict[str, float]:
    """JS divergence between sets per layer, hot / cold shares and usage entropy per set, pair sparsity."""
    from ..quality.phenomena import phenomena, profile_prompt_sets

    rec = profile_prompt_sets(model, tokenizer, prompts_dir, sets, new_tokens, prompt_limit, progress=False)
    ph = phenomena(rec, sets)
    out: dict[str, float] = {}
    js = ph["divergence"].groupby("layer")["js_divergence"].mean()
    out.update({f"js_layer_{int(layer)}": float(v) for layer, v in js.items()})
    out["js_mean"] = float(js.mean())
    skew = ph["skew"].set_index("dataset")
    for col, name in (("hot_share", "hot_share"), ("cold_share", "cold_share"), ("entropy", "usage_entropy")):
        for s in sets:
            out[f"{name}_{s}"] = float(skew.loc[s, col])
        out[name] = _mean(skew.loc[list(sets), col])
    sp = ph["sparsity"]
    med = sp[sp["dataset"] == "all"].set_index("layer")["median"]
    out.update({f"sparsity_median_layer_{int(layer)}": float(v) for layer, v in med.items()})
    out["sparsity_median"] = float(med.mean())
    from ..instruments import neuron_sparsity_by_expert

    per_expert = neuron_sparsity_by_expert(rec.to_dataframe("neurons").assign(dataset="all"))
    med_e = per_expert.groupby("layer")["sparsity"].median()
    out.update({f"sparsity_expert_median_layer_{int(layer)}": float(v) for layer, v in med_e.items()})
    out["sparsity_expert_median"] = float(med_e.mean())
    return out


def hit_rate_measures(model_dir: str | Path, prompts_dir: str | Path, sets: Sequence[str], hit_prompts: int,
                      cache_share: float, new_tokens: int, warmup: int = 4) -> dict[str, float]:
    """The engine's LRU hit rate per set at an expert cache of ``cache_share`` of all experts, cold and warm."""
    from ..engine import Engine
    from ..engine.warm import domain_hit_rates
    from ..quality.phenomena import read_prompts

    if not 0 < cache_share < 1:
        raise ValueError(f"cache_share must be in (0, 1), got {cache_share}")
    prompts = {s: [r["text"] for r in read_prompts(Path(prompts_dir) / f"{s}.jsonl", hit_prompts)] for s in sets}
    with Engine.from_pretrained(model_dir, memory_limit=f"{100 * cache_share:g}%", device="cpu", policy="lru",
                                progress=False) as engine:
        df = domain_hit_rates(engine, prompts, warmup_prompts=warmup, max_new_tokens=new_tokens, cross=False,
                              progress=False)
        capacity = int(engine.stats()["capacity_experts"])
    out: dict[str, float] = {"cache_experts": capacity}
    for start in ("cold", "warm"):
        part = df[df["start"] == start].set_index("domain")["hit_rate"]
        out.update({f"lru_hit_{start}_{s}": float(part[s]) for s in sets})
        out[f"lru_hit_{start}"] = _mean(part[list(sets)])
    return out


def training_measures(run_dir: Path, last: int = 50) -> dict[str, float]:
    """From the run's logs: last-``last``-step means, final validation CE per domain, throughput and MFU."""
    from .trainer import read_log

    log = read_log(run_dir / "train_log.jsonl")
    if not log:
        raise FileNotFoundError(f"{run_dir}: no train_log.jsonl records")
    tail = log[-last:]
    out = {"steps": len(log), "tokens": log[-1]["tokens"], "train_ce": _mean(r["ce"] for r in tail),
           "train_load_entropy": _mean(r["load_entropy"] for r in tail),
           "train_bal_sequence": _mean(r["bal_sequence"] for r in tail),
           "train_bal_batch": _mean(r["bal_batch"] for r in tail)}
    summary = json.loads((run_dir / "summary.json").read_text())
    out["tokens_per_s"] = summary.get("tokens_per_s_this_run")
    out["mfu"] = summary.get("mfu_this_run")
    ev = read_log(run_dir / "eval_log.jsonl")
    if ev:
        final = [r for r in ev if r["step"] == ev[-1]["step"]]
        out.update({f"val_ce_{r['domain']}": r["ce"] for r in final})
        out["val_ce"] = _mean(r["ce"] for r in final)
    return out


def measure_run(run_dir: str | Path, prompts_dir: str | Path = "data/prompts", sets: Sequence[str] = SETS,
                prompt_limit: int = 24, hit_prompts: int = 12, cache_share: float = 0.25,
                new_tokens: int = 8) -> dict:
    """Every measurement of one trained run (its exported model in ``<run>/model``); also written to
    ``<run>/measure.json`` with the settings and seconds taken."""
    import torch

    from ..model import load_model
    from ..model.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{run_dir}: no exported model (model/model.safetensors); train the run first")
    t0 = time.perf_counter()
    res: dict = training_measures(run_dir)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    res.update(routing_measures(model, load_tokenizer(model_dir), prompts_dir, sets, prompt_limit, new_tokens))
    t1 = time.perf_counter()
    res.update(hit_rate_measures(model_dir, prompts_dir, sets, hit_prompts, cache_share, new_tokens))
    settings = {"sets": list(sets), "prompt_limit": prompt_limit, "hit_prompts": hit_prompts,
                "cache_share": cache_share, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
                "routing_s": round(t1 - t0, 1), "hit_rate_s": round(time.perf_counter() - t1, 1)}
    (run_dir / "measure.json").write_text(json.dumps({"settings": settings, "measures": res}, indent=2) + "\n")
    return res


# ------------------------------------------------------------------ across runs
def collect(out_dir: str | Path, arms: Sequence[str], seeds: Sequence[int]) -> pd.DataFrame:
    """One row per measured run: arm, seed, run, then every measurement."""
    rows = []
    for arm in arms:
        for s in seeds:
            p = Path(out_dir) / "runs" / run_name(arm, s) / "measure.json"
            if p.exists():
                rows.append({"arm": arm, "seed": s, "run": run_name(arm, s), **json.loads(p.read_text())["measures"]})
    if not rows:
        raise FileNotFoundError(f"no measured run under {out_dir}/runs (measure.json)")
    return pd.DataFrame(rows)


def arm_table(runs: pd.DataFrame, reference: str = "micro-batch") -> pd.DataFrame:
    """Per arm and measurement: runs (seeds measured), mean, std (ddof 1; NaN with one run), min, max, and against
    the ``reference`` arm (when measured): delta = mean - the reference's mean, and delta_over_spread = delta over
    the pooled seed std of the two arms (sqrt of the mean of their variances): how many seed spreads apart."""
    metrics = [c for c in runs.columns if c not in ("arm", "seed", "run")]
    long = runs.melt(id_vars=["arm", "seed"], value_vars=metrics, var_name="measure").dropna(subset=["value"])
    long["value"] = long["value"].astype(float)
    order = {a: i for i, a in enumerate(pd.unique(runs["arm"]))}
    g = long.groupby(["arm", "measure"], sort=False)["value"]
    table = g.agg(runs="count", mean="mean", std="std", min="min", max="max").reset_index()
    ref = table[table["arm"] == reference].set_index("measure")
    if len(ref):
        r_mean, r_std = table["measure"].map(ref["mean"]), table["measure"].map(ref["std"])
        table["delta"] = table["mean"] - r_mean
        table["delta_over_spread"] = table["delta"] / ((table["std"] ** 2 + r_std ** 2) / 2) ** 0.5
    table["_o"] = table["arm"].map(order)
    return table.sort_values(["_o", "measure"], kind="stable").drop(columns="_o").reset_index(drop=True)


def _cell(r) -> str:
    fmt = (lambda v: f"{v:,.0f}") if abs(r["mean"]) >= 1000 else (lambda v: f"{v:.4f}")
    std = "" if math.isnan(r["std"]) else f" ± {fmt(r['std'])}"
    return f"{fmt(r['mean'])}{std} [{fmt(r['min'])}, {fmt(r['max'])}]"


def write_tables(out_dir: str | Path, arms: Sequence[str], seeds: Sequence[int]) -> list[Path]:
    out_dir = Path(out_dir)
    runs = collect(out_dir, arms, seeds)
    table = arm_table(runs)
    paths = [out_dir / "sweep_runs.csv", out_dir / "sweep_table.csv", out_dir / "sweep_table.md"]
    runs.to_csv(paths[0], index=False)
    table.to_csv(paths[1], index=False)
    main = table[table["measure"].isin(MAIN)]
    wide = main.assign(cell=main.apply(_cell, axis=1)).pivot(index="arm", columns="measure", values="cell")
    wide = wide.reindex(index=[a for a in arms if a in set(wide.index)],
                        columns=[m for m in MAIN if m in set(wide.columns)])
    n = runs.groupby("arm")["seed"].count()
    lines = [f"Balance-group sweep: mean ± std [min, max] over seeds ({', '.join(map(str, seeds))}); runs per arm: "
             + ", ".join(f"{a} {int(n.get(a, 0))}" for a in wide.index) + ".", "",
             "| arm | " + " | ".join(wide.columns) + " |", "|" + " --- |" * (len(wide.columns) + 1)]
    lines += [f"| {a} | " + " | ".join(str(wide.loc[a, c]) for c in wide.columns) + " |" for a in wide.index]
    if "delta" in main.columns:
        d = main.pivot(index="arm", columns="measure", values="delta_over_spread")
        d = d.reindex(index=[a for a in wide.index if a != "micro-batch"], columns=list(wide.columns))
        lines += ["", "Against the micro-batch arm: (arm mean - micro-batch mean) / pooled seed std of the two arms.",
                  "", "| arm | " + " | ".join(d.columns) + " |", "|" + " --- |" * (len(d.columns) + 1)]
        lines += [f"| {a} | " + " | ".join("" if pd.isna(v) else f"{v:+.1f}" for v in d.loc[a]) + " |"
                  for a in d.index]
    paths[2].write_text("\n".join(lines) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smallthinker_lab.train.sweep_measure",
                                description="Measure one sweep run into <run>/measure.json.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompts", type=Path, default=Path("data/prompts"))
    p.add_argument("--prompt-limit", type=int, default=24)
    p.add_argument("--hit-prompts", type=int, default=12)
    p.add_argument("--cache-share", type=float, default=0.25)
    p.add_argument("--new-tokens", type=int, default=8)
    a = p.parse_args(argv)
    res = measure_run(a.run_dir, a.prompts, SETS, a.prompt_limit, a.hit_prompts, a.cache_share, a.new_tokens)
    print(json.dumps({k: res[k] for k in MAIN if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
