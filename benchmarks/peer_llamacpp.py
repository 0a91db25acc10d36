"""llama.cpp as a peer row of the CPU benchmark: what SmallThinker's users run instead, measured in the same run.

    python -m benchmarks.run --suite cpu --peer llama.cpp [--layers 8] [--rounds 5] [--build-peer]

Locates ``llama-bench`` (``$LLAMA_CPP_DIR``, then the cache ``~/.cache/smallthinker-lab/llama.cpp``) or, with
``--build-peer``, builds it there from the llama.cpp vendored in the pinned sdist ``llama-cpp-python==0.3.36``
(CPU, ``-DGGML_NATIVE=ON``, targets llama-bench and llama-quantize, ``nice -n 19``, ``-j2``). Writes one synthetic
checkpoint (the 4B's per-layer shape, ``--layers`` of its 32 layers) as GGUF through the project's exporter
(bf16 and Q4_0), and times, round-robin so that every row sees the same machine: llama.cpp bf16 and Q4_0 (decode
tg N and prefill pp P, ``--repack 0`` for Q4_0: this build segfaults in its CPU weight repacking) beside the engine
in memory in bf16, q4_0 (ggml blocks, dequantised per product) and q4_0_cpu (torch's int4 kernel), at each thread
count; then, where a memory cgroup can be made, llama.cpp bf16 mmap'ed in a cgroup of the engine's 60% limit with
the page cache dropped, beside the engine under that limit. Every figure carries its bound: bytes read per token /
read bandwidth measured at the same thread count in the same rounds. Results: ``bench_cpu_peer.json`` / ``.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import bench_engine as be
from .llamacpp_bin import (  # noqa: F401  (re-exported: the peer's binaries and llama-bench's output)
    BENCH_KEYS,
    CACHE,
    CMAKE_FLAGS,
    SDIST,
    TARGETS,
    Peer,
    _bin_dirs,
    _vendored_commit,
    build,
    build_id,
    locate,
    parse_llama_bench,
    split_tests,
)

# ---------------------------------------------------------------------------------------------- memory cgroups
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
REPACK_NOTE = ("llama-bench runs Q4_0 with --repack 0: this build (llama.cpp vendored in llama-cpp-python 0.3.36) "
               "segfaults in its CPU weight repacking of Q4_0 on the development machines")


@contextlib.contextmanager
def memory_cgroup(limit: int, name: str | None = None, root: Path = CGROUP_ROOT):
    """A cgroup v1 memory group of ``limit`` bytes; yields its folder (write a pid into ``tasks`` to put a process
    in it); removed afterwards. Raises OSError (with the reason) where it cannot be made."""
    cg = Path(root) / (name or f"smallthinker-peer-{os.getpid()}")
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(int(limit)))
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:  # tasks still exiting
                time.sleep(0.1)


def cgroup_unavailable(root: Path = CGROUP_ROOT) -> str | None:
    """Why a memory cgroup cannot be made here (None: it can)."""
    if not (Path(root) / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {root}"
    try:
        with memory_cgroup(2**30, f"smallthinker-probe-{os.getpid()}", root):
            pass
    except OSError as e:
        return f"cannot create a memory cgroup under {root}: {e}"
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "cannot drop the page cache (/proc/sys/vm/drop_caches not writable: not root)"
    return None


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_llama_bench(peer: Peer, model: Path, threads: int, n_prompt: int, n_gen: int, repetitions: int = 1,
                    repack: bool = True, cgroup: Path | None = None, timeout: float = 600) -> dict:
    """One llama-bench invocation (a pp test and a tg test); returns the parsed tests, their tok/s and, in a
    cgroup, the group's peak memory and limit hits."""
    cmd = [str(peer.bench), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repetitions), "-o", "json", "--repack", "1" if repack else "0"]
    if cgroup is not None:  # the shell joins the group, then becomes llama-bench
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/tasks" && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or "").strip().splitlines()[-3:]
        why = {-11: "segfault", -9: "killed: out of memory in its cgroup" if cgroup else "killed"}.get(r.returncode, "")
        raise RuntimeError(f"llama-bench exited with {r.returncode} ({why}): {' / '.join(tail)}")
    tests = parse_llama_bench(r.stdout)
    out = {"tests": tests, "wall_seconds": time.perf_counter() - t0} | split_tests(tests)
    if cgroup is not None:
        for k in ("max_usage_in_bytes", "failcnt"):
            f = cgroup / f"memory.{k}"
            out[f"cgroup_{k}"] = int(f.read_text()) if f.exists() else None
    return out


