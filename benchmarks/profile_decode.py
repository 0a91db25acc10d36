"""Where decode time goes, per token, for each engine mode: attention, router, expert compute, I/O wait, LM head,
sampling, and the rest (Python overhead: embedding, planning, the loop, hooks).

The split comes from the engine's own clocks (``engine.stats()``: router / attention / MoE / LM-head seconds and
the cache's I/O wait, the same points the "timing" hook fires at), taken after the prefill and at the end of each
generation, so only decode steps count: expert compute = MoE time - I/O wait; sampling = the token's wall time
(``GenerationStats``) - the engine's forward time; Python/other = forward time - the named parts.
On CUDA these are host-side clocks: kernels run asynchronously, so GPU time shows up where the host waits (the
router's top-k read, one sync per layer) rather than where it is spent; ``--torch-profiler`` adds a device-side
operator table of one decode step.

Used by ``benchmarks/run.py`` (the "profile" of every result JSON); standalone on any checkpoint:

    python -m benchmarks.profile_decode CHECKPOINT [--device cpu] [--shares none,0.6,0] [--tokens 9] [--torch-profiler]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PARTS = ("attention", "router", "expert_compute", "io_wait", "lm_head", "sampling", "python_other")


def profile_rows(rows: list[dict]) -> list[dict]:
    """One record per engine row with a time split: decode ms/token and each part in ms/token and as a share."""
    out = []
    for r in rows:
        split = r.get("time_split_ms")
        if r.get("error") or not split or "attention" not in split:
            continue
        total = sum(split[p] for p in PARTS)
        rec = {"name": r.get("name"), "model": r.get("model"), "device": r.get("device"),
               "variant": r.get("variant"), "decode_ms_per_token": total}
        for p in PARTS:
            rec[p + "_ms"] = split[p]
            rec[p + "_share"] = split[p] / total if total else float("nan")
        out.append(rec)
    return out


def profile_markdown(profile: list[dict]) -> str:
    """Decode time per token of each engine row, split into PARTS: ms and share (a table through report_table)."""
    if not profile:
        return "(no engine rows)\n"
    from .report_table import table

    columns = ["mode", "ms/token", *(p.replace("_", " ") for p in PARTS)]
    rows = [dict(zip(columns, [rec["name"], f"{rec['decode_ms_per_token']:.1f}",
                               *(f"{rec[p + '_ms']:.1f} ({rec[p + '_share']:.0%})" for p in PARTS)]))
            for rec in profile]
    return table(rows, columns)


def torch_profile_step(engine, prompt: list[int], row_limit: int = 15) -> str:
    """Operator table (self time) of one decode step after a prefill, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    it = engine.stream(prompt, 3, stop_tokens=[])
    next(it)  # prefill
    with profile(activities=acts) as prof:
        next(it)  # one decode step
    it.close()
    key = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


def main(argv=None) -> int:
    from . import bench_engine as be
    from .ceilings import measure_ceilings
    from .run import synthetic_prompts

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shares", default="none,0.6,0", help="limits as expert shares; none = every expert resident")
    p.add_argument("--tokens", type=int, default=9)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", default="/tmp/smallthinker_profile")
    p.add_argument("--torch-profiler", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows and the profile here")
    a = p.parse_args(argv)
    ckpt = Path(a.checkpoint)
    scratch = Path(a.scratch)
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    bundle, _ = be.convert_bundle(ckpt, scratch / f"{ckpt.name}-bundle")
    dtype = getattr(torch, cfg.torch_dtype)
    info = be.ModelInfo(ckpt.name, ckpt, cfg, dtype, synthetic_prompts(cfg.vocab_size, a.repeats + 1, a.prompt_tokens),
                        {None: bundle})
    cuda = torch.device(a.device).type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads)
    ceilings = measure_ceilings("cuda" if cuda else "cpu", quick=True, scratch=str(scratch))
    ctx = be.Context(device=a.device, new_tokens=a.tokens, repeats=a.repeats, ceilings=ceilings,
                     models={info.key: info}, scratch=scratch, compute_threads=None if cuda else a.threads,
                     model_threads=None if cuda else a.threads)
    rows = [be.measure_mode(be.ModeSpec("in_memory", info.key, "in memory"), ctx)]
    for s in a.shares.split(","):
        share = None if s.strip() in ("none", "") else float(s)
        variant = "in memory" if share is None else ("no cache" if share == 0 else "full")
        for prefetch in ((True,) if share is None else (True, False)):
            spec = be.ModeSpec("engine", info.key, variant if prefetch else "no prefetch", share,
                               None if share is None else "lru", None if share is None else prefetch)
            rows.append(be.measure_mode(spec, ctx))
    prof = profile_rows(rows)
    print(profile_markdown(prof))
    for r in rows:
        if r.get("error"):
            print("ERROR", r["name"], r["error"])
    if a.torch_profiler:
        from smallthinker_lab.engine import Engine

        with Engine.from_pretrained(ckpt, memory_limit=None, device=a.device, bundle_dir=bundle, exact=True,
                                    compute_threads=None if cuda else a.threads, progress=False) as e:
            print(torch_profile_step(e, info.prompts[0]))
    if a.json:
        Path(a.json).write_text(json.dumps(be.as_jsonable({"rows": rows, "profile": prof}), indent=1))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
