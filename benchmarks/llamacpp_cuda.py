"""llama.cpp's CUDA build and what runs it, for the GPU suite's peer rows (benchmarks/peer_llamacpp_gpu.py).

The build: the trimmed source archive (benchmarks/llamacpp_source.py, carried to the lent machine) checked against its
recorded sha256, unpacked and built in the git-ignored ``.peer/`` (llama-bench and llama-quantize, ``-DGGML_CUDA=ON
-DCMAKE_CUDA_ARCHITECTURES=90``, cached by the source's sha256) in a background thread. The GGUFs: bf16 through the
project's exporter (with the archive's gguf-py where the ``gguf`` package is not installed), Q4_0 through
``llama-quantize --pure``. The -ncmoe rule matching an engine limit, the command lines, and one llama-bench run
with the GPU memory it took.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import llamacpp_source as source
from .llamacpp_bin import CMAKE_FLAGS, TARGETS, Peer, locate, parse_llama_bench, split_tests

WORK = source.ROOT / ".peer"  # git-ignored; on a warm lent machine it stays between calls
CUDA_FLAGS = CMAKE_FLAGS + ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90")
PRECISIONS = ("bf16", "q4_0")  # the GGUFs: as exported, and llama-quantize --pure Q4_0
NCMOE_RULE = ("-ncmoe N keeps the experts of the first N layers in host memory (computed by the CPU): N = L - "
              "floor(C / (E x one expert's bytes in the row's precision)), C the engine's expert-cache bytes at the "
              "limit (its slots x slot size in the same precision), so llama.cpp's experts on the GPU take at most "
              "what the engine's cache does; the rest of both (attention, router, embedding / LM head, KV) is on the "
              "GPU in each")
BOUND_RULE = ("HBM bytes / HBM copy bandwidth + bytes of the selected experts of the CPU layers / host read "
              "bandwidth at the row's threads (llama.cpp's GPU waits while a layer's CPU experts run: no overlap)")


# ---------------------------------------------------------------------------------------------- the -ncmoe rule
def expert_bytes(config, precision: str) -> float:
    """One expert's three matrices as llama.cpp stores them: bf16, or Q4_0 (18 bytes per 32 weights)."""
    return 3 * config.moe_ffn_hidden_size * config.hidden_size * (18 / 32 if precision == "q4_0" else 2)


def engine_cache_bytes(config, precision: str, share: float) -> int:
    """The engine's expert-cache bytes at the limit holding ``share`` of the experts (bench_engine.limit_for_share:
    max(top_k, round(share x L x E)) slots), each slot one bundle record of the precision."""
    from smallthinker_lab.engine.bundle import down_transposed_for, record_layout

    fmt = "q4_0" if precision == "q4_0" else "bf16"
    _, _, stride = record_layout(config.hidden_size, config.moe_ffn_hidden_size, fmt, down_transposed_for(fmt))
    slots = max(config.top_k, round(share * config.num_hidden_layers * config.num_experts))
    return slots * stride


