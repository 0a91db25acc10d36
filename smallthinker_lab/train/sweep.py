"""The balance-group sweep: the shipped recipe trained with DP-group sizes g = 1, 4, 16, 64 sequences and the
conventional micro-batch loss, several seeds each, then measured and tabulated per arm.

    python -m smallthinker_lab.train.sweep all --data data/corpus/tokens --out runs/sweep --device cuda

``all`` = ``probe`` (a few concurrent steps measure the throughput; the step count is planned from it so the
training fits ``--train-s``), ``train`` (every run as its own ``smallthinker-lab train`` process, ``--parallel`` at
a time on one GPU; each run's measurement starts on the CPU as soon as it finishes, while the next runs train),
then ``table``. Each phase is also a subcommand; ``train`` and ``measure`` skip runs that are already done and
resume interrupted ones, so an interrupted sweep continues where it stopped.

Arms see the same tokens: the batch of step s is a function of (seed, s) only, so for one seed every arm trains
on identical batches from identical initial weights, and the arms differ only in the balance group. Seeds change
both the initial weights and the batch order.

The micro-batch arm is the conventional loss over micro-batches of ``--microbatch-size`` sequences; it is the same
function as g = that size (tested), so with the default size 1 it repeats the g = 1 arm's arithmetic: its spread
against g = 1 then shows run-to-run GPU noise at equal seeds. ``--arms 1,4,16,64`` leaves it out.

Output under ``--out``::

    sweep.json            the plan: every run's exact train command, settings, the probe's throughput
    runs/<run>/           the run's folder (train_log.jsonl, eval_log.jsonl, summary.json, model/, checkpoint.pt,
                          train.out) and measure.json (``sweep_measure.measure_run``)
    sweep_runs.csv        one row per run: arm, seed, every measurement
    sweep_table.csv       per arm and measurement: runs, mean, std (over seeds, ddof 1), min, max
    sweep_table.md        the main measurements per arm as mean ± std [min, max]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .sweep_measure import run_name, write_tables

ARMS = ("1", "4", "16", "64", "micro-batch")
SEEDS = (0, 1, 2)


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    for a in arms:
        if a != "micro-batch" and not (a.isdigit() and int(a) >= 1):
            raise ValueError(f"arm {a!r} is neither a number of sequences nor 'micro-batch'")
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--arms {text!r}: give distinct arms, e.g. 1,4,16,64,micro-batch")
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct seeds, e.g. 0,1,2")
    return seeds


def train_command(a: argparse.Namespace, arm: str, seed: int, out: Path, steps: int, max_time: float | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """The ``smallthinker-lab train`` command line of one run (as a module call of this interpreter)."""
    cmd = [sys.executable, "-m", "smallthinker_lab.train.cli", "train", "--config", a.config, "--data", str(a.data),
           "--out", str(out), "--steps", str(steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
           "--lr", str(a.lr), "--warmup", str(warmup_steps(a, steps)), "--balance-group", arm,
           "--microbatch-size", str(a.microbatch_size), "--balance-coef", str(a.balance_coef), "--seed", str(seed),
           "--device", a.device, "--eval-windows", str(a.eval_windows), "--log-every", str(a.log_every),
           "--no-progress"]
    if a.tokenizer:
        cmd += ["--tokenizer", str(a.tokenizer)]
    if a.compile:
        cmd += ["--compile"]
    if max_time is not None:
        cmd += ["--max-time", f"{max_time:.0f}"]
    return cmd + (extra or [])


def warmup_steps(a: argparse.Namespace, steps: int) -> int:
    return a.warmup if a.warmup is not None else max(1, min(200, steps // 15))


def _runs(a: argparse.Namespace) -> list[tuple[str, int, Path]]:
    return [(arm, s, Path(a.out) / "runs" / run_name(arm, s)) for arm in parse_arms(a.arms)
            for s in parse_seeds(a.seeds)]


def _done(run_dir: Path, steps: int) -> bool:
    p = run_dir / "summary.json"
    if not p.exists() or not (run_dir / "model" / "model.safetensors").exists():
        return False
    s = json.loads(p.read_text())
    return s.get("steps_done") == steps or bool(s.get("stopped_by_time"))


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + pp if pp else ""), "PYTHONUNBUFFERED": "1"}


def _launch(cmd: list[str], log: Path, threads: int | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = _env()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    f = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    finally:
        f.close()  # the child holds its own descriptor


# ------------------------------------------------------------------ probe
def probe(a: argparse.Namespace) -> dict:
    """``--parallel`` concurrent runs of ``--probe-steps`` steps (the first arms); tokens/s per process over the
    last logged steps, and the steps that fit ``--train-s`` for every run in waves of ``--parallel``."""
    runs = _runs(a)
    P = min(a.parallel, len(runs))
    folder = Path(a.out) / "probe"
    procs = []
    for i in range(P):
        arm, seed, _ = runs[i]
        cmd = train_command(a, arm, seed, folder / f"p{i}", a.probe_steps, extra=["--no-export", "--no-resume"])
        procs.append(_launch(cmd, folder / f"p{i}.out"))
    t0 = time.perf_counter()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        tail = (folder / f"p{codes.index(next(c for c in codes if c))}.out").read_text()[-3000:]
        raise RuntimeError(f"the probe failed (exit codes {codes}):\n{tail}")
    from .trainer import read_log

    tps = [read_log(folder / f"p{i}" / "train_log.jsonl")[-1]["tokens_per_s"] for i in range(P)]
    per_run, tokens_per_step = min(tps), a.batch_size * a.seq_len
    waves = -(-len(runs) // P)
    # what a run spends outside steady-state steps (start-up, first steps, final validation), paid once per wave
    overhead = max(0.0, wall - a.probe_steps * tokens_per_step / per_run)
    steps = int(max(0.0, a.train_s / waves - overhead) * per_run // tokens_per_step)
    out = {"parallel": P, "probe_steps": a.probe_steps, "tokens_per_s_per_process": tps,
           "tokens_per_s_total": sum(tps), "probe_wall_s": round(wall, 1), "overhead_s": round(overhead, 1),
           "waves": waves, "train_s": a.train_s, "planned_steps": steps,
           "planned_tokens_per_run": steps * tokens_per_step}
    print(f"probe: {P} processes at {[round(t) for t in tps]} tokens/s each ({wall:.0f}s, {overhead:.0f}s outside "
          f"steady steps); {waves} waves in {a.train_s:.0f}s -> {steps} steps per run "
          f"({out['planned_tokens_per_run']:,} tokens)", flush=True)
    return out


# ------------------------------------------------------------------ train (+ measure as runs finish)
def train_all(a: argparse.Namespace, steps: int, measure: bool = True) -> None:
    """Every run not yet done, ``--parallel`` at a time; a finished run's measurement starts at once on the CPU
    (``--measure-threads`` threads each) while the other runs train."""
    runs = _runs(a)
    wave_s = a.train_s / max(1, -(-len(runs) // min(a.parallel, len(runs))))
    max_time = a.max_time if a.max_time is not None else 1.15 * wave_s if a.plan_from_probe else None
    plan = _read_plan(a)
    plan["runs"] = {run_name(arm, s): {"arm": arm, "seed": s, "dir": str(d),
                                       "command": train_command(a, arm, s, d, steps, max_time)[1:]}
                    for arm, s, d in runs}
    plan.update(steps=steps, settings=_settings(a))
    _write_plan(a, plan)
    todo = [(arm, s, d) for arm, s, d in runs if not _done(d, steps)]
    measuring: list[tuple[subprocess.Popen, Path]] = []
    active: list[tuple[subprocess.Popen, str, int, Path]] = []
    failed = []
    t0 = time.perf_counter()
    while todo or active:
        while todo and len(active) < a.parallel:
            arm, s, d = todo.pop(0)
            active.append((_launch(train_command(a, arm, s, d, steps, max_time), d / "train.out"), arm, s, d))
            print(f"[{time.perf_counter() - t0:5.0f}s] train {d.name}", flush=True)
        time.sleep(1.0)
        for item in list(active):
            proc, arm, s, d = item
            if proc.poll() is None:
                continue
            active.remove(item)
            print(f"[{time.perf_counter() - t0:5.0f}s] {d.name} exit {proc.returncode}", flush=True)
            if proc.returncode:
                failed.append(d.name)
            elif measure:
                measuring.append((_measure_proc(a, d), d))
    for proc, d in measuring:
        proc.wait()
        print(f"[{time.perf_counter() - t0:5.0f}s] measured {d.name}: exit {proc.returncode}", flush=True)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)} (see runs/<run>/train.out)")


def _measure_proc(a: argparse.Namespace, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "smallthinker_lab.train.sweep_measure", str(run_dir), "--prompts", str(a.prompts),
           "--prompt-limit", str(a.prompt_limit), "--hit-prompts", str(a.hit_prompts),
           "--cache-share", str(a.cache_share), "--new-tokens", str(a.new_tokens)]
    return _launch(cmd, run_dir / "measure.out", threads=a.measure_threads)


def measure_all(a: argparse.Namespace) -> None:
    """Measure every trained run that has no measure.json yet, ``--measure-parallel`` at a time."""
    pending = [d for _, _, d in _runs(a) if (d / "model" / "model.safetensors").exists()
               and not (d / "measure.json").exists()]
    active: list[subprocess.Popen] = []
    while pending or active:
        while pending and len(active) < a.measure_parallel:
            d = pending.pop(0)
            print(f"measure {d.name}", flush=True)
            active.append(_measure_proc(a, d))
        time.sleep(0.5)
        active = [p for p in active if p.poll() is None]


def _settings(a: argparse.Namespace) -> dict:
    keys = ("config", "data", "batch_size", "seq_len", "lr", "warmup", "balance_coef", "microbatch_size", "device",
            "compile", "eval_windows", "arms", "seeds", "parallel", "train_s", "prompts", "prompt_limit",
            "hit_prompts", "cache_share", "new_tokens")
    return {k: str(getattr(a, k)) if isinstance(getattr(a, k), Path) else getattr(a, k) for k in keys}


def _read_plan(a: argparse.Namespace) -> dict:
    p = Path(a.out) / "sweep.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _write_plan(a: argparse.Namespace, plan: dict) -> None:
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "sweep.json").write_text(json.dumps(plan, indent=2) + "\n")


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smallthinker_lab.train.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["all", "probe", "train", "measure", "table"])
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep folder (outside git)")
    p.add_argument("--data", type=Path, default=Path("data/corpus/tokens"), help="token folder of the corpus")
    p.add_argument("--prompts", type=Path, default=Path("data/prompts"), help="prompt sets (one per domain)")
    p.add_argument("--tokenizer", type=Path, default=Path("data/models/smallthinker-tiny"),
                   help="folder whose tokenizer files go into each run's model (needed by the measurements)")
    p.add_argument("--config", default="smallthinker-tiny-wide")
    p.add_argument("--arms", default=",".join(ARMS), help="balance groups: sequences, or micro-batch")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: planned by the probe)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="default: steps / 15, at most 200")
    p.add_argument("--balance-coef", type=float, default=0.01)
    p.add_argument("--microbatch-size", type=int, default=1, help="sequences per micro-batch of the micro-batch arm")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per domain at the end")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--parallel", type=int, default=8, help="training processes at once on the GPU")
    p.add_argument("--train-s", type=float, default=360.0,
                   help="wall seconds for all training (the probe plans the steps from it)")
    p.add_argument("--max-time", type=float, default=None,
                   help="per-run time guard (default: 1.15 x a wave's share of --train-s when planned by the probe)")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--prompt-limit", type=int, default=24, help="prompts per set for the routing measurements")
    p.add_argument("--hit-prompts", type=int, default=12, help="prompts per set for the LRU hit rate (4 warm-up)")
    p.add_argument("--cache-share", type=float, default=0.25, help="the engine's expert cache: share of experts")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens after each prompt")
    p.add_argument("--measure-threads", type=int, default=1)
    p.add_argument("--measure-parallel", type=int, default=4, help="measurements at once (phase measure)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    parse_arms(a.arms), parse_seeds(a.seeds)
    for name in ("parallel", "batch_size", "seq_len", "measure_parallel", "probe_steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    a.plan_from_probe = False
    if a.phase in ("all", "probe") and a.steps is None:
        res = probe(a)
        plan = _read_plan(a)
        plan["probe"] = res
        _write_plan(a, plan)
        if a.phase == "probe":
            return 0
        a.steps, a.plan_from_probe = res["planned_steps"], True
        if a.steps < 1:
            raise SystemExit(f"the probe's throughput leaves no step in --train-s {a.train_s}s")
    if a.phase in ("all", "train"):
        steps = a.steps if a.steps is not None else _read_plan(a).get("steps")
        if steps is None:
            raise SystemExit("give --steps (or run the probe first: phase all)")
        train_all(a, int(steps), measure=a.phase == "all")
    if a.phase in ("all", "measure"):
        measure_all(a)
    if a.phase in ("all", "table"):
        paths = write_tables(Path(a.out), parse_arms(a.arms), parse_seeds(a.seeds))
        print("\n".join(str(p) for p in paths))
        print((Path(a.out) / "sweep_table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
