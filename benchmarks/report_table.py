"""Tables from the benchmark JSON: ``bench_<suite>.md`` beside each result, and the README's Performance table.

    python -m benchmarks.report_table            # regenerate README.md between the bench-table markers

The README section lies between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` (added under a
"## Performance" heading at the end when missing); nothing else in README.md is touched. It is made from
benchmarks/results/bench_<suite>.json for the suites in ``SUITES`` (cpu, cpu_variants, cpu_lookahead, gpu,
gpu_more: a full run and runs of some of its modes, ``--only``, each with a title note), whichever exist.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# bench_<name>.json in benchmarks/results, in README order
SUITES = ("cpu", "cpu_variants", "cpu_lookahead", "gpu", "gpu_more")
# further GPU results in the README: llama.cpp's CUDA build beside the engine, the 4B on replayed trained routing,
# the same peer run on an H100 host (2026-12-07), the 21B shape (each written by benchmarks.run into its own file; the
# commands are in their reports)
GPU_EXTRA = ("gpu_peer", "gpu_peer_h100", "gpu_routing", "gpu_21b")


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _f(x, fmt="{:.3g}", na="") -> str:
    return na if _nan(x) else fmt.format(x)


def label(r: dict) -> str:
    routed = f", trained routing ({r['routing']})" if r.get("routing") else ""
    return _label(r) + routed


def _label(r: dict) -> str:
    q = "" if r.get("quantization") in (None, "none") else f" {r['quantization'].upper()}"
    extra = " + instruments" if r.get("instruments") else ""
    mode = r.get("mode")
    if mode == "in_memory":
        thr = f", {r['threads']} threads" if r.get("threads") and r.get("threads") != 1 else ""
        deq = " (dequantised)" if q else ""
        kern = ", Triton decode kernels (CUDA graph)" if (r.get("options") or {}).get("kernels") else ""
        return f"model in memory{q}{deq}{thr}{kern}{extra}"
    if mode == "engine":
        if r.get("variant") == "default options":
            return f"engine{q}, default options (backend auto: {r.get('backend', '?')}){extra}"
        if r.get("variant") == "in memory":
            thr = f", {r['spec_threads']} compute threads" if r.get("spec_threads") else ""
            opts = r.get("options") or {}
            if opts.get("cuda_graph"):
                thr += ", CUDA graph" + {"fused": " (fused kernels)", "kernels": " (Triton decode kernels)"}.get(
                    opts.get("cuda_graph"), "")
            return f"engine{q}, every expert resident{thr}{extra}"
        share = r.get("limit_share_of_expert_bytes")
        where = "min (top-k slots)" if r.get("variant") == "no cache" else f"{_f(share, '{:.0%}')}"
        pf = "prefetch" if r.get("prefetch") else "no prefetch"
        link = ""
        if r.get("device") == "cuda":
            link = ", from storage" if r.get("host_cache_override") is False else ", pinned host copy"
        opts = r.get("options") or {}
        if opts.get("lookahead"):
            link += " + look-ahead" + (" (early)" if opts.get("lookahead") == "early" else "")
        if opts.get("verify_checksums") is False:
            link += ", no checksums"
        if opts.get("cuda_graph") == "kernels":
            link += ", Triton decode kernels"
            if r.get("device_lru"):
                link += ", LRU on the GPU"
        if r.get("spec_threads"):
            link += f", {r['spec_threads']} compute threads"
        return f"engine{q} {where} {(r.get('policy') or '').upper()} {pf}{link}{extra}"
    return {"accelerate_disk_offload": "accelerate disk_offload", "accelerate_cpu_offload": "accelerate cpu_offload",
            "accelerate_device_map": "accelerate device_map (same limit)"}.get(mode, str(mode)) + q + extra


def _gib(x) -> str:
    return "none" if _nan(x) else f"{x / 2**30:.2f} GiB"


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (column -> text; a missing cell is empty, other keys are left out),
    laid out by ``DataFrame.to_markdown`` (smallthinker_lab.analysis.tables.to_markdown); '' without rows."""
    if not rows:
        return ""
    from smallthinker_lab.analysis.tables import to_markdown

    return to_markdown(pd.DataFrame(rows, columns=columns, dtype=object), index=False)


