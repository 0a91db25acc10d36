"""The CPU engine's Q4_0 kernel (``csrc/q4_0_dot.c``, compiled when the package is installed; loaded with ctypes).

A Q4_0 matrix (ggml's blocks along its rows: ``quant.quantize_q4_0``, the bundle's ``q4_0`` records) times
activations quantized per block of 32 to int8 with an fp32 scale (Q8_0), what llama.cpp computes for a Q4_0
weight: each block's 32 products are summed exactly in integers, then scaled by d_w * d_x. So the result is *not*
the dequantise-then-multiply product: it is the exact product of the dequantised weights with the Q8_0-rounded
activations (checked to float rounding by the tests), whose relative difference from the fp32-activation product
is about 0.5% (one rounding of each activation to 8 bits; measured in tests/test_native_q4_0.py and
benchmarks/cpu_q4_0_native.py).

The kernel reads the weight bytes in place (a cache slot, a memory map): nothing is decoded or repacked per token.
With ``torch.get_num_threads()`` > 1 the kernel splits a product's rows over that many threads (started per call
in C; the caller takes the first share), for products of at least ``SPLIT_MIN_WEIGHTS`` weights x tokens. ctypes
releases the GIL during a call.

Shape letters: N tokens, R rows (output features), C columns (input features, a multiple of 32), F expert ffn
size, H hidden.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from .quant import Q4_0_BLOCK_BYTES, QK4_0, q4_0_from_x8, q4_0_nbytes, q4_0_to_x8, q4_0x8_rows

_LIB_NAME = "_q4_0_dot"
# products (weights x tokens) below this run on the calling thread whatever torch's thread count. Measured on the
# 2-core development machine (AMD EPYC, distinct matrices so that they come from DRAM): a 4B expert's 768 x 1536
# product 0.198 ms on 1 thread, 0.248 ms split over 2 (a thread's start costs more than its half), 1536 x 768
# 0.152 / 0.530 ms; the 151936 x 1536 LM head 17.5 / 9.6 ms
SPLIT_MIN_WEIGHTS = 1 << 24
_lock = threading.Lock()
_state: dict = {}
_local = threading.local()  # the calling thread's thread count for the kernel (``calls_use_threads``)


def default_threads() -> int:
    """The threads a call without ``threads`` may use: those set by ``calls_use_threads`` on this thread, else
    ``torch.get_num_threads()``."""
    return getattr(_local, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def calls_use_threads(threads: int | None):
    """Within the block, calls on this thread without ``threads`` use ``threads`` (None: torch's count). The engine
    sets it at a native decode step, where torch itself runs on one thread: torch's OpenMP workers, spinning after
    each of torch's parallel regions, would otherwise take the core that the kernel's second thread needs."""
    prev = getattr(_local, "threads", None)
    _local.threads = threads
    try:
        yield
    finally:
        _local.threads = prev


def _library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / (_LIB_NAME + suffix)
        if p.is_file():
            return p
    return None


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        path = _library_path()
        if path is None:
            _state["reason"] = (f"the native Q4_0 kernel ({_LIB_NAME}*.so beside {Path(__file__).name}) was not built: "
                                f"install the package from source with a C compiler (pip install -e .)")
            return _state
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            _state["reason"] = f"the native Q4_0 kernel {path} could not be loaded: {e}"
            return _state
        P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.st_q4_0_gemm.argtypes = [P, I64, I64, I64, I64, I64, P, P, P, I64, INT]
        lib.st_q4_0_gemm.restype = None
        lib.st_q4_0_gemm_mt.argtypes = [P, I64, I64, I64, I64, P, P, P, I64, INT, INT]
        lib.st_q4_0_gemm_mt.restype = INT
        lib.st_quantize_q8_0.argtypes = [P, I64, P, P]
        lib.st_quantize_q8_0.restype = None
        lib.st_q4_0_simd.argtypes = []
        lib.st_moe_q4_0.argtypes = [I64, P, P, P, P, I64, I64, P, P, P, P, INT, INT, INT]
        lib.st_moe_q4_0.restype = INT
        lib.st_q4_0x8_gemm_mt.argtypes = [P, I64, I64, I64, P, P, P, I64, INT, INT]
        lib.st_q4_0x8_gemm_mt.restype = INT
        _state.update(lib=lib, simd=int(lib.st_q4_0_simd()), path=str(path), reason=None)
        return _state


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run here, or None."""
    return _load()["reason"]


def available() -> bool:
    return unavailable_reason() is None


def info() -> dict:
    """Where the kernel was loaded from and which path runs (``simd``: AVX2 + FMA + F16C, else scalar)."""
    s = _load()
    return {"available": s["reason"] is None, "reason": s["reason"], "path": s.get("path"),
            "path_taken": ("avx2" if s.get("simd") else "scalar") if s["reason"] is None else None}


def _lib():
    s = _load()
    if s["reason"] is not None:
        raise RuntimeError(s["reason"])
    return s


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C) -> (int8 (N, C), fp32 scales (N, C/32)): per block of 32, d = max|x| / 127, q = round(x / d)."""
    s = _lib()
    xf = x.detach().to(torch.float32).contiguous()
    n, c = xf.shape
    if c % QK4_0:
        raise ValueError(f"Q8_0 activations need a multiple of {QK4_0} features, got {c}")
    q = torch.empty(n, c, dtype=torch.int8)
    d = torch.empty(n, c // QK4_0, dtype=torch.float32)
    s["lib"].st_quantize_q8_0(xf.data_ptr(), n * c, q.data_ptr(), d.data_ptr())
    return q, d


def _check_weight(w: torch.Tensor, rows: int, cols: int) -> None:
    if w.dtype != torch.uint8 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError("a Q4_0 weight must be a contiguous uint8 CPU tensor of its bytes")
    if w.numel() != q4_0_nbytes((rows, cols)):
        raise ValueError(f"a Q4_0 matrix of shape ({rows}, {cols}) is {q4_0_nbytes((rows, cols))} bytes, "
                         f"got {w.numel()}")


LAYOUTS = ("rows", "x8")  # ggml's blocks row after row, or rows interleaved by 8 (``to_x8_``)


def matmul_q8(w: torch.Tensor, rows: int, cols: int, q: torch.Tensor, d: torch.Tensor,
              threads: int | None = None, layout: str = "rows") -> torch.Tensor:
    """y (N, R) fp32 = the Q4_0 matrix ``w`` (its bytes, shape (R, C)) times N activations already in Q8_0
    (``quantize_q8_0``); the rows are split over ``threads`` (default ``default_threads()``). ``layout``: "rows"
    (ggml's blocks, row after row) or "x8" (rows interleaved by 8, ``to_x8_``: the same sums, 8 rows a pass)."""
    s = _lib()
    _check_weight(w, rows, cols)
    n = q.shape[0]
    if q.shape != (n, cols) or q.dtype != torch.int8 or d.shape != (n, cols // QK4_0):
        raise ValueError(f"activations of shape {tuple(q.shape)} do not match a ({rows}, {cols}) Q4_0 matrix")
    if layout not in LAYOUTS:
        raise ValueError(f"a Q4_0 matrix's layout is one of {LAYOUTS}, not {layout!r}")
    if layout == "x8" and rows % 8:
        raise ValueError(f"the x8 layout interleaves rows by 8: {rows} rows are not a multiple of 8")
    y = torch.empty(n, rows, dtype=torch.float32)
    nb = cols // QK4_0
    t = max(1, min(int(threads or default_threads()), rows // 64 or 1))
    if threads is None and rows * cols * n < SPLIT_MIN_WEIGHTS:  # a thread's start costs more than its share
        t = 1
    if layout == "x8":
        s["lib"].st_q4_0x8_gemm_mt(w.data_ptr(), rows, nb, n, q.data_ptr(), d.data_ptr(), y.data_ptr(), rows,
                                   s["simd"], t)
    else:
        s["lib"].st_q4_0_gemm_mt(w.data_ptr(), nb * Q4_0_BLOCK_BYTES, rows, nb, n, q.data_ptr(), d.data_ptr(),
                                 y.data_ptr(), rows, s["simd"], t)
    return y


def matmul(w: torch.Tensor, rows: int, cols: int, x: torch.Tensor, threads: int | None = None,
           layout: str = "rows") -> torch.Tensor:
    """y (N, R) fp32 = the Q4_0 matrix ``w`` (R, C) times x (N, C) (any float dtype; quantized to Q8_0 first)."""
    q, d = quantize_q8_0(x.reshape(-1, cols))
    return matmul_q8(w, rows, cols, q, d, threads, layout)


_X8_CHUNK_ROWS = 1024  # rows converted at a time through a scratch copy (in place, ~1.7 MB extra at H = 1536)


def x8_ok(rows: int) -> bool:
    """Whether a matrix of ``rows`` rows can take the x8 layout."""
    return rows % 8 == 0


def to_x8_(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """ggml Q4_0 rows -> the x8 layout (``quant.q4_0_to_x8``: rows in groups of 8, per group and block column the
    8 rows' fp16 scales then their 8 x 16 bytes of nibbles), in place (``w`` returned), a chunk of rows at a time.
    The bytes of rows r0..r1 (multiples of 8) stay where they were, so such row ranges remain views; the kernel
    computes 8 rows a pass (1.5x the row layout's rate on weights in cache, measured on the development machine)."""
    _check_weight(w, rows, cols)
    if not x8_ok(rows):
        raise ValueError(f"the x8 layout interleaves rows by 8: {rows} rows are not a multiple of 8")
    rb = q4_0_nbytes((1, cols))
    for r0 in range(0, rows, _X8_CHUNK_ROWS):
        n = min(_X8_CHUNK_ROWS, rows - r0)
        part = w[r0 * rb:(r0 + n) * rb]
        part.copy_(q4_0_to_x8(part, (n, cols)))
    return w


def from_x8(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ggml row layout of an x8 matrix (a new tensor)."""
    return q4_0_from_x8(w, (rows, cols))


def x8_rows(w: torch.Tensor, rows: int, cols: int, idx: torch.Tensor) -> torch.Tensor:
    """The ggml row-layout bytes of rows ``idx`` of an x8 matrix (``len(idx)`` rows, flat uint8)."""
    return q4_0x8_rows(w, (rows, cols), idx)


def reglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, f: int, h: int,
          threads: int | None = None, layout: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """One ReGLU expert from its Q4_0 records' bytes: gate and up (F, H), down (H, F) (the model's layout,
    quantized along F), in ``layout`` ("rows" or "x8"). x (N, H) -> (y (N, H) in x's dtype, the gate product (N, F)
    fp32)."""
    flat = x.reshape(-1, h)
    q, d = quantize_q8_0(flat)  # once for gate and up
    g = matmul_q8(gate, f, h, q, d, threads, layout)  # (N, F)
    a = F.relu(g).mul_(matmul_q8(up, f, h, q, d, threads, layout))  # (N, F)
    y = matmul(down, h, f, a, threads, layout)  # (N, H)
    return y.to(x.dtype).reshape(x.shape), g


# the fused layer call keeps a token's gate, activations and their Q8_0 copies on the C stack
MOE_MAX_FEATURES = 16384
# a layer's experts split over threads (one share of experts each) only from this many weights a token: measured on
# the 2-core development machine, 4 of the 4B's experts (14.2 M weights) 0.93 ms on 1 thread, 0.62 ms over 2
MOE_SPLIT_MIN_WEIGHTS = 1 << 22


def moe(x: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weights: torch.Tensor,
        f: int, h: int, threads: int | None = None, gates: bool = False, layout: str = "rows"
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One token through a layer's ReGLU experts in one native call: y (1, H) fp32 = sum_j weights[j] x
    down_j(relu(gate_j x) * up_j x), each expert's (gate, up, down) Q4_0 record bytes as in :func:`reglu`; x is
    quantized to Q8_0 once for all of them, up's rows are read only for neurons with gate > 0 (the others' products
    are 0 whatever up holds), and each expert's activations are quantized to Q8_0 before down, as :func:`reglu` does.
    Returns (y, active neurons per expert (K,) int64, the gate products (K, F) fp32 when ``gates`` else None).
    The experts are split over ``threads`` (default ``default_threads()``; one share of experts per thread)
    when the layer reads at least ``MOE_SPLIT_MIN_WEIGHTS`` weights; the shares are added in a fixed order.
    ``layout`` "x8": the records are q4_0x8 (``quant.quantize_q4_0x8``), 8 rows a pass; up's rows are then read
    in groups of 8, each where one of its 8 gates is > 0."""
    s = _lib()
    k = len(experts)
    if x.numel() != h:
        raise ValueError(f"native.moe computes one token of {h} features, got x of shape {tuple(x.shape)}")
    if f % QK4_0 or h % QK4_0 or f > MOE_MAX_FEATURES or h > MOE_MAX_FEATURES:
        raise ValueError(f"native.moe needs F and H multiples of {QK4_0} up to {MOE_MAX_FEATURES}, got F={f}, H={h}")
    if weights.numel() != k:
        raise ValueError(f"{k} experts need {k} weights, got {weights.numel()}")
    if layout not in LAYOUTS or (layout == "x8" and (f % 8 or h % 8)):
        raise ValueError(f"a layer's records are in layout 'rows' or 'x8' (F and H multiples of 8), not {layout!r} "
                         f"with F={f}, H={h}")
    for g, u, d in experts:
        _check_weight(g, f, h), _check_weight(u, f, h), _check_weight(d, h, f)
    xf = x.detach().to(torch.float32).contiguous()
    wf = weights.detach().to(torch.float32).reshape(-1).contiguous()
    y = torch.zeros(1, h, dtype=torch.float32)
    active = torch.empty(k, dtype=torch.int64)
    g_out = torch.empty(k, f, dtype=torch.float32) if gates else None
    ptrs = [(ctypes.c_void_p * k)(*(e[m].data_ptr() for e in experts)) for m in range(3)]
    t = int(threads or default_threads())
    if threads is None and 3 * f * h * k < MOE_SPLIT_MIN_WEIGHTS:
        t = 1
    s["lib"].st_moe_q4_0(k, ptrs[0], ptrs[1], ptrs[2], wf.data_ptr(), f, h, xf.data_ptr(), y.data_ptr(),
                         active.data_ptr(), g_out.data_ptr() if gates else None, s["simd"], max(1, min(t, k)),
                         int(layout == "x8"))
    return y, active, g_out