def ncmoe_for(cache_bytes: float, config, precision: str) -> int:
    """The -ncmoe N matching an engine expert cache of ``cache_bytes`` (NCMOE_RULE), in [0, L]."""
    if cache_bytes < 0:
        raise ValueError(f"expert-cache bytes must be >= 0, got {cache_bytes}")
    L = config.num_hidden_layers
    return max(0, L - min(L, int(cache_bytes // (config.num_experts * expert_bytes(config, precision)))))


@dataclass
class PeerRow:
    """One llama.cpp configuration and what its rounds collected."""

    precision: str  # "bf16" | "q4_0"
    ncmoe: int
    layers: int
    shares: list = field(default_factory=list)  # the engine limits (share of expert bytes) it matches
    cache_bytes: dict = field(default_factory=dict)  # share -> the engine's expert-cache bytes there
    gguf: Path | None = None
    repack: bool = True
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    gpu_memory: list = field(default_factory=list)  # measured bytes per invocation (peak used - before)
    commands: list = field(default_factory=list)
    build: dict = field(default_factory=dict)  # build_commit, build_number, gpu_info, backends of its tests
    notes: list = field(default_factory=list)
    error: str | None = None

    @property
    def name(self) -> str:
        p = "bf16" if self.precision == "bf16" else "Q4_0"
        if self.ncmoe == 0:
            return f"llama.cpp {p} in memory (-ngl 99 -fa on)"
        if self.ncmoe >= self.layers:
            return f"llama.cpp {p} all experts on the CPU (-ncmoe {self.ncmoe})"
        at = ", ".join(f"{s:.0%}" for s in self.shares)
        return f"llama.cpp {p} -ncmoe {self.ncmoe} (the engine's {at} limit's expert bytes)"


def plan_rows(config, shares) -> list[PeerRow]:
    """bf16 and Q4_0 rows: in memory, one per distinct -ncmoe of the engine limits' ``shares``, all on the CPU."""
    L = config.num_hidden_layers
    rows = []
    for p in PRECISIONS:
        by_n = {0: PeerRow(p, 0, L)}
        for s in sorted(set(shares)):
            c = engine_cache_bytes(config, p, s)
            r = by_n.setdefault(ncmoe_for(c, config, p), PeerRow(p, ncmoe_for(c, config, p), L))
            r.shares.append(s)
            r.cache_bytes[s] = c
        by_n.setdefault(L, PeerRow(p, L, L))
        rows += [by_n[n] for n in sorted(by_n)]
    return rows


# ---------------------------------------------------------------------------------------------- command lines
def bench_command(bench, gguf, threads: int, n_prompt: int, n_gen: int, ncmoe: int, repack: bool = True) -> list[str]:
    """One llama-bench invocation: every layer on the GPU (-ngl 99), flash attention on, one repetition (its own
    warm-up first), JSON out; the experts of the first ``ncmoe`` layers on the CPU."""
    cmd = [str(bench), "-m", str(gguf), "-ngl", "99", "-fa", "on", "-t", str(threads), "-p", str(n_prompt),
           "-n", str(n_gen), "-r", "1", "-o", "json"]
    if ncmoe:
        cmd += ["-ncmoe", str(ncmoe)]
    if not repack:
        cmd += ["--repack", "0"]
    return cmd


def quantize_command(quantize, src, dst, threads: int) -> list[str]:
    """Q4_0 of every matrix (``--pure``: the token embedding / LM head too, as the project's exporter and the
    engine's Q4_0 do), the routers and norms left in F32."""
    return [str(quantize), "--pure", str(src), str(dst), "Q4_0", str(threads)]


def build_commands(src: Path, bdir: Path, jobs: int, nvcc: str | None, commit: str | None = None) -> list[list[str]]:
    """cmake configure (Ninja where installed) and build of llama-bench and llama-quantize with CUDA. ``commit``:
    the vendored llama.cpp commit, which the binaries then report as their build commit (the tree has no .git)."""
    flags = list(CUDA_FLAGS) + ([f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else []) + (
        [f"-DLLAMA_BUILD_COMMIT={commit}"] if commit else [])
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return [["cmake", "-S", str(src), "-B", str(bdir), *flags, *gen],
            ["cmake", "--build", str(bdir), f"-j{jobs}", "--target", *TARGETS]]


def find_nvcc() -> str | None:
    """nvcc for cmake: $CUDACXX, the toolkit's own (/usr/local/cuda, then the newest /usr/local/cuda-*), then the
    one on PATH (which may be a wrapper script outside the toolkit, from which cmake cannot find its libraries)."""
    toolkits = sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True,
                      key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.parent.parent.name)))
    for c in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc", *map(str, toolkits), shutil.which("nvcc")):
        if c and Path(c).is_file():
            return c
    return None


def build_jobs() -> int:
    """-j from the core count, two left for the suite writing its checkpoint and GGUF meanwhile."""
    return max(1, (os.cpu_count() or 2) - 2)


# ---------------------------------------------------------------------------------------------- the build
class CudaBuild:
    """The CUDA build in a background thread: ``source_ready`` is set once the source is unpacked (its gguf-py
    usable), :meth:`wait` returns the Peer (``available`` False with the reason where anything failed)."""

    def __init__(self, archive: Path = source.ARCHIVE, record: Path = source.RECORD, work: Path = WORK,
                 jobs: int | None = None, log=print) -> None:
        self.archive, self.record, self.work = Path(archive), Path(record), Path(work)
        self.jobs, self.log = jobs or build_jobs(), log
        self.src: Path | None = None
        self.source_ready = threading.Event()
        self.peer: Peer | None = None
        self.info: dict = {}
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama.cpp-cuda-build", daemon=True)

    def start(self) -> CudaBuild:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Peer:
        """The Peer once the build ends; after ``timeout`` seconds the build is stopped (its compiler processes
        ended; what it compiled stays in the build folder, which the next build resumes) and the Peer says so."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            return Peer(False, reason=f"the llama.cpp build did not finish within the {timeout:.0f} s left for it "
                                      f"(stopped; a later build in {self.work} resumes from what it compiled)")
        return self.peer

    def _run(self) -> None:
        try:
            self.peer = self._build()
        except Exception as e:  # noqa: BLE001  recorded, the suite goes on
            self.peer = Peer(False, reason=f"build failed: {type(e).__name__}: {e}")
        finally:
            self.source_ready.set()

    def _build(self) -> Peer:
        sha = source.verify(self.archive, self.record)
        key = sha[:16]
        bdir = self.work / f"build-cuda-{key}"
        self.info = {"archive": str(self.archive), "archive_sha256": sha, "build_dir": str(bdir)}
        self.src = source.extract(self.archive, self.work / f"src-{key}")
        self.source_ready.set()
        cached = locate({}, bdir)
        if cached.available and (bdir / "build_info.json").is_file():
            self.log(f"llama.cpp CUDA build: cached in {bdir}")
            cached.build["cached"] = True
            return cached
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("no nvcc on PATH or at /usr/local/cuda/bin/nvcc: cannot build llama.cpp with CUDA")
        src_info = _read_json(self.src / "SOURCE.json")
        cmds = build_commands(self.src, bdir, self.jobs, nvcc, src_info.get("vendored_llama_cpp_commit"))
        self.log(f"llama.cpp CUDA build: {' '.join(cmds[1])} (log {bdir}.log) ...")
        t0 = time.perf_counter()
        log_file = Path(f"{bdir}.log")
        with open(log_file, "w") as f:
            for cmd in cmds:
                code = self._call(cmd, f)
                if code:
                    f.flush()
                    tail = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()][-4:]
                    raise RuntimeError(f"`{shlex.join(cmd[:4])} ...` exited with {code}: {' / '.join(tail)}")
        secs = time.perf_counter() - t0
        nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info = src_info | {
            "archive_sha256": sha, "cmake_flags": list(CUDA_FLAGS), "jobs": self.jobs, "build_seconds": secs,
            "nvcc": next((x for x in nv if "release" in x), nv[-1] if nv else None),
            "commands": [shlex.join(c) for c in cmds]}
        (bdir / "build_info.json").write_text(_dumps(info), encoding="utf-8")
        self.log(f"llama.cpp CUDA build: {secs:.0f} s with -j{self.jobs}")
        peer = locate({}, bdir)
        if not peer.available:
            raise RuntimeError(f"built in {bdir}, but {peer.reason}")
        return peer


    def stop(self) -> None:
        """End a build still running (its processes; what it compiled stays) and wait for the thread."""
        if self._thread.is_alive():
            self._cancel.set()
            self._thread.join(30)

    def _call(self, cmd: list[str], out) -> int:
        """Run one build command (in the caller's process group, so a job killed for time takes it along); when
        the build is stopped, it and the processes it started (make / ninja, the compilers) are ended."""
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if self._cancel.is_set():
                    for pid in _descendants(proc.pid)[::-1] + [proc.pid]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGTERM)
                    proc.wait()
                    raise RuntimeError("stopped: out of time") from None


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started and theirs, parents first (Linux /proc; empty elsewhere)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        for t in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(x) for x in t.read_text().split()]
                out += kids
                todo += kids
    return out


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else {}


def _dumps(x) -> str:
    return json.dumps(x, indent=1, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------- GGUF files
EXPORT = ("import sys, warnings\n"
          "from smallthinker_lab.model.gguf_export import export_gguf\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "    warnings.simplefilter('always')\n"
          "    export_gguf(sys.argv[1], sys.argv[2], 'bf16', progress=False)\n"
          "for x in w:\n"
          "    print('note:', x.message, file=sys.stderr)\n")


def export_bf16(ckpt: Path, out: Path, gguf_py: Path | None, timeout: float = 600) -> dict:
    """The checkpoint as a bf16 GGUF through the project's exporter, in a child process (whose ``gguf`` is the
    installed package, else ``gguf_py``: the gguf-py of the archive); reused when newer than the checkpoint."""
    src = Path(ckpt) / "model.safetensors"
    use_vendored = importlib.util.find_spec("gguf") is None
    info = {"exporter": "smallthinker_lab.model.gguf_export.export_gguf(ckpt, out, 'bf16')",
            "gguf_module": f"gguf-py of the llama.cpp archive ({gguf_py})" if use_vendored else "installed gguf"}
    if Path(out).is_file() and src.is_file() and Path(out).stat().st_mtime >= src.stat().st_mtime:
        return info | {"reused": True, "seconds": 0.0}
    if use_vendored and (gguf_py is None or not (Path(gguf_py) / "gguf").is_dir()):
        raise RuntimeError(f"no gguf package installed and no gguf-py at {gguf_py} (from the llama.cpp archive)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(source.ROOT)] + ([str(gguf_py)] if use_vendored else [])
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", EXPORT, str(ckpt), str(out)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if r.returncode:
        tail = r.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"GGUF export exited with {r.returncode}: {' / '.join(tail)}")
    notes = [x[len("note: "):] for x in r.stderr.splitlines() if x.startswith("note: ")]
    return info | {"reused": False, "seconds": time.perf_counter() - t0, "notes": notes}


def quantize_q4(peer: Peer, src: Path, dst: Path, threads: int, timeout: float = 600) -> dict:
    """The bf16 GGUF to Q4_0 with the build's llama-quantize (reused when newer than ``src``)."""
    if peer.quantize is None:
        raise RuntimeError(f"no llama-quantize beside {peer.bench}")
    cmd = quantize_command(peer.quantize, src, dst, threads)
    if Path(dst).is_file() and Path(dst).stat().st_mtime >= Path(src).stat().st_mtime:
        return {"command": shlex.join(cmd), "reused": True, "seconds": 0.0}
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")  # a file left by a run stopped midway is never reused
    t0 = time.perf_counter()
    r = subprocess.run(quantize_command(peer.quantize, src, tmp, threads), capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize exited with {r.returncode}: "
                           f"{' / '.join((r.stderr or r.stdout).strip().splitlines()[-3:])}")
    tmp.replace(dst)
    return {"command": shlex.join(cmd), "reused": False, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- one invocation
def cuda_memory_used() -> int | None:
    """Bytes in use on the current CUDA device, every process counted (None without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free
    except Exception:  # noqa: BLE001
        return None


def run_invocation(row: PeerRow, bench: Path, threads: int, n_prompt: int, n_gen: int,
                   sampler=cuda_memory_used, timeout: float = 180) -> None:
    """One llama-bench run of ``row`` (a pp and a tg test); appends its tok/s, the GPU memory it took (peak of
    ``sampler`` while it ran, less before) and the command. A Q4_0 row with CPU experts that segfaults in the
    weight repacking (seen on the development CPU) is run again with --repack 0, and says so."""
    cmd = bench_command(bench, row.gguf, threads, n_prompt, n_gen, row.ncmoe, row.repack)
    before = sampler() if sampler else None
    peak = [before]
    done = threading.Event()

    def poll():
        while True:  # every 50 ms from the start until the run ends
            u = sampler()
            if u is not None and (peak[0] is None or u > peak[0]):
                peak[0] = u
            if done.wait(0.05):
                return

    poller = threading.Thread(target=poll, daemon=True) if before is not None else None
    if poller:
        poller.start()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        done.set()
        if poller:
            poller.join()
    if r.returncode == -11 and row.repack and row.ncmoe and row.precision == "q4_0":
        row.repack = False
        row.notes.append("segfaulted with CPU weight repacking of Q4_0 (--repack 1): run with --repack 0")
        return run_invocation(row, bench, threads, n_prompt, n_gen, sampler, timeout)
    if r.returncode:
        tail = (r.stderr or "").strip().splitlines()[-3:]
        raise RuntimeError(f"llama-bench exited with {r.returncode}: {' / '.join(tail)}")
    tests = parse_llama_bench(r.stdout)
    rates = split_tests(tests)
    row.prefill += rates["prefill"]
    row.decode += rates["decode"]
    row.gpu_memory.append(peak[0] - before if before is not None and peak[0] is not None else math.nan)
    row.commands.append(shlex.join(cmd))
    if not row.build and tests:
        row.build = {k: tests[0].get(k) for k in ("build_commit", "build_number", "gpu_info", "backends",
                                                   "model_size", "model_n_params", "n_cpu_moe")}
