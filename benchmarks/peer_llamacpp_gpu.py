"""llama.cpp's CUDA build as peer rows of the GPU suite (issue 19 item 4), interleaved with the engine's rows:

    python -m benchmarks.run --suite gpu --peer llama.cpp [--only ...]     (benchmarks/gpu_peer_job.sh on the lent GPU)

The suite (benchmarks/run.py) calls :class:`GpuPeer` at five points: made before the checkpoint is written (the CUDA
build starts in a background thread: benchmarks/llamacpp_cuda.py), ``prepare`` before the ceilings (the GGUFs, then
waiting for the build, so that nothing is timed while it compiles), ``plan`` once the modes are known (bf16 and Q4_0:
in memory, one -ncmoe row per engine limit, every expert on the CPU), ``step`` after each engine row (its share of
the llama-bench runs still queued: one per row and round, rounds as the engine's repeats) and ``finish``. The rows
(``peer_rows`` of bench_gpu.json) carry the engine rows' fields; ``peer_ratios`` are engine / llama.cpp at the same
precision and GPU memory, with the issue's targets where they apply. A failed build is ``llama_cpp.reason``.
"""

from __future__ import annotations

import math
import shlex
import shutil
import statistics
import time
from pathlib import Path

from .llamacpp_bin import Peer
from .llamacpp_cuda import (
    BOUND_RULE,
    NCMOE_RULE,
    WORK,
    CudaBuild,
    PeerRow,
    bench_command,
    cuda_memory_used,
    expert_bytes,
    export_bf16,
    plan_rows,
    quantize_q4,
    run_invocation,
)
from .llamacpp_source import ARCHIVE, RECORD

TARGET_IN_MEMORY = 3.0  # issue 19: in memory, engine >= 3x llama.cpp at each precision
TARGET_OFFLOADED = 2.0  # at 60% of expert bytes, >= 2x llama.cpp's best hybrid at the same GPU memory and precision
TARGET_SHARE = 0.6
RESERVE_S = 150.0  # of the suite's budget, kept for the rows once the build is done (GGUF Q4_0, ceilings, rows)


def _copy_tokenizer(ckpt: Path) -> None:
    """llama.cpp needs a vocabulary: the default model's tokenizer files into the synthetic checkpoint (the exporter
    pads the vocabulary to the model's vocab_size), as the CPU peer does."""
    from smallthinker_lab.model.checkpoint import TOKENIZER_FILES

    from .run import TRAINED

    for f in TOKENIZER_FILES:
        if (TRAINED / f).is_file() and not (Path(ckpt) / f).is_file():
            shutil.copy2(TRAINED / f, Path(ckpt) / f)