def _error_row(first: tuple[str, str], r: dict, where: str, text: str) -> dict:
    """A row that failed: its name (``first``: column, text), threads and memory limit, ``text`` in ``where``."""
    return {first[0]: first[1], "threads": str(r.get("threads")), "memory limit": _gib(r.get("memory_limit")),
            where: text}


ROWS_COLUMNS = ["mode", "memory limit", "expert share", "prefill tok/s", "decode tok/s (min-max)",
                "vs best in memory", "decode hit rate", "MiB read/token", "memory MiB/token", "T_mem ms", "T_io ms",
                "measured ms", "share of bound"]


def rows_table(rows: list[dict], model: str) -> str:
    sub = [r for r in rows if r.get("model") == model]
    if not sub:
        return ""
    mem = [r["decode_tok_s"] for r in sub if not r.get("error") and r.get("variant") == "in memory"
           and r.get("quantization") in (None, "none") and not r.get("instruments") and r.get("decode_tok_s")
           and not r.get("routing")]
    best = max(mem) if mem else float("nan")
    out = []
    for r in sub:
        if r.get("error"):
            out.append(_error_row(("mode", label(r)), r, "decode tok/s (min-max)", f"ERROR: {r['error'][:90]}"))
            continue
        out.append(dict(zip(ROWS_COLUMNS, [
            label(r), _gib(r.get("memory_limit")), _f(r.get("limit_share_of_expert_bytes"), "{:.0%}"),
            _f(r.get("prefill_tok_s")),
            f"{_f(r.get('decode_tok_s'))} ({_f(r.get('decode_tok_s_min'))}-{_f(r.get('decode_tok_s_max'))})",
            _f(r["decode_tok_s"] / best if best == best else None, "{:.2f}"), _f(r.get("hit_rate"), "{:.2f}"),
            _f((r.get("bytes_read_per_token") or 0) / 2**20, "{:.0f}"),
            _f((r.get("memory_bytes_per_token") or 0) / 2**20, "{:.0f}"), _f(r.get("t_mem_ms"), "{:.1f}"),
            _f(r.get("t_io_ms"), "{:.1f}"), _f(r.get("measured_ms"), "{:.1f}"), _f(r.get("bound_share"), "{:.0%}")])))
    return table(out, ROWS_COLUMNS)


def verdict_table(items: list[dict], name: tuple[str, str], value: tuple[str, str], threshold: str) -> str:
    """Figures against their thresholds, one a row (the targets; the ratios to llama.cpp): ``name`` = (header, key
    of the item), ``value`` = (header, format), ``threshold`` its header, then whether it is met (yes, **no**, or
    n/a when it could not be judged)."""
    met = {None: "n/a", True: "yes", False: "**no**"}
    rows = [{name[0]: x[name[1]], value[0]: _f(x.get("value"), value[1]), threshold: str(x["threshold"]),
             "met": met[None if x.get("met") is None else bool(x["met"])]} for x in items]
    return table(rows, [name[0], value[0], threshold, "met"])


def ceilings_line(c: dict) -> str:
    parts = [f"memory copy {c['memory_copy']['median'] / 1e9:.1f} GB/s (read+write)",
             f"storage read {c['storage_read']['median'] / 1e9:.2f} GB/s sequential ({c['storage_read'].get('mode')})"]
    if c.get("expert_reads"):
        parts.append(f"{c['expert_reads']['median'] / 1e9:.2f} GB/s expert-record reads, 4 threads")
    if c.get("hbm_copy"):
        parts.append(f"HBM copy {c['hbm_copy']['median'] / 1e9:.0f} GB/s")
    if c.get("host_to_gpu"):
        h = c["host_to_gpu"]
        parts.append(f"host-to-GPU pinned {h.get('max', h['median']) / 1e9:.1f} GB/s (fastest of {h['n']} copies; "
                     f"median {h['median'] / 1e9:.1f})")
    if c.get("matmul_bf16_gpu"):
        parts.append(f"bf16 matmul {c['matmul_bf16_gpu']['median'] / 1e12:.0f} TFLOP/s")
    else:
        parts.append(f"bf16 matmul {c['matmul_bf16_cpu']['median'] / 1e9:.0f} GFLOP/s")
    return "; ".join(parts)


