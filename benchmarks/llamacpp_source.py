"""The trimmed llama.cpp source that travels to the lent GPU machine (which has no internet) for the CUDA peer rows.

    python -m benchmarks.llamacpp_source [--sdist FILE] [--out .peer/llama.cpp-0.3.36-cuda-src.tar.xz]
                                         [--configure-check DIR]

Reads the llama.cpp vendored in the pinned sdist (``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``,
downloaded into the cache folder when ``--sdist`` is not given), keeps what a CPU + CUDA build of llama-bench and
llama-quantize needs (no docs, models, tests, benches, examples, no ggml backend but cpu and cuda, tools/ reduced to
llama-bench and quantize) plus gguf-py (the GGUF writer the project's exporter imports, for a machine without the
``gguf`` package), and writes it as one reproducible tar.xz (sorted, fixed times and owners) in the git-ignored
``.peer/`` folder, its sha256 beside it and in the committed ``benchmarks/llamacpp_source.json``, which the GPU
build checks before it compiles. ``--configure-check``: unpack into DIR and run cmake's configure step (CPU), no build.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from smallthinker_lab.model.atomic import sha256_file

from .llamacpp_bin import CACHE, CMAKE_FLAGS, SDIST, _vendored_commit

ROOT = Path(__file__).resolve().parents[1]
VERSION = SDIST.split("==")[1]
ARCHIVE = ROOT / ".peer" / f"llama.cpp-{VERSION}-cuda-src.tar.xz"
RECORD = ROOT / "benchmarks" / "llamacpp_source.json"
TOP = "llama.cpp"  # the archive's one top folder
MTIME = 1_700_000_000  # every member's time: the archive's bytes depend on the source only
DROP = ("docs", "models", "tests", "benches", "examples", "pocs", "app", "media", "scripts", "ci", "skills",
        "conversion", "requirements", ".devops", ".github", "gguf-py/tests", "gguf-py/examples")
BACKENDS = ("ggml-cpu", "ggml-cuda")  # the ggml backends kept (ggml/src/ggml-*/ folders)
TOOLS = ("llama-bench", "quantize")  # the tools kept; tools/CMakeLists.txt is replaced by TOOLS_CMAKE
TOOLS_CMAKE = ("# reduced by smallthinker_lab's benchmarks/llamacpp_source.py: the tools the peer rows run\n\n"
               "find_package(Threads REQUIRED)\n\nllama_add_compile_flags()\n\n"
               + "".join(f"add_subdirectory({t})\n" for t in TOOLS))


def keep(rel: str) -> bool:
    """Whether the file at ``rel`` (a path inside vendor/llama.cpp) goes into the trimmed tree."""
    parts = rel.split("/")
    if rel == ".git" or any(rel == d or rel.startswith(d + "/") for d in DROP):
        return False
    if len(parts) == 1 and parts[0].startswith("convert_") and parts[0].endswith(".py"):
        return False  # the HF converters: the project's exporter writes the GGUF
    if len(parts) > 3 and parts[:2] == ["ggml", "src"] and parts[2].startswith("ggml-") and parts[2] not in BACKENDS:
        return False  # another backend's folder (the files ggml/src/ggml-*.c stay)
    if parts[0] == "tools" and len(parts) > 2 and parts[1] not in TOOLS:
        return False
    return True


def download_sdist(dest: Path = CACHE / "sdist", log=print) -> Path:
    """The pinned sdist in ``dest`` (downloaded with pip when absent)."""
    found = sorted(Path(dest).glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        log(f"pip download {SDIST} (sdist, ~76 MB) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(dest)], check=True, stdout=subprocess.DEVNULL)
        found = sorted(Path(dest).glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download {SDIST} left no llama_cpp_python-{VERSION}.tar.gz in {dest}")
    return found[-1]


def _member(name: str, size: int, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(f"{TOP}/{name}")
    ti.size, ti.mode, ti.mtime = size, mode, MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def prepare(sdist: Path, out: Path = ARCHIVE, record: Path | None = RECORD, log=print) -> dict:
    """Write the trimmed tree of ``sdist``'s vendored llama.cpp as ``out`` (tar.xz); returns what ``record`` (a
    JSON file, None: not written) holds: the archive's name, bytes and sha256, the sdist's sha256, the vendored
    llama.cpp commit, the trim rules, the files kept."""
    sdist, out = Path(sdist), Path(out)
    files: dict[str, tuple[bytes, int]] = {}
    dropped, changelog = 0, ""
    with tarfile.open(sdist, "r:gz") as tf:
        for m in tf:
            top, _, rest = m.name.partition("/")
            if rest == "CHANGELOG.md":
                changelog = tf.extractfile(m).read().decode("utf-8")
            prefix = "vendor/llama.cpp/"
            if not rest.startswith(prefix) or not m.isfile():
                continue
            rel = rest[len(prefix):]
            if not keep(rel):
                dropped += 1
                continue
            data = TOOLS_CMAKE.encode() if rel == "tools/CMakeLists.txt" else tf.extractfile(m).read()
            files[rel] = (data, 0o755 if m.mode & 0o111 else 0o644)
    missing = [p for p in ("CMakeLists.txt", "ggml/src/ggml-cuda/CMakeLists.txt", "tools/llama-bench/llama-bench.cpp",
                           "gguf-py/gguf/gguf_writer.py") if p not in files]
    if missing:
        raise ValueError(f"{sdist}: no vendor/llama.cpp/{missing[0]} (not the llama-cpp-python sdist this expects)")
    info = {"sdist": sdist.name, "sdist_sha256": sha256_file(sdist),
            "vendored_llama_cpp_commit": _vendored_commit(changelog, VERSION),
            "trimmed": {"dropped": list(DROP), "backends_kept": list(BACKENDS), "tools_kept": list(TOOLS),
                        "also_dropped": "convert_*.py; tools/CMakeLists.txt replaced", "files_dropped": dropped},
            "files": len(files), "bytes_uncompressed": sum(len(d) for d, _ in files.values())}
    files["SOURCE.json"] = ((json.dumps(info, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    with tarfile.open(tmp, "w:xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(files):
            data, mode = files[rel]
            tar.addfile(_member(rel, len(data), mode), io.BytesIO(data))
    tmp.replace(out)
    info |= {"archive": out.name, "archive_bytes": out.stat().st_size, "archive_sha256": sha256_file(out)}
    out.with_name(out.name + ".sha256").write_text(f"{info['archive_sha256']}  {out.name}\n", encoding="utf-8")
    if record is not None:
        Path(record).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log(f"{out}: {info['files']} files, {info['bytes_uncompressed'] / 2**20:.1f} MiB -> "
        f"{info['archive_bytes'] / 2**20:.2f} MiB in {time.perf_counter() - t0:.0f} s, sha256 {info['archive_sha256']}")
    return info


def verify(archive: Path = ARCHIVE, record: Path = RECORD) -> str:
    """The archive's sha256, checked against the committed record; a missing file or another sha is an error
    naming both."""
    archive, record = Path(archive), Path(record)
    if not archive.is_file():
        raise FileNotFoundError(f"no llama.cpp source archive at {archive} (make it with `python -m "
                                f"benchmarks.llamacpp_source`, and carry it to the GPU machine)")
    want = json.loads(record.read_text(encoding="utf-8"))["archive_sha256"] if record.is_file() else None
    got = sha256_file(archive)
    if want is None:
        raise FileNotFoundError(f"no sha256 record {record} to check {archive} against")
    if got != want:
        raise ValueError(f"{archive} has sha256 {got}, not the {want} recorded in {record} (another or a damaged "
                         f"archive: prepare it again)")
    return got


def extract(archive: Path, dest: Path) -> Path:
    """Unpack the archive into ``dest``; returns the source folder (``dest/llama.cpp``). A folder left complete by
    an earlier call (its SOURCE.json present) is reused."""
    src = Path(dest) / TOP
    if (src / "SOURCE.json").is_file() and (src / "CMakeLists.txt").is_file():
        return src
    if src.exists():
        shutil.rmtree(src)
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        names = tar.getnames()
        bad = [n for n in names if not (n == TOP or n.startswith(TOP + "/"))]
        if bad:
            raise ValueError(f"{archive}: member {bad[0]!r} is outside {TOP}/ (not an archive this module wrote)")
        # SOURCE.json last: its presence marks a complete tree
        members = sorted(tar.getmembers(), key=lambda m: m.name == f"{TOP}/SOURCE.json")
        for m in members:
            tar.extract(m, dest, filter="data")
    return src


def configure(src: Path, build: Path, flags: tuple[str, ...], env: dict | None = None,
              log_file: Path | None = None) -> float:
    """cmake's configure step (Ninja where installed); seconds. A failure raises with the log's last lines."""
    cmd = ["cmake", "-S", str(src), "-B", str(build), *flags] + (["-G", "Ninja"] if shutil.which("ninja") else [])
    t0 = time.perf_counter()
    log_file = Path(log_file or Path(build).with_name(Path(build).name + "-configure.log"))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-6:]
        raise RuntimeError(f"cmake configure failed ({r.returncode}), {log_file}: {' / '.join(tail)}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp_source", description=__doc__.split("\n\n")[0])
    p.add_argument("--sdist", default=None, help=f"the {SDIST} sdist (default: downloaded into {CACHE / 'sdist'})")
    p.add_argument("--out", default=str(ARCHIVE))
    p.add_argument("--no-record", action="store_true", help=f"do not write {RECORD.relative_to(ROOT)}")
    p.add_argument("--configure-check", metavar="DIR", default=None,
                   help="unpack the archive into DIR and run the CPU cmake configure step (no build)")
    args = p.parse_args(argv)
    sdist = Path(args.sdist) if args.sdist else download_sdist()
    info = prepare(sdist, Path(args.out), None if args.no_record else RECORD)
    if args.configure_check:
        d = Path(args.configure_check)
        src = extract(Path(args.out), d)
        secs = configure(src, d / "build-cpu", CMAKE_FLAGS)
        print(f"configure (CPU) of {src}: ok in {secs:.0f} s (log {d / 'build-cpu-configure.log'})")
    print(json.dumps({k: info[k] for k in ("archive", "archive_bytes", "archive_sha256")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