def _guarded(method):
    """A GpuPeer step that fails keeps the reason (the llama.cpp rows stop there) instead of stopping the suite."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *a, **kw):
        try:
            return method(self, *a, **kw)
        except Exception as e:  # noqa: BLE001
            self.reason = self.reason or f"{method.__name__} failed: {type(e).__name__}: {e}"
            self.log(f"llama.cpp rows stopped: {self.reason}")
            return None

    return wrapper


class GpuPeer:
    """The llama.cpp rows of one GPU suite run. Never raises out of its calls: what fails is kept in ``reason``
    (everything) or in a row's ``error`` (that row)."""

    def __init__(self, args, scratch: Path, log=print, archive: Path = ARCHIVE, record: Path = RECORD,
                 work: Path = WORK, sampler=cuda_memory_used, device: str | None = None) -> None:
        import torch

        self.args, self.scratch, self.log, self.sampler = args, Path(scratch), log, sampler
        self.threads = torch.get_num_threads()  # the engine rows' (the suite sets none on CUDA)
        self.n_prompt, self.n_gen, self.rounds = args.prompt_tokens, args.tokens - 1, args.repeats
        self.rows: list[PeerRow] = []
        self.queue: list[int] = []
        self.peer: Peer | None = None
        self.reason: str | None = None
        self.setup: dict = {}
        self.host_bw: list[float] = []
        self.ggufs: dict = {}
        self.config = None
        self.build = None
        device = device or getattr(args, "device", None) or "cuda"
        if torch.device(device).type != "cuda":
            self.reason = f"the CUDA peer runs with --device cuda (this run: {device})"
        else:
            self.build = CudaBuild(archive, record, work, log=log).start()

    # ------------------------------------------------------------------------------------------ setup
    @_guarded
    def prepare(self, info, deadline: float = math.inf) -> None:
        """The bf16 GGUF (exported while the build compiles), the build waited for, then the Q4_0 GGUF. The build
        is given until ``deadline`` less RESERVE_S (the time the rows need); past that it is stopped, so that the
        engine's rows are timed on a quiet machine."""
        if self.build is None:
            return
        self.config = info.config
        t0 = time.perf_counter()
        bf16 = self.scratch / "llama-bf16.gguf"
        try:
            self.build.source_ready.wait()
            if self.build.src is None:
                raise RuntimeError("no llama.cpp source (see the build's reason)")
            _copy_tokenizer(info.ckpt)
            self.setup["gguf_bf16"] = export_bf16(info.ckpt, bf16, self.build.src / "gguf-py") | {
                "path": str(bf16), "bytes": bf16.stat().st_size}
            self.log(f"llama.cpp GGUF bf16: {self.setup['gguf_bf16']['seconds']:.0f} s, "
                     f"{bf16.stat().st_size / 2**30:.2f} GiB ({self.setup['gguf_bf16']['gguf_module']})")
        except Exception as e:  # noqa: BLE001
            self.reason = f"GGUF export failed: {type(e).__name__}: {e}"
        t1 = time.perf_counter()
        left = deadline - time.perf_counter() - RESERVE_S
        self.peer = self.build.wait(max(0.0, left) if math.isfinite(left) else None)
        self.setup["build"] = self.build.info | {"waited_seconds": time.perf_counter() - t1,
                                                 "prepare_seconds": time.perf_counter() - t0}
        if not self.peer.available:
            self.reason = self.peer.reason
        if self.reason:
            self.log(f"llama.cpp rows not run: {self.reason}")
            return
        self.ggufs["bf16"] = bf16
        q4 = self.scratch / "llama-q4_0.gguf"
        try:
            self.setup["gguf_q4_0"] = quantize_q4(self.peer, bf16, q4, self.threads) | {
                "path": str(q4), "bytes": q4.stat().st_size}
            self.ggufs["q4_0"] = q4
        except Exception as e:  # noqa: BLE001  the Q4_0 rows are error rows, the bf16 rows run
            self.setup["gguf_q4_0_error"] = f"{type(e).__name__}: {e}"
        self.log(f"llama.cpp ready: {self.peer.build.get('version')}")

    @_guarded
    def plan(self, modes, key: str) -> None:
        """The rows for the engine limits among ``modes`` (of the model ``key``) and the queue of their runs."""
        if not self.available or self.config is None:
            return
        shares = {m.share for m in modes if m.mode == "engine" and m.model == key and m.share is not None
                  and not m.routing}
        self.rows = plan_rows(self.config, shares)
        for r in self.rows:
            r.gguf = self.ggufs.get(r.precision)
            if r.gguf is None:
                r.error = f"no {r.precision} GGUF: {self.setup.get('gguf_q4_0_error')}"
        live = [i for i, r in enumerate(self.rows) if not r.error]
        for k in range(self.rounds):  # round-robin, the order rotated by one row per round
            j = k % len(live) if live else 0
            self.queue += live[j:] + live[:j]
        self.log(f"llama.cpp rows: {', '.join(r.name for r in self.rows)}; {len(self.queue)} runs interleaved")

    @property
    def available(self) -> bool:
        return self.reason is None and self.peer is not None and self.peer.available

    # ------------------------------------------------------------------------------------------ runs
    @_guarded
    def step(self, modes_left: int, deadline: float = math.inf) -> None:
        """Its share of the queued runs after an engine row: ceil(queued / (modes left + 1)). Past ``deadline``
        only runs of rows without a sample yet."""
        if not self.queue or not self.available:
            return
        from .peer_llamacpp import read_bandwidth

        self.host_bw.append(read_bandwidth(self.threads))
        n = math.ceil(len(self.queue) / (max(0, modes_left) + 1))
        done = []
        for _ in range(n):
            if not self.queue:
                break
            i = self.queue.pop(0)
            row = self.rows[i]
            if row.error or (time.perf_counter() > deadline and row.decode):
                continue
            try:
                run_invocation(row, self.peer.bench, self.threads, self.n_prompt, self.n_gen, self.sampler)
                done.append(f"{row.name} {row.decode[-1]:.4g}")
            except Exception as e:  # noqa: BLE001  an error row, the others go on
                row.error = f"{type(e).__name__}: {e}"
                self.log(f"  ERROR {row.name}: {row.error}")
        if done:
            self.log("  llama.cpp decode tok/s: " + "; ".join(done))

    def finish(self, deadline: float = math.inf) -> None:
        self.step(0, deadline)

    def close(self) -> None:
        """A build still running when the suite ends (a fatal error before ``prepare``) is stopped."""
        if self.build is not None:
            self.build.stop()

    # ------------------------------------------------------------------------------------------ results
    def status(self) -> dict:
        out = {"available": self.available, "reason": self.reason, "threads": self.threads,
               "build": self.peer.build if self.peer is not None else None, "setup": self.setup,
               "ncmoe_rule": NCMOE_RULE, "bound_rule": BOUND_RULE, "rounds": self.rounds,
               "runs_left": len(self.queue),
               "llama_bench": shlex.join(bench_command("llama-bench", "GGUF", self.threads, self.n_prompt,
                                                       self.n_gen, 0)) + " [-ncmoe N] (one run per row and round, "
                              "spread between the engine's rows; its own warm-up run first)",
               "context_note": "llama-bench's tg test decodes from an empty context, the engine after its prompt: "
                               "at these lengths the KV cache is well under 1% of a token's reads"}
        return out

    def results(self, engine_rows: list[dict], ceilings: dict | None, key: str) -> dict:
        """What the suite writes: ``llama_cpp`` (status, build, setup), ``peer_rows``, ``peer_ratios``."""
        try:
            rows = [summarise(r, self.config, ceilings or {}, self.host_bw, self.threads, self.n_prompt, self.n_gen,
                              key, self.peer.build if self.peer else {}) for r in self.rows]
            return {"llama_cpp": self.status(), "peer_rows": rows, "peer_ratios": ratios(engine_rows, rows, key)}
        except Exception as e:  # noqa: BLE001  the suite's JSON is written all the same
            return {"llama_cpp": {"available": False, "reason": f"results failed: {type(e).__name__}: {e}"}}