def render_result(res: dict, heading_level: int = 2, compact: bool = False) -> str:
    """The markdown report of one result JSON (``compact``: no profile, skipped list or settings paragraph)."""
    from .profile_decode import profile_markdown
    from .trained_routing import routing_table

    h = "#" * heading_level
    m = res.get("machine", {})
    s = res.get("settings", {})
    out = [f"{h} Benchmark `{res.get('suite')}`{' (dry run)' if res.get('dry_run') else ''}"
           f"{' - ' + res['title_note'] if res.get('title_note') else ''}: "
           f"{m.get('gpu') or m.get('cpu')}, {res.get('created')}\n"]
    v = res.get("versions", {})
    out.append(f"torch {v.get('torch')}, accelerate {v.get('accelerate')}, python {v.get('python')}, commit "
               f"{(v.get('git_commit') or '')[:10]}; {m.get('cores')} cores; wall {res.get('wall_seconds', 0):.0f} s"
               f"{'; PARTIAL' if res.get('partial') else ''}.\n")
    if res.get("fatal"):
        out.append(f"**FATAL**: {res['fatal']}\n")
    if res.get("ceilings"):
        out.append(f"Ceilings measured in this run: {ceilings_line(res['ceilings'])}.\n")
    if s and not compact:
        out.append(f"Prompt {s.get('prompt_tokens')} tokens, {s.get('decode_steps')} decode steps, up to "
                   f"{s.get('repeats')} timed repeats per mode (each on a new prompt, after a check run); trained "
                   f"model: prompt {s.get('trained_prompt_tokens')}, {s.get('trained_new_tokens', 1) - 1} decode "
                   f"steps. Page cache bypassed: {s.get('bypass_page_cache')}. {s.get('check')}.\n")
    for key, info in (s.get("models") or {}).items():
        out.append(f"{h}# {key}: {info['description']}; routing {info['routing']}\n")
        out.append(rows_table(res.get("rows", []), key))
        table = routing_table(res.get("rows", []), key)
        if table:
            tr = (res.get("setup") or {}).get("trained_routing") or {}
            rule = next(iter(tr.get("domains", {}).values()), {}).get("mapping", "")
            out.append(f"{h}# {key}: synthetic uniform routing vs trained routing\n")
            out.append(f"Trained routing: {tr.get('source', 'the trained model')}'s routing recorded per prompt set "
                       f"and replayed ({rule}). No peer can be fed this routing (llama.cpp has no forced-routing "
                       f"hook): these rows are compared with the engine's own in-memory row under the same replay. Hit "
                       f"rates and bytes per token are exact counts; decode tok/s and the shares of the bound are "
                       f"timings of the machine named above.\n")
            out.append(table)
    out.append(f"{h}# Targets\n")
    out.append(verdict_table(res.get("targets", []), ("target", "target"), ("value", "{:.3g}"), "threshold"))
    if res.get("llama_cpp"):  # --suite gpu --peer llama.cpp: its rows and ratios (benchmarks/peer_llamacpp_gpu.py)
        from .peer_llamacpp_gpu import render as render_llama_cpp

        out.append(render_llama_cpp(res, heading=f"{h}#"))
    if compact:
        return "\n".join(out) + "\n"
    out.append(f"{h}# Decode time per token (engine clocks; ms and share)\n")
    out.append(profile_markdown(res.get("profile", [])))
    if res.get("skipped"):
        out.append(f"Skipped for the time budget: {', '.join(x['name'] for x in res['skipped'])}.\n")
    errs = [r for r in res.get("rows", []) if r.get("error")]
    if errs:
        out.append(f"{h}# Errors\n")
        out += [f"- {r.get('name')}: {r['error']}" for r in errs]
        out.append("")
    return "\n".join(out) + "\n"