# ---------------------------------------------------------------------------------------------- bounds
def read_bandwidth(threads: int, nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Bytes read per second summing a float32 tensor with ``threads`` torch threads (the best of ``repeats``)."""
    x = torch.ones(nbytes // 4)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.sum()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return nbytes / best


def llama_memory_bytes(config, quantization: str, context: float) -> dict:
    """Bytes one llama.cpp decode token reads: as ``decode_memory_bytes``, with every matrix (attention, experts,
    the tied embedding / LM head) in Q4_0 (18 bytes per 32 weights) for the Q4_0 file, the routers and norms in
    F32 (as the exporter writes them), the KV cache in f16 (llama.cpp's default)."""
    item = 18 / 32 if quantization == "q4_0" else 2
    c = config
    expert = 3 * c.moe_ffn_hidden_size * c.hidden_size * item
    mem = be.decode_memory_bytes(c, item, expert, context)
    kv = be.decode_memory_bytes(c, 2, expert, context)["kv"]
    router_extra = c.num_hidden_layers * c.num_experts * c.hidden_size * (4 - item)  # F32 routers
    mem["resident"] += router_extra
    mem["kv"] = kv
    mem["total"] = mem["resident"] + mem["kv"] + mem["experts"]
    return mem


def bound_fields(memory_bytes: float, link_bytes: float, bw_read: float, bw_link: float, tok_s: float) -> dict:
    t_mem = memory_bytes / bw_read
    t_io = link_bytes / bw_link if bw_link else 0.0
    bound, measured = max(t_mem, t_io), 1.0 / tok_s if tok_s else math.nan
    return {"t_mem_ms": 1e3 * t_mem, "t_io_ms": 1e3 * t_io, "bound_ms": 1e3 * bound, "measured_ms": 1e3 * measured,
            "bound_share": bound / measured if measured == measured else math.nan, "bw_mem": bw_read,
            "bw_link": bw_link, "bound_bandwidth": "memory read (sum over 256 MiB) at the row's thread count, median "
                                                  "of the rounds"}


def _stat3(xs) -> dict:
    return be._stat3(list(xs))


def prefill_bound(config, memory: dict, expert_nbytes: float, n_prompt: int, bw_read: float, tok_s: float) -> dict:
    """Prefill's memory bound: every weight the prompt touches read once (the resident weights and the experts
    that ``n_prompt`` tokens route to, expected under uniform routing) / read bandwidth. Prefill is mostly compute:
    the share says how far from the weight-reading floor, not from the FLOP ceiling."""
    c = config
    touched = c.num_experts * (1 - (1 - c.top_k / c.num_experts) ** n_prompt)
    nbytes = memory["resident"] + c.num_hidden_layers * touched * expert_nbytes
    t = nbytes / bw_read
    return {"prefill_bytes": nbytes, "prefill_bound_ms": 1e3 * t,
            "prefill_bound_share": (t / (n_prompt / tok_s)) if tok_s else math.nan}


# ---------------------------------------------------------------------------------------------- the run
ENGINE_FORMATS = (None, "q4_0", "q4_0_cpu")  # bf16 as stored, ggml Q4_0 (dequantised per product), torch int4
LLAMA_FORMATS = ("bf16", "q4_0")


@dataclass
class Row:
    """One timed configuration and what it collected over the rounds."""

    name: str
    kind: str  # "engine" | "llama.cpp"
    quantization: str | None
    threads: int
    limit: int | None = None
    runner: object = None
    spec: object = None
    gguf: Path | None = None
    runs: list = field(default_factory=list)  # engine: generate() outputs
    prefill: list = field(default_factory=list)  # llama.cpp: tok/s per invocation
    decode: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    error: str | None = None


def setup_model(args, log) -> be.ModelInfo:
    """The synthetic checkpoint (``--layers`` of the 4B's 32, its per-layer shape) with the default model's
    tokenizer (llama.cpp needs a vocabulary; the exporter pads it to the model's vocab_size), and its bundles."""
    from smallthinker_lab.model.checkpoint import TOKENIZER_FILES

    from .run import TRAINED, synthetic_prompts

    scratch = Path(args.scratch)
    n = args.layers
    if args.dry_run:  # the tiny test preset, with the tokenizer's vocabulary
        preset, over = "smallthinker-test", {"vocab_size": 8192}
    else:
        preset, over = "smallthinker-4b-a0.6b", {"num_hidden_layers": n, "rope_layout": [1] * n,
                                                 "sliding_window_layout": [0] * n}
    t0 = time.perf_counter()
    ckpt, spec = be.make_synthetic(scratch / "synthetic", preset, dtype="bfloat16", seed=0, attn_out_scale=0.1,
                                   reuse=True, **over)
    for f in TOKENIZER_FILES:
        if (TRAINED / f).is_file() and not (ckpt / f).is_file():
            shutil.copy2(TRAINED / f, ckpt / f)
    log(f"synthetic checkpoint {preset} {over if not args.dry_run else ''}: {time.perf_counter() - t0:.0f} s")
    cfg = be.SmallThinkerConfig.from_json(ckpt / "config.json")
    bundles = {}
    for q in ENGINE_FORMATS:
        if q == "q4_0" and _native():  # the native kernel's q4_0x8 records, down in the model's layout
            out, secs = be.convert_bundle(ckpt, scratch / "bundle-q4_0x8-native", "q4_0x8", down_transposed=False)
        else:
            out, secs = be.convert_bundle(ckpt, scratch / f"bundle-{q or 'bf16'}", q)
        bundles[q] = out
        log(f"bundle {q or 'bf16'}: {secs:.0f} s")
    prompts = synthetic_prompts(cfg.vocab_size, args.rounds + 1, args.prompt_tokens)
    desc = (f"synthetic {preset}, bf16, random weights (seed 0), attention output projections x0.1"
            + ("" if args.dry_run else f"; {n} of the 4B's 32 layers (per-layer shape of the 4B)"))
    return be.ModelInfo("peer-synthetic", ckpt, cfg, torch.bfloat16, prompts, bundles, description=desc,
                        routing="synthetic (close to uniform)")


def export_ggufs(info: be.ModelInfo, scratch: Path, log) -> dict:
    """The checkpoint as GGUF (bf16 and Q4_0) through the project's exporter; reused when newer than it."""
    import warnings

    from smallthinker_lab.model.gguf_export import export_gguf

    out = {}
    src = info.ckpt / "model.safetensors"
    for kind in LLAMA_FORMATS:
        path = scratch / f"model-{kind}.gguf"
        if not path.is_file() or (src.exists() and path.stat().st_mtime < src.stat().st_mtime):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the layout notes: llama.cpp's timing does not depend on them
                export_gguf(info.ckpt, path, kind, progress=False)
            log(f"GGUF {kind} (smallthinker_lab export_gguf): {time.perf_counter() - t0:.0f} s, "
                f"{path.stat().st_size / 2**30:.2f} GiB")
        out[kind] = path
    return out


def _reference_tokens(info: be.ModelInfo, quant: str | None, threads: int, n: int) -> list[int]:
    """The in-memory model's greedy tokens on the weights the engine row computes with: its experts dequantised
    from the row's bundle and, for the CPU kernel formats (whose engines quantize the LM head too,
    ``lm_head_format="auto"``), its LM head dequantised from the same copy; where the engine runs its attention in
    Q4_0 (``attention_format="auto"`` with the native q4_0 head) the q/k/v/o weights dequantised from the same
    Q4_0 bytes."""
    runner = be.ModelRunner(info, "cpu", threads, info.bundles[quant] if quant else None,
                            lm_head_format=_head_format(quant), attention_format=_attention_format(quant, info.config))
    try:
        return runner.generate(info.prompts[0], n)["tokens"]
    finally:
        runner.close()


def _first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _native() -> bool:
    """Whether the engine's native Q4_0 kernel is built here: then the q4_0 rows run it (exact=False, a bundle with
    down in the model's layout, the LM head in q4_0 too); else they dequantise per product (exact=True)."""
    from smallthinker_lab.engine import native

    return native.available()


def _q4_0_what() -> str:
    return ("Q4_0 (ggml blocks, 8 rows interleaved: native Q4_0 x Q8_0 kernel)" if _native()
            else "Q4_0 (ggml blocks, dequantised per product)")


def _head_format(quantization: str | None) -> str | None:
    """The LM head format of an engine row (the default lm_head_format="auto": the kernel formats' own, q4_0 with
    the native kernel)."""
    from smallthinker_lab.engine.quant import KERNEL_FORMATS

    if quantization == "q4_0" and _native():
        return "q4_0"
    return quantization if quantization in KERNEL_FORMATS else None


def _attention_format(quantization: str | None, config) -> str | None:
    """The attention format of an engine row (the default attention_format="auto": "q4_0" with the native q4_0
    LM head, engine/attention_quant.py)."""
    import torch

    from smallthinker_lab.engine.attention_quant import resolve_format

    return resolve_format("auto", _head_format(quantization), torch.device("cpu"), False, config)


def _engine_options(quantization: str | None) -> dict:
    """The CPU kernel formats run torch's int4 / int8 kernels and q4_0 the native kernel, which the engine allows
    only with exact=False."""
    from smallthinker_lab.engine.quant import KERNEL_FORMATS

    return {"exact": False} if quantization in KERNEL_FORMATS or (quantization == "q4_0" and _native()) else {}


def _open_engine(row: Row, info, ctx, refs: dict, log) -> None:
    spec = be.ModeSpec("engine", info.key, "in memory" if row.limit is None else "full",
                       share=None if row.limit is None else 0.6, policy="lru", prefetch=True,
                       quantization=row.quantization, threads=row.threads, options=_engine_options(row.quantization))
    row.spec = spec
    row.runner = be.EngineRunner(info, ctx, spec, row.limit)
    tokens = row.runner.generate(info.prompts[0], ctx.new_tokens)["tokens"]
    diff = _first_difference(tokens, refs[row.quantization])
    attention = row.runner.engine.state.attention_format
    if attention != _attention_format(row.quantization, info.config):  # the reference holds what the row runs
        raise RuntimeError(f"{row.name}: the engine runs attention_format={attention!r}, its reference model "
                           f"{_attention_format(row.quantization, info.config)!r}")
    parts = [w for w, on in (("experts", row.quantization is not None), ("LM head", _head_format(row.quantization)),
                             ("attention", attention is not None)) if on]
    weights = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
    if diff is None:
        row.extra["checked"] = ("greedy tokens equal to the in-memory model's (same weights" +
                                (f"; dequantised: {weights})" if weights else ")"))
    elif row.quantization == "q4_0_cpu":  # the int4 kernel: bf16 scales and activations (engine/quant.py)
        row.extra["checked"] = (f"greedy tokens differ from the model on the same dequantised weights (experts and "
                                f"LM head) from position {diff} of {len(tokens)} (int4 kernel: bf16 activations, "
                                f"fp32 accumulation in another order)")
    elif row.quantization == "q4_0" and _native():  # activations rounded to Q8_0 per block, as llama.cpp does
        row.extra["checked"] = (f"greedy tokens differ from the model on the same dequantised weights ({weights}) "
                                f"from position {diff} of {len(tokens)} (native Q4_0 kernel: activations "
                                f"rounded to 8 bits per block of 32, as llama.cpp's Q4_0 x Q8_0)")
    else:
        raise be.TokensDiffer(f"{row.name}: tokens differ from the in-memory model's at position {diff}")
    if _head_format(row.quantization) is not None:
        head = row.runner.engine.state.lm_head_quant
        row.extra["lm_head"] = (f"{head.fmt} ({head.nbytes / 2**20:.0f} MiB, {head.source} in "
                                f"{head.open_seconds:.1f} s), through the same kernel as the experts; the reference "
                                f"model's head holds its dequantised weights")
    if attention is not None:
        a = row.runner.engine.state.attention_quant
        row.extra["attention"] = (f"{a['format']} ({a['nbytes'] / 2**20:.1f} MiB, {a['source']} in "
                                  f"{a['open_seconds']:.1f} s), q/k/v fused in one call and o through the same "
                                  f"kernel; the reference model holds the dequantised projections")
    log(f"  opened {row.name}: {row.extra['checked']}")


def _llama_round(row: Row, peer: Peer, args, cgroup_ok: bool) -> None:
    repack = row.quantization != "q4_0"
    if row.limit is None:
        out = run_llama_bench(peer, row.gguf, row.threads, args.prompt_tokens, args.tokens - 1, 1, repack)
    else:
        drop_page_cache()
        with memory_cgroup(row.limit) as cg:
            out = run_llama_bench(peer, row.gguf, row.threads, args.prompt_tokens, args.tokens - 1, 1, repack, cg)
        for k in ("cgroup_max_usage_in_bytes", "cgroup_failcnt"):
            row.extra.setdefault(k, []).append(out.get(k))
    row.prefill += out["prefill"]
    row.decode += out["decode"]
    row.extra.setdefault("tests", []).append(out["tests"])


def run_block(rows: list[Row], info, ctx, peer: Peer, args, refs: dict, bw: dict, log) -> None:
    """Open the block's engines, then ``rounds`` rounds, each timing every row once (the order rotated by one
    per round) and measuring the read bandwidth at the block's thread counts."""
    from tqdm.auto import tqdm

    for row in rows:
        if row.kind == "engine":
            try:
                _open_engine(row, info, ctx, refs, log)
            except Exception as e:  # noqa: BLE001  an error row, the others go on
                row.error = f"{type(e).__name__}: {e}"
                log(f"  ERROR {row.name}: {row.error}")
    n_rounds = args.limited_rounds if rows and rows[0].limit is not None else args.rounds
    threads = sorted({r.threads for r in rows})
    for r in tqdm(range(1, n_rounds + 1), desc="rounds", disable=os.environ.get("TQDM_DISABLE") == "1"):
        for t in threads:
            bw.setdefault(t, []).append(read_bandwidth(t))
        k = (r - 1) % len(rows)
        for row in rows[k:] + rows[:k]:
            if row.error:
                continue
            try:
                if row.kind == "engine":
                    row.runs.append(row.runner.generate(info.prompts[r], ctx.new_tokens))
                else:
                    _llama_round(row, peer, args, True)
            except Exception as e:  # noqa: BLE001
                row.error = f"{type(e).__name__}: {e}"
                log(f"  ERROR {row.name}: {row.error}")
        log(f"  round {r}/{n_rounds}: " + ", ".join(
            f"{x.name} {_last_rate(x):.3g}" for x in rows if not x.error))


def _last_rate(row: Row) -> float:
    if row.kind == "engine":
        s = row.runs[-1]["stats"]
        return len(s.decode_token_seconds) / sum(s.decode_token_seconds)
    return row.decode[-1]


def summarise(row: Row, info, ctx, args, bw: dict, ceilings: dict, peer: Peer) -> dict:
    """A row in the fields of the engine suite's rows (bench_engine._summarise), with its bound at its threads."""
    cfg = info.config
    out = {"name": row.name, "mode": row.kind, "model": info.key, "device": "cpu",
           "variant": "in memory" if row.limit is None else ("full" if row.kind == "engine" else "mmap, memory cgroup"),
           "quantization": row.quantization or "none", "threads": row.threads, "prompt_tokens": args.prompt_tokens,
           "decode_tokens": args.tokens - 1, "memory_limit": row.limit if row.limit is not None else math.nan,
           "error": row.error} | row.extra
    if row.kind == "llama.cpp":
        out["build"] = peer.build
        out["repack"] = row.quantization != "q4_0"
        if not out["repack"]:
            out["note"] = REPACK_NOTE
    if row.error:
        return out
    bw_read = statistics.median(bw[row.threads])
    context = args.prompt_tokens + args.tokens / 2
    if row.kind == "engine":
        out |= be._summarise(row.runs, row.spec, info, ctx, row.runner)
        expert_nbytes = be.runner_expert_nbytes(info, row.quantization)
        mem = out["memory_bytes_split"]
        link_bytes = out["bytes_read_per_token"]
        out["limit_share_of_expert_bytes"] = 1.0 if row.limit is None else row.extra.get("share")
    else:
        d3, p3 = _stat3(row.decode), _stat3(row.prefill)
        out |= {"repeats": len(row.decode), "prefill_tok_s": p3["median"], "prefill_tok_s_min": p3["min"],
                "prefill_tok_s_max": p3["max"], "decode_tok_s": d3["median"], "decode_tok_s_min": d3["min"],
                "decode_tok_s_max": d3["max"], "hit_rate": math.nan, "link": "storage"}
        mem = llama_memory_bytes(cfg, row.quantization, context)
        expert_nbytes = 3 * cfg.moe_ffn_hidden_size * cfg.hidden_size * (18 / 32 if row.quantization == "q4_0" else 2)
        out["memory_bytes_per_token"], out["memory_bytes_split"] = mem["total"], mem
        # under the cgroup the experts the page cache cannot hold come from storage: not counted by llama.cpp
        link_bytes = 0.0
        out["bytes_read_per_token"] = math.nan if row.limit is not None else 0.0
    bw_link = max(ceilings["storage_read"]["median"], ceilings.get("expert_reads", {}).get("median", 0.0))
    out |= bound_fields(mem["total"], link_bytes if link_bytes == link_bytes else 0.0, bw_read, bw_link,
                        out["decode_tok_s"])
    out["read_bandwidth"] = {"median": bw_read, "min": min(bw[row.threads]), "max": max(bw[row.threads])}
    out |= prefill_bound(cfg, mem, expert_nbytes, args.prompt_tokens, bw_read, out["prefill_tok_s"])
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """engine / llama.cpp in the same run, per thread count: decode (with the issue's targets) and prefill."""
    def find(kind, q, t, limited):
        for r in rows:
            if (r["mode"], r["quantization"], r["threads"]) == (kind, q, t) and not r.get("error") and \
                    (r.get("memory_limit") is not None and r["memory_limit"] == r["memory_limit"]) == limited:
                return r
        return None

    pairs = [("none", "none", 1.2, "bf16"), ("q4_0", "q4_0", 1.5, _q4_0_what()),
             ("q4_0_cpu", "q4_0", 1.5, "Q4_0 in torch's int4 kernel (q4_0_cpu)")]
    out = []
    for t in sorted({r["threads"] for r in rows}):
        for eq, lq, target, what in pairs:
            for limited in (False, True):
                e, ll = find("engine", eq, t, limited), find("llama.cpp", lq, t, limited)
                if e is None or ll is None:
                    continue
                where = "at 60% of expert bytes (llama.cpp: mmap in a memory cgroup of the same size, page cache " \
                        "dropped)" if limited else "in memory"
                tgt = 3.0 if limited else target
                for key, goal in (("decode_tok_s", tgt), ("prefill_tok_s", 1.0)):
                    v = e[key] / ll[key] if e.get(key) and ll.get(key) else math.nan
                    fit = limited and not max(ll.get("cgroup_failcnt") or [1])
                    note = " (llama.cpp's file fit in the cgroup, no limit hit: it ran in memory)" if fit else ""
                    out.append({"what": f"{key.split('_')[0]}: engine {what} / llama.cpp {lq.replace('none', 'bf16')}"
                                        f" {where}, {t} thread{'s' if t > 1 else ''}{note}",
                                "engine": e["name"], "llama_cpp": ll["name"], "value": v, "threshold": goal,
                                "met": None if v != v else v >= goal})
    return out


def machine_load() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(args, log=print) -> int:
    """The peer comparison (``benchmarks.run --suite cpu --peer llama.cpp``): bench_cpu_peer.json / .md."""
    from .ceilings import machine_info, measure_ceilings
    from .report_table import render_peer
    from .run import versions

    start = time.perf_counter()
    scratch = Path(args.scratch or "/tmp/smallthinker_peer")
    own_scratch = not scratch.exists()
    scratch.mkdir(parents=True, exist_ok=True)
    args.scratch = str(scratch)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench_cpu_peer" + ("_dryrun" if args.dry_run else "")
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    torch.set_num_threads(max(args.peer_threads))
    result = {"suite": "cpu_peer", "peer": "llama.cpp", "dry_run": args.dry_run,
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "versions": versions(), "load_before": machine_load(), "partial": True}
    peer = locate(cache=Path(args.peer_cache))
    if not peer.available and args.build_peer:
        try:
            peer = build(Path(args.peer_cache), log)
        except Exception as e:  # noqa: BLE001  reported as the reason
            peer = Peer(False, reason=f"build failed: {type(e).__name__}: {e}")
    result["llama_cpp"] = asdict(peer)
    log(f"llama.cpp: {peer.build.get('version') if peer.available else 'unavailable: ' + peer.reason}")
    rows: list[Row] = []
    done: list[dict] = []
    try:
        info = setup_model(args, log)
        ggufs = export_ggufs(info, scratch, log) if peer.available else {}
        from smallthinker_lab.engine.bundle import open_bundle

        b = open_bundle(info.bundles[None], info.config)
        offsets = [b.offset(layer, e) for layer in range(b.num_layers) for e in range(b.num_experts)]
        log("ceilings ...")
        ceilings = measure_ceilings(device="cpu", quick=args.dry_run, scratch=str(scratch), expert_file=b.data_path,
                                    expert_offsets=offsets[::max(1, len(offsets) // 64)], expert_nbytes=b.stride)
        result["ceilings"] = ceilings
        new_tokens = args.tokens
        ctx = be.Context(device="cpu", new_tokens=new_tokens, repeats=args.rounds, ceilings=ceilings,
                         models={info.key: info}, scratch=scratch, compute_threads=None, model_threads=None, log=log)
        refs = {q: _reference_tokens(info, q, max(args.peer_threads), new_tokens) for q in ENGINE_FORMATS}
        cg_reason = cgroup_unavailable() if peer.available else "llama.cpp unavailable"
        result["settings"] = {
            "prompt_tokens": args.prompt_tokens, "decode_tokens": new_tokens - 1, "rounds": args.rounds,
            "limited_rounds": args.limited_rounds, "threads": list(args.peer_threads),
            "model": {"description": info.description, "checkpoint": str(info.ckpt),
                      "shape": {"hidden": info.config.hidden_size, "layers": info.config.num_hidden_layers,
                                "experts": info.config.num_experts, "top_k": info.config.top_k,
                                "ffn": info.config.moe_ffn_hidden_size, "vocab": info.config.vocab_size}},
            "gguf": {k: {"path": str(v), "bytes": v.stat().st_size} for k, v in ggufs.items()},
            "llama_bench": f"llama-bench -m GGUF -t T -p {args.prompt_tokens} -n {new_tokens - 1} -r 1 -o json "
                           f"--repack 1 (bf16) / 0 (Q4_0), one invocation per row per round (its own warm-up)",
            "engine": "Engine.from_pretrained(ckpt, quantization=Q, compute_threads=T, exact=True; exact=False for "
                      "q4_0_cpu, whose kernels the exact path does not run"
                      + (", and for q4_0, which runs the native Q4_0 x Q8_0 kernel on a bundle with down in the "
                         "model's layout" if _native() else "")
                      + "; the LM head of those quantized too, lm_head_format='auto', as llama.cpp's Q4_0 file "
                      "quantizes its head"
                      + (", and the q4_0 rows' attention projections, attention_format='auto' (q/k/v in one Q4_0 "
                         "matrix, o), as that file quantizes them" if _native() else "")
                      + "), every expert "
                      f"read once before timing; one generation of {args.prompt_tokens} prompt + {new_tokens} new "
                      f"tokens per round, each round a new prompt",
            "interleaving": "round-robin: every round times each row of the block once, the order rotated by one "
                            "row per round; the read bandwidth is measured at each thread count in every round",
            "memory_cgroup": "used" if cg_reason is None else f"not used: {cg_reason}",
            "repack": REPACK_NOTE,
            "shape_note": None if args.dry_run or info.config.num_hidden_layers == 32 else (
                f"{info.config.num_hidden_layers} of the 4B's 32 layers, each of the 4B's shape: the per-layer "
                f"time scales with layers; the embedding / tied LM head (151936 x 1536) is the 4B's whole, so it "
                f"weighs more per token here than in the 32-layer model"),
        }
        bw: dict = {}
        for t in args.peer_threads:
            block = [Row(f"engine {q or 'bf16'} in memory, {t} thr", "engine", q, t) for q in ENGINE_FORMATS]
            block += [Row(f"llama.cpp {k} in memory, {t} thr", "llama.cpp", None if k == "bf16" else k, t,
                          gguf=ggufs.get(k), error=None if peer.available else f"unavailable: {peer.reason}")
                      for k in LLAMA_FORMATS]
            rows += block
            log(f"block: {t} thread(s), in memory ...")
            _run_and_close(block, info, ctx, peer, args, refs, bw, log)
            done += [summarise(r, info, ctx, args, bw, ceilings, peer) for r in block]
            _close(block)
            _write(result, done, json_path, md_path, start, render_peer, partial=True)
        if args.limited_rounds > 0:
            t = max(args.peer_threads)
            block = []
            for q, k in ((None, "bf16"), ("q4_0" if _native() else "q4_0_cpu", "q4_0")):
                lim = be.engine_limits(info, "cpu", q, exact=not _engine_options(q))
                limit, share = be.limit_for_share(lim, 0.6, info.config.top_k)
                e = Row(f"engine {q or 'bf16'} at 60% of expert bytes, {t} thr", "engine", q, t, limit=limit)
                e.extra["share"] = share
                ll = Row(f"llama.cpp {k} mmap in a {limit / 2**30:.2f} GiB memory cgroup, {t} thr", "llama.cpp",
                         None if k == "bf16" else k, t, limit=limit, gguf=ggufs.get(k),
                         error=None if cg_reason is None else f"not run: {cg_reason}")
                block += [e, ll]
            rows += block
            log(f"block: {t} thread(s), 60% of expert bytes ...")
            _run_and_close(block, info, ctx, peer, args, refs, bw, log)
            done += [summarise(r, info, ctx, args, bw, ceilings, peer) for r in block]
            _close(block)
    except Exception as e:  # noqa: BLE001  the setup failed: still write what there is
        import traceback

        result["fatal"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        log(f"FATAL {result['fatal']}")
    finally:
        _close(rows)
        result["load_after"] = machine_load()
        _write(result, done, json_path, md_path, start, render_peer, partial=False)
        if not args.keep and own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    log(f"wrote {json_path}")
    print(md_path.read_text(encoding="utf-8"))
    engine_errors = [r for r in done if r.get("error") and r["mode"] == "engine"]
    return 1 if engine_errors or result.get("fatal") else 0


def _run_and_close(block, info, ctx, peer, args, refs, bw, log) -> None:
    try:
        run_block(block, info, ctx, peer, args, refs, bw, log)
    except Exception:
        _close(block)
        raise


def _close(rows: list[Row]) -> None:
    for r in rows:
        if r.runner is not None:
            with contextlib.suppress(Exception):
                r.runner.close()
            r.runner = None


def _write(result, done, json_path: Path, md_path: Path, start, render, partial: bool) -> None:
    result["rows"] = done
    result["ratios"] = ratios(done)
    result["wall_seconds"] = time.perf_counter() - start
    result["partial"] = partial
    res = be.as_jsonable(result)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    md_path.write_text(render(res), encoding="utf-8")