def _stat3(xs) -> dict:
    xs = [x for x in xs if x == x]
    if not xs:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def summarise(row: PeerRow, config, ceilings: dict, host_bw: list[float], threads: int, n_prompt: int, n_gen: int,
              key: str, build: dict) -> dict:
    """A peer row in the engine rows' fields (bench_engine._summarise): tok/s min/median/max, precision, GPU
    memory, bytes per token (from HBM; of host memory by the CPU layers' experts) and the share of its bound."""
    from .peer_llamacpp import llama_memory_bytes

    L, N = row.layers, row.ncmoe
    variant = "in memory" if N == 0 else ("all experts on the CPU" if N >= L else f"-ncmoe {N}")
    out = {"name": row.name, "mode": "llama.cpp", "model": key, "device": "cuda", "variant": variant,
           "quantization": "none" if row.precision == "bf16" else row.precision, "precision": row.precision,
           "threads": threads, "prompt_tokens": n_prompt, "decode_tokens": n_gen, "ncmoe": N,
           "matches_engine_limits": list(row.shares), "engine_cache_bytes": dict(row.cache_bytes),
           "memory_limit": math.nan, "repack": row.repack, "notes": list(row.notes), "error": row.error,
           "command": row.commands[0] if row.commands else None, "commands": list(row.commands),
           "build": dict(build) | row.build, "gguf": str(row.gguf) if row.gguf else None}
    if config is not None:
        out["gpu_expert_bytes"] = (L - N) * config.num_experts * expert_bytes(config, row.precision)
        out["limit_share_of_expert_bytes"] = (L - N) / L
    g = _stat3(row.gpu_memory)
    out |= {"gpu_memory_bytes": g["median"], "gpu_memory_bytes_max": g["max"]}
    if row.error or not row.decode or config is None:
        return out
    d3, p3 = _stat3(row.decode), _stat3(row.prefill)
    out |= {"repeats": len(row.decode), "prefill_tok_s": p3["median"], "prefill_tok_s_min": p3["min"],
            "prefill_tok_s_max": p3["max"], "decode_tok_s": d3["median"], "decode_tok_s_min": d3["min"],
            "decode_tok_s_max": d3["max"], "hit_rate": math.nan,
            "link": "none: the CPU layers' experts are computed where they are, in host memory"}
    mem = llama_memory_bytes(config, row.precision, n_gen / 2)  # tg from an empty context
    host = mem["experts"] * N / L
    mem |= {"experts_gpu": mem["experts"] - host, "experts_cpu": host}
    hbm = mem["total"] - host
    bw_hbm = (ceilings.get("hbm_copy") or {}).get("median", math.nan)
    bw_host = statistics.median(host_bw) if host_bw else math.nan
    t_mem, t_io = hbm / bw_hbm, (host / bw_host if host else 0.0)
    measured = 1.0 / out["decode_tok_s"]
    out |= {"memory_bytes_per_token": hbm, "memory_bytes_split": mem, "bytes_read_per_token": 0.0,
            "host_expert_bytes_per_token": host, "t_mem_ms": 1e3 * t_mem, "t_io_ms": 1e3 * t_io,
            "bound_ms": 1e3 * (t_mem + t_io), "measured_ms": 1e3 * measured,
            "bound_share": (t_mem + t_io) / measured, "bw_mem": bw_hbm, "bw_link": bw_host, "bound_rule": BOUND_RULE,
            "host_read_bandwidth": _stat3(host_bw)}
    return out