def plot_decode(res: dict, model: str, path: str | Path) -> Path | None:
    """Decode tokens/s of every row of ``model`` (smallthinker_lab.analysis.plots.plot_throughput), coloured by ablation
    variant, annotated with the share of the bound, with the min-max range over the row's repeats; rows sorted by
    memory limit (in memory first, then the largest share of the expert bytes); a PNG at ``path``."""
    rows = [r for r in res.get("rows", []) if r.get("model") == model and not r.get("error") and r.get("decode_tok_s")]
    if not rows:
        return None

    def limit_share(r: dict) -> float:
        if r.get("mode") == "in_memory" or r.get("variant") == "in memory":
            return float("inf")
        share = r.get("limit_share_of_expert_bytes")
        return float(share) if share is not None else float("-inf")

    rows = sorted(rows, key=limit_share, reverse=True)  # stable: the suite's order within one limit
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smallthinker_lab.analysis.plots import plot_throughput

    df = pd.DataFrame({"mode": [label(r) for r in rows], "variant": [r.get("variant") for r in rows],
                       "decode_tok_s": [r["decode_tok_s"] for r in rows],
                       "decode_tok_s_min": [r.get("decode_tok_s_min", r["decode_tok_s"]) for r in rows],
                       "decode_tok_s_max": [r.get("decode_tok_s_max", r["decode_tok_s"]) for r in rows],
                       "bound_share": [r.get("bound_share") for r in rows]})
    _, ax = plt.subplots(figsize=(11, 1.2 + 0.42 * len(df)), layout="constrained")
    plot_throughput(df, ax=ax, mode="variant", sort=False)
    leg = ax.get_legend()
    if leg is not None:  # outside the bars and their annotations
        ax.legend(handles=leg.legend_handles, title="variant", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False, fontsize="small")
    m = res.get("machine", {})
    reps = sorted({int(r["repeats"]) for r in rows if r.get("repeats")})
    rep = f"; error bars: min-max over {'/'.join(map(str, reps))} repeats" if reps else ""
    ax.set_title(f"{model} on {res.get('device')} ({m.get('gpu') or m.get('cpu')})\ndecode tokens/s and share of "
                 f"the bound max(T_mem, T_io)\nsorted by memory limit (in memory first){rep}", fontsize="medium")
    path = Path(path)
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)
    return path


PEER_COLUMNS = ["row", "threads", "memory limit", "prefill tok/s (min-max)", "prefill share of bound",
                "decode tok/s (min-max)", "memory MiB/token", "read GB/s", "T_mem ms", "measured ms", "share of bound",
                "check"]


