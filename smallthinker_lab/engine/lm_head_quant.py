"""The LM head in a CPU kernel format: a quantized copy of ``lm_head.weight`` computed through torch's int4 / int8
CPU kernels, as the engine's experts are (:mod:`.cpu_kernels`, layouts in :mod:`.quant`).

On the CPU a decode token is memory-bound and the LM head (V x H, 151936 x 1536 = 467 MB in bf16 for the 4B) is
most of its bytes when few layers' experts are read; llama.cpp's Q4_0 file quantizes the head too. With
``lm_head_format`` (an engine option, :func:`resolve_format`) the engine keeps the head as

* ``q4_0_cpu``: ggml Q4_0 (blocks of 32 along H, ``quant.quantize_q4_0``) repacked for
  ``torch._weight_int4pack_mm_for_cpu`` (group size 32, scale bf16(d), zero 0): 0.625 bytes per weight;
* ``int8_cpu``: per-row symmetric int8 with a bf16 scale (``quant.quantize_int8_cpu``) for
  ``torch._weight_int8pack_mm``: 1 byte per weight plus 2 per row;

* ``q4_0``: ggml Q4_0 blocks as they are (0.5625 bytes per weight), through the project's native Q4_0 x Q8_0
  kernel (:mod:`.native`: the hidden state quantized per block of 32 to int8, as llama.cpp does), the head of an
  engine whose experts are ``q4_0`` with that kernel;

and computes decode and prefill logits from it (bf16 activations in, as the expert kernels take; logits cast to the
hidden state's dtype). Quantizing the 4B's head takes ~16 s (q4_0_cpu) / ~4 s (int8_cpu) on one core, so the bytes
are cached beside the bundle (:func:`load_or_quantize`): one file per format, a header naming the format, shape,
packing, an XXH3 (or crc32) of the source weight's bytes and of the payload; a stale or damaged file is rebuilt.

The sparse LM head (``lm_head_predictor``) composes with it: the predictor's rows are computed from the quantized
rows (int8_cpu: the rows themselves; q4_0_cpu: the packing's blocks of rows holding them, see
:func:`int4_row_block`), the others get ``fill_value``.

Shape letters: N tokens, H hidden, V vocabulary, K rows computed.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch

from . import quant
from .cpu_kernels import linear
from .quant import KERNEL_FORMATS

HEAD_FORMATS = (*KERNEL_FORMATS, "q4_0")  # quantized heads (q4_0: the native kernel, engine/native.py)
LM_HEAD_FORMATS = (None, "auto", *HEAD_FORMATS, "screened")  # None: the model's own head
CACHE_VERSION = 1
_MAGIC = b"STLXHEAD"
_HEADER = 4096  # the payload starts page aligned
_CHUNK_ROWS = 8192  # rows quantized at a time (bounds the fp32 temporaries to ~50 MB at H = 1536)


def check_format_name(value) -> None:
    """ValueError naming the valid values for anything ``lm_head_format`` does not accept."""
    if value not in LM_HEAD_FORMATS:
        raise ValueError(f"lm_head_format must be one of {', '.join(repr(v) for v in LM_HEAD_FORMATS)} (None: the "
                         f"model's own head; 'auto': the bundle's CPU kernel format when it is one; 'screened': the "
                         f"model's head with an int8 screen, greedy decoding only), got {value!r}")


def resolve_format(value, bundle_format: str, device: torch.device, exact: bool,
                   shape: tuple[int, int] | None = None) -> str | None:
    """The head format an engine runs: None (the model's own head) or a kernel format.

    "auto": the bundle's format when it is a CPU kernel format (which needs device cpu and exact=False), else None;
    an explicit kernel format needs device cpu and exact=False (a quantized head is not the model's kernels);
    "screened" (:class:`ScreenedHead`, greedy decoding only) needs device cpu and exact=False. ``shape``: the head's
    (V, H); "auto" keeps the model's head where the kernel format cannot hold it (an explicit format raises)."""
    check_format_name(value)
    if value is None:
        return None
    if value == "auto":
        native_q4 = bundle_format in ("q4_0", "q4_0x8") and _native_reason() is None
        if (bundle_format not in KERNEL_FORMATS and not native_q4) or device.type != "cpu" or exact:
            return None
        fmt = "q4_0" if native_q4 else bundle_format  # a q4_0x8 bundle's head: q4_0 (held in x8 where it can)
        try:
            if shape is not None:
                quant.get_format(fmt).nbytes(tuple(shape))
        except ValueError:  # e.g. a vocabulary not divisible by 16 for the int4 packing
            return None
        return fmt
    if device.type != "cpu":
        raise ValueError(f"lm_head_format={value!r} runs torch's CPU kernels: it needs device='cpu', not {device}")
    if value == "screened":
        if exact:
            raise ValueError("lm_head_format='screened' keeps the argmax, not the model's logits: exact=True excludes "
                             "it (use lm_head_format=None)")
        return value
    if value == "q4_0" and _native_reason() is not None:
        raise ValueError(f"lm_head_format='q4_0' runs the native Q4_0 kernel: {_native_reason()}")
    if exact:
        raise ValueError(f"lm_head_format={value!r} quantizes the LM head: exact=True (the model's own kernels and "
                         f"weights) excludes it (use lm_head_format=None)")
    return value


def _native_reason() -> str | None:
    from . import native

    return native.unavailable_reason()


# ------------------------------------------------------------------ the packing's row blocks
@functools.lru_cache(maxsize=1)
def int4_row_block() -> int | None:
    """Rows per block of torch's int4 CPU packing in this process: the smallest b such that packing a matrix b rows
    at a time gives the whole matrix's bytes (32 with AVX2 kernels; None if no b up to 256 does)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (512, 64), dtype=torch.int32, generator=gen)
    whole = quant._int4_pack(q)
    for b in (16, 32, 64, 128, 256):
        if torch.equal(torch.cat([quant._int4_pack(q[i:i + b]) for i in range(0, 512, b)]), whole):
            return b
    return None


def quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (V, H) in ``fmt`` -> flat uint8, the bytes ``quant.get_format(fmt).encode`` writes, computed
    in chunks of rows (whole when the packing's blocks do not tile the chunks)."""
    if fmt not in HEAD_FORMATS:
        raise ValueError(f"an LM head is quantized to a CPU kernel format {HEAD_FORMATS}, not {fmt!r}")
    rows, cols = weight.shape
    codec = quant.get_format(fmt)
    if fmt == "q4_0":  # row-major blocks: the chunks' bytes concatenate
        return torch.cat([codec.encode(weight[r0:r0 + _CHUNK_ROWS]) for r0 in range(0, rows, _CHUNK_ROWS)])
    if fmt == "int8_cpu":
        scales, qs = [], []
        for r0 in range(0, rows, _CHUNK_ROWS):
            part = codec.encode(weight[r0:r0 + _CHUNK_ROWS])
            n = min(_CHUNK_ROWS, rows - r0)
            scales.append(part[:2 * n])
            qs.append(part[2 * n:])
        return torch.cat(scales + qs)
    block = int4_row_block()
    if block is None or rows % block or rows <= _CHUNK_ROWS:
        return codec.encode(weight)
    packed, sz = [], []
    for r0 in range(0, rows, _CHUNK_ROWS):  # _CHUNK_ROWS is a multiple of every block size probed
        w, s = quant.q4_0_cpu_parts(codec.encode(weight[r0:r0 + _CHUNK_ROWS]),
                                    (min(_CHUNK_ROWS, rows - r0), cols))
        packed.append(w)
        sz.append(s)
    return torch.cat([torch.cat(packed).reshape(-1),
                      torch.cat(sz, dim=1).contiguous().view(torch.uint8).reshape(-1)])


# ------------------------------------------------------------------ the head
class QuantizedHead:
    """A (V, H) LM head in a CPU kernel format, over its bytes ``buf`` (flat uint8; ``quantize`` writes them)."""

    def __init__(self, buf: torch.Tensor, fmt: str, shape: tuple[int, int], layout: str = "rows") -> None:
        """``layout`` (q4_0): "rows", ggml's blocks as ``buf`` holds them, or "x8": ``buf`` converted in place to
        the native kernel's rows interleaved by 8 (``native.to_x8_``), which it computes 8 rows a pass."""
        if fmt not in HEAD_FORMATS:
            raise ValueError(f"QuantizedHead formats: {HEAD_FORMATS}, not {fmt!r}")
        self.fmt, self.shape = fmt, (int(shape[0]), int(shape[1]))
        self.buf = quant.as_uint8(buf)
        self.layout = "rows"
        if layout not in ("rows", "x8") or (layout == "x8" and fmt != "q4_0"):
            raise ValueError(f"an LM head's layout is 'rows' (or 'x8' for q4_0), not {layout!r}")
        if fmt == "q4_0":  # the native kernel reads the blocks in place
            if self.buf.numel() != quant.q4_0_nbytes(self.shape):
                raise ValueError(f"a q4_0 head of shape {self.shape} is {quant.q4_0_nbytes(self.shape)} bytes, "
                                 f"got {self.buf.numel()}")
            if layout == "x8":
                from . import native

                native.to_x8_(self.buf, *self.shape)
                self.layout = "x8"
            self.operand = None
        else:
            parts = quant.q4_0_cpu_parts if fmt == "q4_0_cpu" else quant.int8_cpu_parts
            self.operand = parts(self.buf, self.shape)  # (weight, scales) views of buf
        self.source: str = "quantized"  # "cache" when read from the cache file
        self.open_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return int(self.buf.numel())

    def __repr__(self) -> str:
        return f"QuantizedHead({self.fmt}, {self.shape[0]}x{self.shape[1]}, {self.nbytes / 2**20:.1f} MiB)"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (V, H) weights the kernel computes with, in ``dtype`` (a reference; in chunks of rows)."""
        codec = quant.get_format(self.fmt)
        v, c = self.shape
        if self.fmt == "q4_0":
            rb = quant.q4_0_nbytes((1, c))
            if self.layout == "x8":
                from . import native

                return codec.decode(native.from_x8(self.buf, v, c), self.shape, dtype)
            return torch.cat([codec.decode(self.buf[r0 * rb:min(v, r0 + _CHUNK_ROWS) * rb],
                                           (min(v, r0 + _CHUNK_ROWS) - r0, c), dtype)
                              for r0 in range(0, v, _CHUNK_ROWS)])
        block = int4_row_block() if self.fmt == "q4_0_cpu" else 1
        if block is None or v % block or v <= _CHUNK_ROWS:
            return codec.decode(self.buf, self.shape, dtype)
        w, s = self.operand
        out = torch.empty(self.shape, dtype=dtype)
        for r0 in range(0, v, _CHUNK_ROWS):
            r1 = min(v, r0 + _CHUNK_ROWS)
            if self.fmt == "q4_0_cpu":
                part = torch.cat([w[r0:r1].reshape(-1), s[:, r0:r1].contiguous().view(torch.uint8).reshape(-1)])
            else:
                part = torch.cat([s[r0:r1].contiguous().view(torch.uint8), w[r0:r1].reshape(-1).view(torch.uint8)])
            out[r0:r1] = codec.decode(part, (r1 - r0, c), dtype)
        return out

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of ``hidden`` (..., H), computed in bf16 by the kernel, returned in hidden's dtype."""
        h = hidden.reshape(-1, hidden.shape[-1])
        if h.shape[1] != self.shape[1]:
            raise ValueError(f"the LM head takes {self.shape[1]} features, got {h.shape[1]}")
        if self.fmt == "q4_0":  # fp32 out of the native kernel
            from . import native

            out = native.matmul(self.buf, self.shape[0], self.shape[1], h, layout=self.layout)
            return out.to(hidden.dtype).reshape(*hidden.shape[:-1], self.shape[0])
        out = linear(h.to(torch.bfloat16).contiguous(), self.operand, self.fmt)  # (N, V) bf16
        return out.to(hidden.dtype).reshape(*hidden.shape[:-1], self.shape[0])

    def _row_operand(self, rows: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The operand of the rows holding ``rows`` (sorted, unique) and the positions of ``rows`` in its output.
        int8_cpu: those rows; q4_0_cpu: the packing's blocks of rows that hold them (a block is packed as one)."""
        w, s = self.operand
        if self.fmt == "int8_cpu":
            return (w.index_select(0, rows), s.index_select(0, rows)), torch.arange(rows.numel())
        block = int4_row_block()
        if block is None or self.shape[0] % block:
            raise ValueError(f"the sparse LM head over a q4_0_cpu head needs the vocabulary ({self.shape[0]}) in "
                             f"whole blocks of the int4 packing (rows per block: {block}); use "
                             f"lm_head_format='int8_cpu' or None with lm_head_predictor")
        blocks = torch.unique(rows // block)  # (nb,)
        v, half = self.shape[0], self.shape[1] // 2
        wb = w.view(v // block, block, half).index_select(0, blocks).reshape(-1, half)
        groups = s.shape[0]
        sb = s.view(groups, v // block, block, 2).index_select(1, blocks).reshape(groups, -1, 2).contiguous()
        start = torch.searchsorted(blocks, rows // block) * block + rows % block
        return (wb, sb), start

    @torch.no_grad()
    def rows(self, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits (N, K) of the vocabulary rows ``rows`` (K sorted unique ids) for ``hidden`` (N, H), and the number
        of rows the kernel computed to get them (>= K for q4_0_cpu, whose rows come in the packing's blocks)."""
        if self.fmt == "q4_0":  # a row's blocks are contiguous: gather the rows' bytes
            from . import native

            rb = quant.q4_0_nbytes((1, self.shape[1]))
            if self.layout == "x8":
                w = native.x8_rows(self.buf, *self.shape, rows)
            else:
                w = self.buf.view(self.shape[0], rb).index_select(0, rows).reshape(-1)
            out = native.matmul(w, int(rows.numel()), self.shape[1], hidden.reshape(-1, self.shape[1]))
            return out.to(hidden.dtype), int(rows.numel())
        op, pos = self._row_operand(rows)
        out = linear(hidden.to(torch.bfloat16).contiguous(), op, self.fmt)  # (N, K')
        return out.index_select(1, pos).to(hidden.dtype), int(op[0].shape[0])


@torch.no_grad()
def sparse_quantized_head(hidden: torch.Tensor, head: QuantizedHead, predictor, fill_value: float
                          ) -> tuple[torch.Tensor, int]:
    """``lm_head.sparse_lm_head`` over a quantized head: logits (N, V), the predictor's rows computed through the
    kernel, the rest ``fill_value``; returns (logits, rows the kernel computed)."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    mask = predictor.select(h)  # (N, V)
    rows = torch.nonzero(mask.any(dim=0)).flatten()  # (K,)
    part, computed = head.rows(h, rows)  # (N, K)
    logits = torch.full((h.shape[0], head.shape[0]), fill_value, dtype=hidden.dtype, device=hidden.device)
    logits[:, rows] = torch.where(mask[:, rows], part, torch.full_like(part, fill_value))
    return logits.reshape(*hidden.shape[:-1], -1), computed


# ------------------------------------------------------------------ the cache beside the bundle
def cache_path(folder: str | os.PathLike, fmt: str) -> Path:
    return Path(folder) / f"lm_head-{fmt}.bin"


def _checksum_fn():
    from .bundle import CHECKSUMS, default_checksum

    algo = default_checksum()
    return algo, CHECKSUMS[algo]()


def _weight_bytes(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().contiguous().view(torch.uint8).reshape(-1).numpy()


def _expected_header(weight: torch.Tensor, fmt: str) -> dict:
    algo, fn = _checksum_fn()
    return {"version": CACHE_VERSION, "format": fmt, "shape": list(weight.shape),
            "source_dtype": str(weight.dtype).removeprefix("torch."), "checksum": algo,
            "source_checksum": int(fn(_weight_bytes(weight))),
            "packing": quant.int4pack_layout() if fmt == "q4_0_cpu" else None,
            "nbytes": quant.get_format(fmt).nbytes(tuple(weight.shape))}


def _read_cache(path: Path, want: dict) -> torch.Tensor | None:
    """The payload of a cache file that matches ``want`` (format, shape, source and packing) and its checksum,
    else None (absent, stale, damaged: rebuilt by the caller)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER)
            if len(head) < _HEADER or head[:8] != _MAGIC:
                return None
            (n,) = struct.unpack("<I", head[8:12])
            meta = json.loads(head[12:12 + n])
            if {k: meta.get(k) for k in want} != want:
                return None
            data = np.fromfile(f, dtype=np.uint8, count=want["nbytes"])
    except (OSError, ValueError):
        return None
    if data.size != want["nbytes"] or int(_checksum_fn()[1](data)) != meta.get("payload_checksum"):
        return None
    return torch.from_numpy(data)


def _remove_stale(path: Path) -> None:
    """Temporaries of this cache file left by dead processes (a killed write leaves one as large as the head)."""
    from ..model.atomic import pid_alive

    for p in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid) and not p.is_symlink():
            try:
                p.unlink()
            except OSError:
                pass


def _write_cache(path: Path, buf: torch.Tensor, header: dict) -> bool:
    """Write atomically (an exclusive temporary renamed into place); False where the folder is not writable."""
    from .files import _create_exclusive, _fsync_dir

    data = buf.numpy()
    meta = dict(header, payload_checksum=int(_checksum_fn()[1](data)))
    blob = json.dumps(meta, separators=(",", ":")).encode()
    raw = _MAGIC + struct.pack("<I", len(blob)) + blob
    if len(raw) > _HEADER:  # pragma: no cover  (a few hundred bytes)
        raise ValueError("LM head cache header too long")
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    created: list[Path] = []
    try:
        with _create_exclusive(tmp, created) as f:
            f.write(raw.ljust(_HEADER, b"\0"))
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    except OSError:
        for p in created:
            try:
                p.unlink()
            except OSError:
                pass
        return False


def load_or_quantize(weight: torch.Tensor, fmt: str, folder: str | os.PathLike | None) -> QuantizedHead:
    """The quantized head of ``weight`` (V, H) in ``fmt``: read from ``folder``'s cache file when it matches this
    weight (checksum of its bytes), this format, shape and packing and its own checksum, else quantized here and
    written there (where the folder is writable; ``folder`` None: not cached). ``head.source`` says which and
    ``head.open_seconds`` how long it took."""
    t0 = time.perf_counter()
    weight = weight.detach().cpu()
    want = _expected_header(weight, fmt)
    path = cache_path(folder, fmt) if folder is not None else None
    buf = _read_cache(path, want) if path is not None else None
    source = "cache"
    if buf is None:
        buf = quantize(weight, fmt)
        source = "quantized"
        if path is not None and _write_cache(path, buf, want):
            source = "quantized, cached"
    # q4_0: in memory in the native kernel's x8 layout (the cache file keeps ggml's rows)
    from . import native

    x8 = fmt == "q4_0" and native.available() and native.x8_ok(weight.shape[0])
    head = QuantizedHead(buf, fmt, tuple(weight.shape), layout="x8" if x8 else "rows")
    head.source, head.open_seconds = source, time.perf_counter() - t0
    return head


def dequantized_head(weight: torch.Tensor, fmt: str, dtype: torch.dtype | None = None,
                     folder: str | os.PathLike | None = None) -> torch.Tensor:
    """The weights a ``fmt`` head of ``weight`` computes with, as a (V, H) tensor in ``dtype`` (default weight's):
    the in-memory reference of an engine whose head runs in ``fmt``."""
    return load_or_quantize(weight, fmt, folder).dequantize(torch.float32).to(dtype or weight.dtype)


# ------------------------------------------------------------------ the screened exact-argmax head
_ULP_BF16 = 2.0 ** -8  # bf16 keeps 8 significant bits: |bf16(v) - v| <= 2^-9 |v|, so <= 2^-8 of either side


class ScreenedHead:
    """The model's head (V, H) with an exact argmax, reading an int8 copy of it and only the rows that can win.

    **For greedy decoding only** (``lm_head_format="screened"``): the row that the full head ``F.linear(h, W)``
    ranks first (the lowest id among ties) is the row this head ranks first, and its logit is the full head's, but
    the rows it prunes keep an approximate logit (within the bound below), so sampling, top-k or probabilities from
    these logits are not the model's; the engine refuses temperature sampling with this head.

    The screen: the int8 copy (``int8_cpu``: per row r the scale s_r >= max_k |w_rk| / 127 rounded up to bf16, so
    no weight is clamped, q_rk = round(w_rk / s_r)) has |w_rk - s_r q_rk| <= s_r / 2, so its product
    Q_r = sum_k h_k q_rk s_r is within (s_r / 2) ||h||_1 of the true product T_r = sum_k h_k w_rk. The int8 kernel
    returns A_r, Q_r rounded to bf16 after an fp32 sum: |A_r - Q_r| <= 2^-8 |A_r| + c s_r ||h||_1, with
    c = 1.01 * 127 * H * 2^-24 (fp32 accumulation of H terms each at most 127 s_r |h_k|; 0.012 at H = 1536);
    where h is not bf16, the kernel sees bf16(h): another 2^-9 * 127 s_r ||h||_1. So
    |T_r - A_r| <= m_r = s_r ||h||_1 (1/2 + c [+ 0.25]) + 2^-8 |A_r|. The full head's own output E_r (fp32 sum of H
    products rounded to the model's dtype, at worst bf16) is within e_r = 2^-7 (|A_r| + m_r) + c s_r ||h||_1 of
    T_r. Hence E_r is in [A_r - m_r - e_r, A_r + m_r + e_r] = [lo_r, hi_r]; a row with hi_r < max_j lo_j has
    E_r < E_j for that j and is not the argmax, even tied. The survivors are computed exactly (``index_select`` of
    their rows, then ``F.linear`` as the full head), the others keep A_r (< every survivor's max), so the argmax of
    the result is the full head's. In bf16 (the model's dtype here) ``F.linear`` over the survivors' rows gives
    bitwise the full head's values for them (tested: the 4B's 151936 x 1536 head, random subsets, 1 and 3 tokens),
    so the argmax is the same row, ties included. In fp32 a GEMV over fewer rows may round a row differently (seen
    on two rows equal in exact arithmetic): the argmax is then a row whose full-head logit is the maximum up to
    fp32 rounding.
    """

    fmt = "screened"

    def __init__(self, weight: torch.Tensor, int8: QuantizedHead) -> None:
        if int8.fmt != "int8_cpu" or tuple(weight.shape) != int8.shape:
            raise ValueError("a screened head needs the int8_cpu copy of its own weight")
        self.weight, self.int8 = weight, int8
        v, h = int8.shape
        self.shape = (v, h)
        self.scales = int8.operand[1].to(torch.float32)  # (V,) s_r
        self.c = 1.01 * 127 * h * 2.0 ** -24
        self.source, self.open_seconds = int8.source, int8.open_seconds

    @property
    def nbytes(self) -> int:
        """Bytes beyond the model's head: the int8 copy (the bf16 rows stay the model's)."""
        return self.int8.nbytes

    def __repr__(self) -> str:
        return f"ScreenedHead({self.shape[0]}x{self.shape[1]}, int8 screen {self.nbytes / 2**20:.1f} MiB)"

    @torch.no_grad()
    def bounds(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, lo, hi), each (N, V) fp32, for hidden (N, H): the screen's logits and the certified interval of the
        full head's logits (see the class docstring)."""
        h = hidden.reshape(-1, hidden.shape[-1])
        a = self.int8(h.to(torch.bfloat16)).float()  # (N, V)
        l1 = h.float().abs().sum(dim=1, keepdim=True) * (1 + 1e-5)  # (N, 1) ||h||_1, its own rounding covered
        k = 0.5 + self.c + (0.0 if h.dtype == torch.bfloat16 else 0.25)
        sl = self.scales[None, :] * l1  # (N, V) s_r ||h||_1
        m = sl * k + _ULP_BF16 * a.abs()
        e = 2 * _ULP_BF16 * (a.abs() + m) + self.c * sl
        return a, a - m - e, a + m + e

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits (..., V) in hidden's dtype (survivors exact, the rest the screen's value) and the number of
        rows computed exactly (the union over the N tokens)."""
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        a, lo, hi = self.bounds(h)
        keep = hi >= lo.max(dim=1, keepdim=True).values  # (N, V)
        rows = torch.nonzero(keep.any(dim=0)).flatten()  # (K,)
        exact = torch.nn.functional.linear(h.to(self.weight.dtype), self.weight.index_select(0, rows))  # (N, K)
        logits = a.to(hidden.dtype)
        logits[:, rows] = torch.where(keep[:, rows], exact.to(hidden.dtype), logits[:, rows])
        return logits.reshape(*hidden.shape[:-1], -1), int(rows.numel())