def _ok(r: dict) -> bool:
    v = r.get("decode_tok_s")
    return not r.get("error") and v is not None and v == v and v > 0


def ratios(engine_rows: list[dict], peer_rows: list[dict], key: str) -> list[dict]:
    """engine / llama.cpp decode (and in memory, prefill) at the same precision and GPU memory: an engine row in
    memory against llama.cpp in memory; at a limit against the -ncmoe row matching it, and against the best
    llama.cpp row that holds no more expert bytes on the GPU (the matching one, or more layers on the CPU)."""
    out = []

    def add(what, e, p, metric, threshold):
        v = e[metric] / p[metric] if e.get(metric) and p.get(metric) else math.nan
        out.append({"what": what, "engine": e["name"], "llama_cpp": p["name"], "metric": metric, "value": v,
                    "engine_value": e.get(metric), "llama_cpp_value": p.get(metric),
                    "engine_memory_limit": e.get("memory_limit"),
                    "llama_cpp_gpu_memory_bytes": p.get("gpu_memory_bytes"),
                    "threshold": threshold,
                    "met": None if threshold is None or v != v else v >= threshold})

    for e in engine_rows:
        if not _ok(e) or e.get("mode") not in ("engine", "in_memory") or e.get("model") != key \
                or e.get("routing") or e.get("instruments") or e.get("quantization") not in ("none", "q4_0"):
            continue
        prec = "bf16" if e["quantization"] == "none" else "Q4_0"
        same = [p for p in peer_rows if _ok(p) and p["quantization"] == e["quantization"]]
        lim = e.get("memory_limit")
        is_engine = e["mode"] == "engine"
        if lim is None or lim != lim:  # in memory
            for p in [p for p in same if p["ncmoe"] == 0]:
                add(f"{prec} in memory: {e['name']} / llama.cpp", e, p, "decode_tok_s",
                    TARGET_IN_MEMORY if is_engine else None)
                add(f"{prec} in memory, prefill: {e['name']} / llama.cpp", e, p, "prefill_tok_s", None)
            continue
        share = e.get("share_target")
        share = e.get("limit_share_of_expert_bytes") if share is None else share
        match = [p for p in same if any(abs(s - share) < 1e-9 for s in p["matches_engine_limits"])]
        if not match:
            continue
        m = match[0]
        add(f"{prec} at {share:.0%} of expert bytes: {e['name']} / llama.cpp -ncmoe {m['ncmoe']} (same expert "
            f"bytes on the GPU)", e, m, "decode_tok_s", None)
        best = max((p for p in same if p["ncmoe"] >= m["ncmoe"]), key=lambda p: p["decode_tok_s"])
        add(f"{prec} at {share:.0%} of expert bytes: {e['name']} / best llama.cpp at no more GPU expert bytes "
            f"(-ncmoe {best['ncmoe']})", e, best, "decode_tok_s",
            TARGET_OFFLOADED if is_engine and abs(share - TARGET_SHARE) < 1e-9 else None)
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _f(x, fmt="{:.3g}") -> str:
    return "–" if x is None or (isinstance(x, float) and x != x) else fmt.format(x)