def peer_rows_table(rows: list[dict]) -> str:
    """The peer comparison's rows (benchmarks/peer_llamacpp.py): every figure with its bound."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append(_error_row(("row", r["name"]), r, "decode tok/s (min-max)", r["error"][:110]))
            continue
        check = (r.get("checked") or "").split(" (")[0] if r.get("mode") == "engine" else (
            "--repack 0" if r.get("repack") is False else "")
        peaks, hits = r.get("cgroup_max_usage_in_bytes"), r.get("cgroup_failcnt")
        if peaks:  # did the limit bind? (peak charge of the group, times it hit the limit)
            check += (f"{'; ' if check else ''}cgroup peak {max(peaks) / 2**30:.2f} GiB, limit hit "
                      f"{max(hits or [0]):,} times" + ("" if max(hits or [0]) else " (the file fit: in memory)"))
        out.append(dict(zip(PEER_COLUMNS, [
            r["name"], str(r.get("threads")), _gib(r.get("memory_limit")),
            f"{_f(r.get('prefill_tok_s'))} ({_f(r.get('prefill_tok_s_min'))}-{_f(r.get('prefill_tok_s_max'))})",
            _f(r.get("prefill_bound_share"), "{:.0%}"),
            f"{_f(r.get('decode_tok_s'))} ({_f(r.get('decode_tok_s_min'))}-{_f(r.get('decode_tok_s_max'))})",
            _f((r.get("memory_bytes_per_token") or 0) / 2**20, "{:.0f}"), _f((r.get("bw_mem") or 0) / 1e9, "{:.1f}"),
            _f(r.get("t_mem_ms"), "{:.1f}"), _f(r.get("measured_ms"), "{:.1f}"), _f(r.get("bound_share"), "{:.0%}"),
            check])))
    return table(out, PEER_COLUMNS)


def render_peer(res: dict, heading_level: int = 2, compact: bool = False) -> str:
    """The markdown report of bench_cpu_peer.json (llama.cpp beside the engine)."""
    h = "#" * heading_level
    m, s, lc = res.get("machine", {}), res.get("settings", {}), res.get("llama_cpp", {})
    v = res.get("versions", {})
    out = [f"{h} Benchmark `cpu --peer llama.cpp`{' (dry run)' if res.get('dry_run') else ''}: {m.get('cpu')}, "
           f"{res.get('created')}\n",
           f"torch {v.get('torch')}, commit {(v.get('git_commit') or '')[:10]}; {m.get('cores')} cores; load average "
           f"{res.get('load_before')} before, {res.get('load_after')} after; wall {res.get('wall_seconds', 0):.0f} s"
           f"{'; PARTIAL' if res.get('partial') else ''}.\n"]
    if lc.get("available"):
        b = lc.get("build", {})
        out.append(f"llama.cpp: `{b.get('version')}`, built from {b.get('sdist', '?')} (sha256 "
                   f"{(b.get('sdist_sha256') or '?')[:12]}), vendored llama.cpp commit "
                   f"{b.get('vendored_llama_cpp_commit', '?')}, flags {' '.join(b.get('cmake_flags') or [])}.\n")
    else:
        out.append(f"llama.cpp: **unavailable**: {lc.get('reason')}.\n")
    if res.get("fatal"):
        out.append(f"**FATAL**: {res['fatal']}\n")
    if s:
        model = s.get("model", {})
        out.append(f"Model: {model.get('description')}. Prompt {s.get('prompt_tokens')} tokens (pp"
                   f"{s.get('prompt_tokens')}), {s.get('decode_tokens')} decode tokens (tg{s.get('decode_tokens')}), "
                   f"{s.get('rounds')} rounds in memory, {s.get('limited_rounds')} under the limit. "
                   f"{s.get('interleaving')}. Memory cgroup: {s.get('memory_cgroup')}. {s.get('repack')}.\n")
        if s.get("shape_note"):
            out.append(f"Shape: {s['shape_note']}.\n")
        if not compact:
            out.append(f"llama.cpp rows: `{s.get('llama_bench')}`. Engine rows: {s.get('engine')}.\n")
    out.append("Bound of a decode figure: bytes read from memory per token / read bandwidth measured at the row's "
               "thread count in the same rounds (T_mem); share = T_mem / measured time. Prefill: every weight the "
               "prompt touches read once / the same bandwidth.\n")
    out.append(peer_rows_table(res.get("rows", [])))
    out.append(f"{h}# Ratios\n")
    out.append(verdict_table(res.get("ratios", []), ("engine / llama.cpp, same run", "what"),
                              ("ratio (medians)", "{:.2f}"), "target"))
    return "\n".join(out) + "\n"


def readme_section() -> str:
    parts = ["Generated by `python -m benchmarks.report_table` from `benchmarks/results/bench_*.json` "
             "(`python -m benchmarks.run --suite cpu|gpu`). The bound, as in the project's performance reference: "
             "T_mem = bytes read from memory per token / measured memory (HBM) bandwidth, T_io = bytes read from "
             "storage (copied host-to-GPU) per token / measured link bandwidth, share of bound = max(T_mem, T_io) / "
             "measured time per token.\n"]
    found = False
    for suite in SUITES:
        f = RESULTS / f"bench_{suite}.json"
        if f.exists():
            found = True
            parts.append(render_result(json.loads(f.read_text(encoding="utf-8")), heading_level=3, compact=True))
            parts.append(f"Full report (settings, decode-time profile, skipped modes): `benchmarks/results/"
                         f"bench_{suite}.md`.\n")
    for name in GPU_EXTRA:
        f = RESULTS / f"bench_{name}.json"
        if f.exists():
            found = True
            parts.append(render_result(json.loads(f.read_text(encoding="utf-8")), heading_level=3, compact=True))
            parts.append(f"Full report: `benchmarks/results/bench_{name}.md`.\n")
    peer = RESULTS / "bench_cpu_peer.json"
    if peer.exists():
        found = True
        parts.append(render_peer(json.loads(peer.read_text(encoding="utf-8")), heading_level=3, compact=True))
        parts.append("Full report: `benchmarks/results/bench_cpu_peer.md` (`python -m benchmarks.run --suite cpu "
                     "--peer llama.cpp`).\n")
    if not found:
        parts.append("No benchmark results yet.\n")
    return "\n".join(parts)


def update_readme(readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    block = f"{START}\n{readme_section()}\n{END}"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        if "## Performance" not in text:
            text = text.rstrip("\n") + "\n\n## Performance\n"
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    for suite in SUITES:
        f = RESULTS / f"bench_{suite}.json"
        if f.exists():
            res = json.loads(f.read_text(encoding="utf-8"))
            (RESULTS / f"bench_{suite}.md").write_text(render_result(res), encoding="utf-8")
            for key in (res.get("settings") or {}).get("models", {}):
                plot_decode(res, key, RESULTS / f"bench_{suite}_{key}.png")
    update_readme()
    print(f"updated {README}", file=sys.stderr)
