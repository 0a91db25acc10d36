"""The machine's ceilings, measured in the same run as the benchmarks they bound.

- memory copy bandwidth (bytes read + bytes written, a large tensor copy)
- storage read bandwidth with the page cache bypassed (O_DIRECT, else posix_fadvise DONTNEED): one sequential
  stream of 8 MiB reads, and (given a bundle) expert-record reads at random offsets from a pool of threads, as
  the engine reads
- host-to-GPU pinned copy bandwidth (CUDA only), large copies and one-expert-sized copies
- matrix product rate (fp32 and bf16 on CPU; bf16 on GPU)
Every figure is the median of repeated runs, with min and max.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def memory_copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5, device: str = "cpu") -> dict:
    """Bytes read + bytes written per second for a large tensor copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s, moved = _stats(times), 2 * nbytes  # the slowest copy gives the minimum bandwidth
    return {"median": moved / s["median"], "min": moved / s["max"], "max": moved / s["min"], "n": s["n"],
            "unit": "bytes/s", "what": f"{device} tensor copy of {nbytes >> 20} MiB, read + write counted",
            "best": moved / s["min"]}


def storage_read_bandwidth(path: str | None = None, nbytes: int = 512 * 2**20, chunk: int = 8 * 2**20,
                           repeats: int = 3) -> dict:
    """Sequential read of a file with the page cache bypassed (O_DIRECT where possible)."""
    own = path is None
    if own:
        fd, path = tempfile.mkstemp(prefix="st_ceiling_", dir=os.environ.get("SMALLTHINKER_SCRATCH"))
        block = os.urandom(chunk)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, chunk)  # page aligned
    mode, times = None, []
    try:
        for _ in range(repeats):
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                mode = "O_DIRECT"
            except OSError:
                fd = os.open(path, os.O_RDONLY)
                mode = "fadvise"
            try:
                if mode == "fadvise":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                off = 0
                while off + chunk <= size:
                    n = os.preadv(fd, [buf], off)
                    if n <= 0:
                        break
                    off += n
                times.append(time.perf_counter() - t0)
            finally:
                os.close(fd)
        read = (size // chunk) * chunk
    finally:
        buf.close()
        if own:
            os.unlink(path)
    s = _stats(times)
    return {"median": read / s["median"], "min": read / s["max"], "max": read / s["min"], "n": s["n"],
            "unit": "bytes/s", "what": f"sequential {chunk >> 20} MiB preadv of {read >> 20} MiB, page cache "
            f"bypassed ({mode})", "mode": mode}


def expert_read_bandwidth(path: str | os.PathLike, offsets: list[int], nbytes: int, threads: int = 4,
                          repeats: int = 3) -> dict:
    """Reads of ``nbytes`` at ``offsets`` (page aligned) from ``threads`` threads at once, the page cache bypassed
    (O_DIRECT, else DONTNEED after each read): the engine's access pattern. A fresh offset order per repeat."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    mode = "O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        probe = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [probe], 0)
        except OSError:
            os.close(fd)
            fd, mode = os.open(path, os.O_RDONLY), "fadvise"
        finally:
            probe.close()
    except OSError:
        fd, mode = os.open(path, os.O_RDONLY), "fadvise"
    bufs = [mmap.mmap(-1, nbytes) for _ in range(threads)]
    free = list(range(threads))
    import threading

    lock = threading.Lock()

    def read(off: int) -> int:
        with lock:
            i = free.pop()
        try:
            n = os.preadv(fd, [bufs[i]], off)
            if mode == "fadvise":
                os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
            return n
        finally:
            with lock:
                free.append(i)

    times, total = [], 0
    rng = random.Random(0)
    try:
        if mode == "fadvise":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                order = offsets[:]
                rng.shuffle(order)
                t0 = time.perf_counter()
                total = sum(pool.map(read, order))
                times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    s = _stats(times)
    return {"median": total / s["median"], "min": total / s["max"], "max": total / s["min"], "n": s["n"],
            "unit": "bytes/s", "mode": mode, "what": f"{len(offsets)} reads of {nbytes / 2**20:.2f} MiB at random "
            f"record offsets of {Path(path).name}, {threads} threads, page cache bypassed ({mode})"}


def host_to_device_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10) -> dict | None:
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    s = _stats(times)
    return {"median": nbytes / s["median"], "min": nbytes / s["max"], "max": nbytes / s["min"], "n": s["n"],
            "unit": "bytes/s", "what": f"pinned host-to-GPU copies of {nbytes >> 20} MiB"}


def matmul_rate(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    s = _stats(times)
    return {"median": flops / s["median"], "min": flops / s["max"], "max": flops / s["min"], "n": s["n"],
            "unit": "FLOP/s", "what": f"{n}^3 {str(dtype).replace('torch.', '')} matrix product on {device}"}


def measure_ceilings(device: str = "cpu", quick: bool = False, scratch: str | None = None,
                     expert_file: str | os.PathLike | None = None, expert_offsets: list[int] | None = None,
                     expert_nbytes: int | None = None, io_threads: int = 4) -> dict:
    """Every ceiling of this machine; with ``expert_file`` (a bundle's data file), also expert-record reads."""
    if scratch:
        os.environ["SMALLTHINKER_SCRATCH"] = str(scratch)
    size = 64 * 2**20 if quick else 512 * 2**20
    saved = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or saved)  # the machine's ceiling, whatever the benchmark's threads
    try:
        return _measure(device, quick, size, expert_file, expert_offsets, expert_nbytes, io_threads)
    finally:
        torch.set_num_threads(saved)


def settle_writeback(timeout_s: float = 120.0, below: int = 64 * 2**20) -> dict:
    """sync, then wait until the kernel's dirty and under-writeback pages fall below ``below`` bytes (or the
    timeout): storage read bandwidth measured while gigabytes just written (a checkpoint, a bundle) are still being
    flushed reads low. Returns what it saw."""
    t0 = time.perf_counter()
    os.sync()

    def pending() -> int | None:
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            return sum(int(fields[k].split()[0]) * 1024 for k in ("Dirty", "Writeback"))
        except (OSError, KeyError, ValueError):
            return None

    left = pending()
    while left is not None and left > below and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.5)
        left = pending()
    return {"seconds": time.perf_counter() - t0, "pending_bytes": left}