def render(res: dict, heading: str = "##") -> str:
    """The llama.cpp section of bench_gpu.md (benchmarks/report_table.render_result; empty without --peer)."""
    lc = res.get("llama_cpp")
    if not lc:
        return ""
    out = [f"{heading} llama.cpp (CUDA) beside the engine, same run", ""]
    if not lc.get("available"):
        out.append(f"Not run: {lc.get('reason')}")
        return "\n".join(out) + "\n"
    b = lc.get("build") or {}
    out.append(f"Build: {b.get('version')} (sdist {b.get('sdist')}, llama.cpp {b.get('vendored_llama_cpp_commit')}, "
               f"{' '.join(b.get('cmake_flags') or [])}; {_f(b.get('build_seconds'), '{:.0f}')} s"
               f"{', cached' if b.get('cached') else ''}). {lc.get('threads')} threads, {lc.get('rounds')} rounds "
               f"of `{lc.get('llama_bench')}`.")
    out += ["", f"-ncmoe rule: {lc.get('ncmoe_rule')}. Bound: {lc.get('bound_rule')}.", "",
            "| row | -ncmoe | GPU memory (measured) | decode tok/s median [min, max] | prefill tok/s | HBM MiB/token "
            "| host expert MiB/token | bound share |", "|---|---|---|---|---|---|---|---|"]
    for r in res.get("peer_rows", []):
        if r.get("error"):
            out.append(f"| {r['name']} | {r['ncmoe']} | | ERROR {r['error']} | | | | |")
            continue
        gib = (r.get("gpu_memory_bytes") or math.nan) / 2**30
        hbm = (r.get("memory_bytes_per_token") or math.nan) / 2**20
        host = (r.get("host_expert_bytes_per_token") or 0) / 2**20
        out.append(f"| {r['name']} | {r['ncmoe']} | {_f(gib, '{:.2f} GiB')} | {_f(r.get('decode_tok_s'))} "
                   f"[{_f(r.get('decode_tok_s_min'))}, {_f(r.get('decode_tok_s_max'))}] | {_f(r.get('prefill_tok_s'))} "
                   f"| {_f(hbm, '{:.0f}')} | {_f(host, '{:.0f}')} | {_f(r.get('bound_share'), '{:.2f}')} |")
    ratios_ = res.get("peer_ratios") or []
    if ratios_:
        out += ["", "| engine / llama.cpp | value | target | met |", "|---|---|---|---|"]
        for x in ratios_:
            met = {True: "yes", False: "no"}.get(x.get("met"), "")
            out.append(f"| {x['what']} | {_f(x.get('value'), '{:.2f}')} | {_f(x.get('threshold'))} | {met} |")
    notes = sorted({n for r in res.get("peer_rows", []) for n in r.get("notes") or []})
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
