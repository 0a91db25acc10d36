"""llama.cpp's binaries for the peer rows: locate or build ``llama-bench`` / ``llama-quantize`` and parse what
``llama-bench -o json`` prints. Shared by the CPU peer (benchmarks/peer_llamacpp.py) and the CUDA peer
(benchmarks/peer_llamacpp_gpu.py); the build here is the CPU one from the pinned sdist, cached outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from smallthinker_lab.model.atomic import sha256_file

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallthinker-lab" / "llama.cpp"
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DCMAKE_BUILD_TYPE=Release")
TARGETS = ("llama-bench", "llama-quantize")
BENCH_KEYS = ("n_prompt", "n_gen", "n_threads", "avg_ts", "samples_ts")


# ---------------------------------------------------------------------------------------------- locate / build
@dataclass
class Peer:
    """llama.cpp's binaries, or why there are none (``available`` False, ``reason`` says why)."""

    available: bool
    reason: str = ""
    bench: Path | None = None
    quantize: Path | None = None
    build: dict = field(default_factory=dict)  # the build id: version line, sdist, vendored commit


def _bin_dirs(root: Path) -> list[Path]:
    return [root / "build" / "bin", root / "bin", root]


def locate(env: dict | None = None, cache: Path = CACHE) -> Peer:
    """llama-bench from ``$LLAMA_CPP_DIR`` (a build or install folder), else from the cache folder."""
    env = os.environ if env is None else env
    tried = []
    roots = ([Path(env["LLAMA_CPP_DIR"])] if env.get("LLAMA_CPP_DIR") else []) + [Path(cache)]
    for root in roots:
        for d in _bin_dirs(root):
            tried.append(str(d))
            bench = d / "llama-bench"
            if bench.is_file() and os.access(bench, os.X_OK):
                quantize = d / "llama-quantize"
                return Peer(True, bench=bench, quantize=quantize if quantize.is_file() else None,
                            build=build_id(bench, root))
    return Peer(False, reason=f"no llama-bench in {', '.join(tried)} (set LLAMA_CPP_DIR to a llama.cpp build, or "
                              f"pass --build-peer to build {SDIST}'s vendored llama.cpp into {cache})")


def build_id(bench: Path, root: Path) -> dict:
    """``llama-bench --version`` and, for a build from the sdist, the sdist and the llama.cpp commit it vendors."""
    out = {"binary": str(bench)}
    try:
        r = subprocess.run([str(bench), "--version"], capture_output=True, text=True, timeout=30)
        lines = (r.stdout + r.stderr).strip().splitlines()  # a CUDA build logs its devices first
        out["version"] = next((x for x in lines if x.startswith("version")), lines[0] if lines else None)
    except (OSError, subprocess.SubprocessError) as e:
        out["version"] = f"unavailable: {e}"
    info = root / "build_info.json"
    if info.is_file():
        out |= json.loads(info.read_text(encoding="utf-8"))
    return out


def _vendored_commit(changelog: str, version: str) -> str | None:
    """The llama.cpp commit a llama-cpp-python release vendors, from its CHANGELOG ("update llama.cpp to ...@X")."""
    m = re.search(rf"## \[{re.escape(version)}\](.*?)(?=\n## \[|\Z)", changelog, re.S)
    c = re.search(r"llama\.cpp@([0-9a-f]{7,40})", m.group(1)) if m else None
    return c.group(1) if c else None


def build(cache: Path = CACHE, log=print, jobs: int = 2) -> Peer:
    """Build llama-bench and llama-quantize from the pinned sdist into ``cache`` (about 5-10 minutes on 2 cores)."""
    cache = Path(cache)
    sdist_dir, src, bdir = cache / "sdist", cache / "src", cache / "build"
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        log(f"peer: pip download {SDIST} (sdist) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(sdist_dir)], check=True)
        tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    tarball = tarballs[-1]
    version = SDIST.split("==")[1]
    with tarfile.open(tarball) as tf:
        top = tf.getmembers()[0].name.split("/")[0]
        changelog = tf.extractfile(f"{top}/CHANGELOG.md").read().decode("utf-8")
        if not (src / "CMakeLists.txt").is_file():
            log(f"peer: extracting {top}/vendor/llama.cpp ...")
            prefix = f"{top}/vendor/llama.cpp/"
            members = []
            for m in tf.getmembers():
                if m.name.startswith(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tf.extractall(src, members=members, filter="data")
    (src / ".git").unlink(missing_ok=True)  # a submodule pointer to nothing: build info from build_info.json
    nice = ["nice", "-n", "19"]
    log(f"peer: cmake configure + build {', '.join(TARGETS)} (-j{jobs}, nice 19) ...")
    t0 = time.perf_counter()
    subprocess.run(nice + ["cmake", "-S", str(src), "-B", str(bdir), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(nice + ["cmake", "--build", str(bdir), f"-j{jobs}", "--target", *TARGETS], check=True,
                   stdout=subprocess.DEVNULL)
    digest = sha256_file(tarball)
    (cache / "build_info.json").write_text(json.dumps({
        "sdist": tarball.name, "sdist_sha256": digest,
        "vendored_llama_cpp_commit": _vendored_commit(changelog, version),
        "cmake_flags": list(CMAKE_FLAGS), "build_seconds": time.perf_counter() - t0}, indent=1), encoding="utf-8")
    peer = locate({}, cache)
    if not peer.available:
        raise RuntimeError(f"built llama.cpp in {bdir}, but {peer.reason}")
    return peer


# ---------------------------------------------------------------------------------------------- llama-bench
def parse_llama_bench(text: str) -> list[dict]:
    """The tests of one ``llama-bench -o json`` (or ``-o jsonl``) output: one dict per test (pp or tg) with its
    per-repetition tok/s in ``samples_ts``. A missing field is an error naming it."""
    text = text.strip()
    if not text:
        raise ValueError("llama-bench printed nothing (expected its -o json output)")
    try:
        tests = json.loads(text)
    except json.JSONDecodeError:
        try:
            tests = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"llama-bench output is neither JSON nor JSON lines: {e}: {text[:120]!r}") from None
    if isinstance(tests, dict):
        tests = [tests]
    for i, t in enumerate(tests):
        missing = [k for k in BENCH_KEYS if k not in t]
        if missing:
            raise ValueError(f"llama-bench test {i} lacks field {missing[0]!r} (has {sorted(t)[:12]})")
        if t["n_prompt"] and t["n_gen"]:
            raise ValueError(f"llama-bench test {i} is a combined pp+tg test (-pg); run -p and -n tests")
    return tests


def split_tests(tests: list[dict]) -> dict:
    """{"prefill": [tok/s...], "decode": [tok/s...]} from parsed tests."""
    out = {"prefill": [], "decode": []}
    for t in tests:
        out["prefill" if t["n_prompt"] else "decode"] += [float(x) for x in t["samples_ts"]]
    return out