def _measure(device, quick, size, expert_file, expert_offsets, expert_nbytes, io_threads) -> dict:
    settled = settle_writeback(10.0 if quick else 120.0)
    out = {"machine": machine_info(), "writeback_settled": settled,
           "memory_copy": memory_copy_bandwidth(size, 3 if quick else 5),
           "storage_read": storage_read_bandwidth(nbytes=size, repeats=2 if quick else 3),
           # bf16 products on a CPU without native bf16 (AVX2) run at ~1 GFLOP/s: a small size, few repeats
           "matmul_fp32_cpu": matmul_rate(512 if quick else 1024, torch.float32, repeats=3),
           "matmul_bf16_cpu": matmul_rate(256 if quick else 512, torch.bfloat16, repeats=3)}
    if expert_file is not None and expert_offsets:
        out["expert_reads"] = expert_read_bandwidth(expert_file, expert_offsets, expert_nbytes, io_threads,
                                                    2 if quick else 3)
    if device == "cuda" and torch.cuda.is_available():
        out["hbm_copy"] = memory_copy_bandwidth(2 * 2**30, 10, "cuda")
        out["host_to_gpu"] = host_to_device_bandwidth(repeats=30)
        out["host_to_gpu_expert"] = host_to_device_bandwidth(expert_nbytes or 7 * 2**20, 50)
        out["matmul_bf16_gpu"] = matmul_rate(8192, torch.bfloat16, "cuda", 10)
    return out


if __name__ == "__main__":
    res = measure_ceilings(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(json.dumps(res, indent=2))
