"""Weight-only quantisation formats, dequantised at use: bf16 / fp16 / fp32 raw, int8 per row, ggml Q4_0.

Q4_0 is kept here as the bit-exact reference (the same bytes as ``gguf.quants``, tests/test_quant.py) because the
engine encodes and decodes torch tensors in place in its slots and row ranges, which ``gguf.quants`` (numpy, whole
arrays) does not; GGUF files themselves are read and written with ``gguf``.

Every format encodes a weight tensor to a flat ``torch.uint8`` buffer and decodes such a buffer back, so the
engine's expert file can hold each matrix as raw bytes (see ``FORMATS``). Decoding accepts a uint8 tensor, a numpy
array or anything with the buffer protocol (bytes, mmap, memoryview) and does not copy the buffer where the format
allows it (the raw float formats decode to a view when the requested dtype is the stored one).

Shape letters: R rows (output features), C columns (input features, the dot-product dimension), B = C / 32 blocks.
Byte order is the machine's (little-endian on x86 and ARM, as ggml assumes).

Q4_0 (ggml ``block_q4_0``, ``quantize_row_q4_0_ref``): each row is cut into blocks of 32 weights; a block is an
fp16 scale d followed by 16 bytes of nibbles (byte j holds element j in its low nibble and element j + 16 in its
high nibble), 18 bytes per 32 weights = 4.5 bits per weight. With m the signed value of largest magnitude in the
block (the first one on ties): d = m / -8, id = 1/d (0 when d == 0), q = min(15, trunc(x * id + 8.5)), all in fp32;
the stored d is fp16(d) and a weight decodes to fp16(d) * (q - 8).

int8: per output row a symmetric absmax scale s = max|w_row| / 127 (fp32, 1 where the row is all zeros),
q = round(w / s) clamped to [-127, 127]. Layout: R fp32 scales, then R x C int8 (scales first, so they are
4-byte aligned whenever the buffer is).

ggml_q4_0 / ggml_q8_0: ggml blocks exactly as a GGUF file holds them (Q8_0: fp16 d + 32 int8, value d * q), after a
64-byte prefix saying which way the blocks run: axis 0, along C (what a GGUF's gate and up expert matrices are,
and what ``encode`` writes), or axis 1, along R: the buffer holds the transpose [C, R] row by row, as a GGUF
holds the down matrix (blocks along the expert's F) that the bundle reads as [F, H]. So a GGUF's Q4_0 / Q8_0
experts go into the bundle byte for byte, never requantised (engine/gguf.py).
The kernel formats hold a matrix in the operand layout of torch's weight-only CPU kernels, so a product reads the
stored bytes as they are (:mod:`.cpu_kernels`); the kernels are fast only with bf16 activations and bf16 scales.

q4_0_cpu (``torch._weight_int4pack_mm_for_cpu``, group size 32): the kernel's weight is (q - 8) * s + z per group
of 32 along C, the same shape as ggml's (q - 8) * d, so a Q4_0 block maps to q unchanged, s = bf16(d), z = 0.
Exact except for the scale: bf16 keeps 8 of fp16's 11 significant bits, so a weight differs from ggml's by at most
2^-8 of |(q - 8) * d| (bf16's unit roundoff; the kernel then computes (q - 8) * s exactly in fp32). An exact
mapping needs fp16 scales, which need fp16 activations: that kernel path is 50x slower here (cpu_kernels.py).
Layout: the nibbles as ``torch._convert_weight_to_int4pack_for_cpu`` packs them (R, C/2), then the scales and
zeros (C/32, R, 2) bf16.
The nibble order depends on the CPU kernels torch dispatches to (AVX512, AVX2, ...): ``int4pack_layout()`` names
it, and a bundle records it. Needs R divisible by 16 (the packing's requirement).

int8_cpu (``torch._weight_int8pack_mm``, per-row scales): as int8, but the scale is rounded up to bf16 before
quantising, so the kernel's weight q * s is the format's value exactly. Layout: R bf16 scales, then R x C int8.
Needs C divisible by 16 (torch 2.13's kernel gives wrong results, then crashes, for C = 40 and several rows).
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

QK4_0 = 32  # weights per Q4_0 block
Q4_0_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles


# ------------------------------------------------------------------ buffers
def as_uint8(buf) -> torch.Tensor:
    """A flat ``torch.uint8`` view of ``buf`` (uint8 tensor, numpy array or a buffer-protocol object), no copy.

    Read-only buffers (``bytes``, a read-only mmap) are viewed too; the caller must not write into the result.
    """
    if isinstance(buf, torch.Tensor):
        t = buf if buf.dtype == torch.uint8 else buf.contiguous().view(torch.uint8)
        return t.reshape(-1)
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8)
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
    with warnings.catch_warnings():  # torch warns that a read-only numpy array becomes a writable tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _view_as(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as ``dtype``; copies only if its offset is not aligned for ``dtype``."""
    try:
        return flat.view(dtype)
    except RuntimeError:
        return flat.clone().view(dtype)


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """(R, C) of a weight shape: C the last dim, R the product of the others."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("a quantised weight needs at least one dimension")
    return math.prod(shape[:-1]), shape[-1]


def _check_len(flat: torch.Tensor, nbytes: int, fmt: str, shape) -> None:
    if flat.numel() != nbytes:
        raise ValueError(f"{fmt} buffer for shape {tuple(shape)} must be {nbytes} bytes, got {flat.numel()}")


# ------------------------------------------------------------------ Q4_0
def q4_0_nbytes(shape: Sequence[int]) -> int:
    rows, cols = _rows_cols(shape)
    _check_q4_0_cols(cols)
    return rows * (cols // QK4_0) * Q4_0_BLOCK_BYTES


def _check_q4_0_cols(cols: int) -> None:
    if cols % QK4_0:
        raise ValueError(f"Q4_0 needs the last dimension (columns) divisible by {QK4_0}, got {cols}")


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q4_0 of ``w`` (..., C) quantised along C -> flat uint8 (R * C/32 * 18,), R = prod of the other dims."""
    rows, cols = _rows_cols(w.shape)
    _check_q4_0_cols(cols)
    x = w.detach().to(torch.float32).reshape(rows, cols // QK4_0, QK4_0)  # (R, B, 32)
    # the first index of the largest |x|, as ggml's strict '<' scan. Not argmax: on CUDA it may return any of tied
    # indices (+v and -v tie in |x|, and then the scale's sign differs), so the lowest tied index is taken explicitly
    a = x.abs()
    lanes = torch.arange(QK4_0, device=x.device).expand_as(a)
    pos = torch.where(a == a.amax(dim=-1, keepdim=True), lanes, QK4_0).amin(dim=-1, keepdim=True)
    m = x.gather(-1, pos)  # (R, B, 1) signed value of largest magnitude
    d = m / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = (x * inv + 8.5).trunc().clamp_(max=15).to(torch.uint8)  # (R, B, 32); (int8_t) cast truncates
    qs = q[..., :16] | (q[..., 16:] << 4)  # (R, B, 16)
    d_bytes = d.to(torch.float16).view(torch.uint8)  # (R, B, 2)
    return torch.cat([d_bytes, qs], dim=-1).reshape(-1)  # (R * B * 18,)


def _q4_0_blocks(flat: torch.Tensor, rows: int, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (R, B, 1) fp32 and nibble bytes (R, B, 16) uint8 of a flat Q4_0 buffer."""
    blocks = flat.view(rows, nblocks, Q4_0_BLOCK_BYTES)  # (R, B, 18)
    halves = _view_as(flat, torch.float16).view(rows, nblocks, Q4_0_BLOCK_BYTES // 2)  # (R, B, 9)
    d = halves[..., :1].to(torch.float32)  # (R, B, 1)
    return d, blocks[..., 2:]


def _q4_0_values(d: torch.Tensor, qs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, B, 1) fp32 scales and (R, B, 16) nibble bytes -> (R, B, 32) weights in ``dtype``."""
    qs = qs.contiguous()  # bitwise ops on the strided slice are ~25x slower
    # one dtype per op: mixed uint8 * fp32 takes a slow path
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).view(torch.int8).sub_(8).to(torch.float32)  # (R, B, 2, 16)
    q.mul_(d[..., None])  # low nibbles are elements 0-15 of the block, high nibbles 16-31
    return q.reshape(*d.shape[:-1], QK4_0).to(dtype)  # (R, B, 32)


def dequantize_q4_0(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a flat Q4_0 buffer to a tensor of ``shape`` (products in fp32, as ggml, then cast to ``dtype``)."""
    rows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, q4_0_nbytes(shape), "Q4_0", shape)
    d, qs = _q4_0_blocks(flat, rows, cols // QK4_0)
    return _q4_0_values(d, qs, dtype).reshape(tuple(shape))


def dequantize_q4_0_rows(buf, shape: Sequence[int], rows: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode only the given rows (long tensor of row ids) of a 2-D Q4_0 matrix -> (len(rows), C)."""
    nrows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, q4_0_nbytes(shape), "Q4_0", shape)
    d, qs = _q4_0_blocks(flat, nrows, cols // QK4_0)
    return _q4_0_values(d.index_select(0, rows), qs.index_select(0, rows), dtype).reshape(-1, cols)


# ------------------------------------------------------------------ int8
def _div_exact(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, correctly rounded on every device: CUDA divides a tensor by a Python scalar as a product with
    its reciprocal (1 ulp off at times), which changed an int8 scale, and so a byte of a bundle quantised on a GPU
    against the same weights quantised on the CPU; a tensor divisor takes the IEEE division on both."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def int8_nbytes(shape: Sequence[int]) -> int:
    rows, cols = _rows_cols(shape)
    return rows * 4 + rows * cols


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 of ``w`` (..., C) -> flat uint8: R fp32 scales, then R x C int8."""
    rows, cols = _rows_cols(w.shape)
    x = w.detach().to(torch.float32).reshape(rows, cols)  # (R, C)
    scale = _div_exact(x.abs().amax(dim=1), 127.0)  # (R,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return torch.cat([scale.view(torch.uint8), q.view(torch.uint8).reshape(-1)])


def _int8_parts(flat: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _view_as(flat[: rows * 4], torch.float32)  # (R,)
    q = flat[rows * 4:].view(torch.int8).view(rows, cols)  # (R, C)
    return scale, q


def dequantize_int8(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, int8_nbytes(shape), "int8", shape)
    scale, q = _int8_parts(flat, rows, cols)
    return (q.to(torch.float32) * scale[:, None]).to(dtype).reshape(tuple(shape))


def dequantize_int8_rows(buf, shape: Sequence[int], rows: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    nrows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, int8_nbytes(shape), "int8", shape)
    scale, q = _int8_parts(flat, nrows, cols)
    return (q.index_select(0, rows).to(torch.float32) * scale.index_select(0, rows)[:, None]).to(dtype)


# ------------------------------------------------------------------ ggml blocks (GGUF bytes as they are)
QK8_0 = 32  # weights per Q8_0 block
Q8_0_BLOCK_BYTES = 34  # fp16 scale + 32 int8
GGML_PREFIX = 64  # bytes before the blocks: b"GGML", the axis byte, zeros (keeps the blocks 64-byte aligned)
_GGML_TAG = b"GGML"


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q8_0 (``quantize_row_q8_0_ref``) of ``w`` (..., C) along C -> flat uint8 (R * C/32 * 34,):
    d = max|x| / 127, q = roundf(x / d) (half away from zero), stored d = fp16(d)."""
    rows, cols = _rows_cols(w.shape)
    if cols % QK8_0:
        raise ValueError(f"Q8_0 needs the last dimension (columns) divisible by {QK8_0}, got {cols}")
    x = w.detach().to(torch.float32).reshape(rows, cols // QK8_0, QK8_0)  # (R, B, 32)
    d = _div_exact(x.abs().amax(dim=-1, keepdim=True), 127.0)  # (R, B, 1)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    y = x * inv
    q = (y.sign() * (y.abs() + 0.5).floor()).to(torch.int8)  # C's roundf
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1).reshape(-1)


def _q8_0_blocks(flat: torch.Tensor, rows: int, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (R, B, 1) fp32 and quants (R, B, 32) int8 of flat Q8_0 blocks."""
    blocks = flat.view(rows, nblocks, Q8_0_BLOCK_BYTES)
    halves = _view_as(flat, torch.float16).view(rows, nblocks, Q8_0_BLOCK_BYTES // 2)
    return halves[..., :1].to(torch.float32), blocks[..., 2:].view(torch.int8)


def _q8_0_values(d: torch.Tensor, qs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qs.to(torch.float32) * d).to(dtype)  # (R, B, 32)


def ggml_prefix(axis: int) -> bytes:
    """The 64 bytes before a ggml_* buffer's blocks: 0 = blocks along C, 1 = the buffer holds [C, R] (see top)."""
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    return _GGML_TAG + bytes([axis]) + bytes(GGML_PREFIX - len(_GGML_TAG) - 1)


def _ggml_format(name: str, qk: int, block_bytes: int, quantize, blocks, values) -> QuantFormat:
    def nbytes(shape: Sequence[int]) -> int:
        rows, cols = _rows_cols(shape)
        if (rows * cols) % qk:
            raise ValueError(f"{name} needs a multiple of {qk} weights, got shape {tuple(shape)}")
        return GGML_PREFIX + rows * cols // qk * block_bytes

    def split(buf, shape) -> tuple[torch.Tensor, int, int, int]:
        """(blocks, stored rows, stored cols, axis) of a buffer for the logical (R, C) ``shape``."""
        rows, cols = _rows_cols(shape)
        flat = as_uint8(buf)
        _check_len(flat, nbytes(shape), name, shape)
        head = bytes(flat[:len(_GGML_TAG) + 1].tolist())
        if head[:len(_GGML_TAG)] != _GGML_TAG or head[-1] not in (0, 1):
            raise ValueError(f"{name} buffer has no ggml prefix (first bytes {head!r}): not written by this format")
        axis = head[-1]
        stored = (rows, cols) if axis == 0 else (cols, rows)
        if stored[1] % qk:
            raise ValueError(f"{name} blocks of {qk} do not tile rows of {stored[1]} weights")
        return flat[GGML_PREFIX:], stored[0], stored[1], axis

    def encode(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.frombuffer(bytearray(ggml_prefix(0)), dtype=torch.uint8), quantize(w)])

    def decode(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat, r, c, axis = split(buf, shape)
        d, qs = blocks(flat, r, c // qk)
        w = values(d, qs, dtype).reshape(r, c)
        return (w if axis == 0 else w.t().contiguous()).reshape(tuple(shape))

    def decode_rows(buf, shape: Sequence[int], rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat, r, c, axis = split(buf, shape)
        d, qs = blocks(flat, r, c // qk)  # (r, B, 1), (r, B, k)
        if axis == 0:
            return values(d.index_select(0, rows), qs.index_select(0, rows), dtype).reshape(-1, c)
        # logical row i is stored column i: decode only the blocks holding the wanted columns
        b = rows // qk
        w = values(d.index_select(1, b), qs.index_select(1, b), dtype)  # (r, n, qk)
        return w.gather(2, (rows % qk).view(1, -1, 1).expand(r, -1, 1)).squeeze(2).t().contiguous()  # (n, r)

    return QuantFormat(name, nbytes, encode, decode, decode_rows)

# ------------------------------------------------------------------ q4_0_cpu: torch's int4 CPU kernel layout
INT4_ROWS = 16  # the packing needs R divisible by this
INT8_CPU_COLS = 16  # the int8 kernel needs C divisible by this


def _check_q4_0_cpu(rows: int, cols: int) -> None:
    _check_q4_0_cols(cols)
    if rows % INT4_ROWS:
        raise ValueError(f"q4_0_cpu needs the rows (output features) divisible by {INT4_ROWS}, got {rows}")


def q4_0_cpu_nbytes(shape: Sequence[int]) -> int:
    rows, cols = _rows_cols(shape)
    _check_q4_0_cpu(rows, cols)
    return rows * cols // 2 + (cols // QK4_0) * rows * 2 * 2


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """(R, C) int values 0..15 -> the kernel's packed (R, C/2) uint8."""
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=1)
def int4pack_layout() -> str:
    """Names the nibble order of torch's int4 CPU packing in this process: the kernel capability torch dispatches
    to and a digest of a probe matrix packed (a bundle packed under another layout would compute garbage)."""
    probe = torch.arange(64 * 64, dtype=torch.int32).remainder_(13).view(64, 64)
    digest = hashlib.sha256(_int4_pack(probe).numpy().tobytes()).hexdigest()[:16]
    return f"{torch.backends.cpu.get_cpu_capability()}-{digest}"


@functools.lru_cache(maxsize=8)
def _int4_source(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of the packed (R, C/2) buffer (low nibble first), the flat index r * C + c it came from:
    found by packing the index's base-16 digits, so it holds for whatever order the kernels use."""
    index = torch.arange(rows * cols, dtype=torch.int64)
    src = torch.zeros(rows * cols, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(rows * cols, 16)))):
        packed = _int4_pack(((index >> (4 * digit)) & 15).view(rows, cols)).reshape(-1)
        nib = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64)
        src |= nib << (4 * digit)
    return src


def q4_0_cpu_parts(buf, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel operands of a q4_0_cpu buffer, views of its bytes: packed (R, C/2) uint8, scales (C/32, R, 2)."""
    rows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, q4_0_cpu_nbytes(shape), "q4_0_cpu", shape)
    n = rows * cols // 2
    return flat[:n].view(rows, cols // 2), _view_as(flat[n:], torch.bfloat16).view(cols // QK4_0, rows, 2)


def repack_q4_0(buf, shape: Sequence[int]) -> torch.Tensor:
    """A ggml Q4_0 buffer -> q4_0_cpu bytes: the same q, scale bf16(d), zero 0 (see the module docstring)."""
    rows, cols = _rows_cols(shape)
    _check_q4_0_cpu(rows, cols)
    flat = as_uint8(buf)
    _check_len(flat, q4_0_nbytes(shape), "Q4_0", shape)
    d, qs = _q4_0_blocks(flat, rows, cols // QK4_0)  # (R, B, 1), (R, B, 16)
    qs = qs.contiguous()
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols)  # (R, C): byte j -> elements j, j + 16
    scales = torch.stack([d[..., 0].t(), torch.zeros_like(d[..., 0].t())], dim=-1)  # (B, R, 2)
    packed = _int4_pack(q).reshape(-1)
    return torch.cat([packed, scales.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1)])


def quantize_q4_0_cpu(w: torch.Tensor) -> torch.Tensor:
    """ggml Q4_0 of ``w`` (R, C), repacked for the int4 kernel -> flat uint8 (``q4_0_cpu_nbytes``)."""
    return repack_q4_0(quantize_q4_0(w), w.shape)


def dequantize_q4_0_cpu(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights the int4 kernel computes with: (q - 8) * s + z in fp32, then cast to ``dtype``."""
    rows, cols = _rows_cols(shape)
    packed, sz = q4_0_cpu_parts(buf, shape)
    flat = packed.reshape(-1)
    nib = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    q = torch.empty(rows * cols, dtype=torch.uint8)
    q[_int4_source(rows, cols)] = nib
    q = q.view(rows, cols // QK4_0, QK4_0).view(torch.int8).sub(8).to(torch.float32)  # (R, B, 32)
    s, z = (sz[..., i].t().to(torch.float32)[..., None] for i in (0, 1))  # (R, B, 1)
    return (q * s + z).to(dtype).reshape(tuple(shape))


def dequantize_q4_0_cpu_rows(buf, shape: Sequence[int], rows: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of ``dequantize_q4_0_cpu`` (decodes the whole matrix: a reference, not a sparse fast path)."""
    return dequantize_q4_0_cpu(buf, shape, dtype).reshape(-1, shape[-1]).index_select(0, rows)


# ------------------------------------------------------------------ int8_cpu: torch's int8 CPU kernel layout
def _check_int8_cpu(cols: int) -> None:
    if cols % INT8_CPU_COLS:
        raise ValueError(f"int8_cpu needs the last dimension (columns) divisible by {INT8_CPU_COLS}, got {cols}")


def int8_cpu_nbytes(shape: Sequence[int]) -> int:
    rows, cols = _rows_cols(shape)
    _check_int8_cpu(cols)
    return rows * 2 + rows * cols


def _bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= each positive fp32 value (so |w| / s <= 127 stays true)."""
    b = x.to(torch.bfloat16)
    low = b.to(torch.float32) < x
    return torch.where(low, torch.nextafter(b, torch.full_like(b, math.inf)), b)


def quantize_int8_cpu(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 with bf16 scales -> flat uint8: R bf16 scales, then R x C int8."""
    rows, cols = _rows_cols(w.shape)
    _check_int8_cpu(cols)
    x = w.detach().to(torch.float32).reshape(rows, cols)  # (R, C)
    amax = _div_exact(x.abs().amax(dim=1), 127.0)  # (R,)
    scale = _bf16_round_up(torch.where(amax > 0, amax, torch.ones_like(amax)))  # (R,) bf16
    q = torch.round(x / scale.to(torch.float32)[:, None]).clamp_(-127, 127).to(torch.int8)
    return torch.cat([scale.view(torch.uint8), q.view(torch.uint8).reshape(-1)])


def int8_cpu_parts(buf, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel operands of an int8_cpu buffer, views of its bytes: q (R, C) int8, scales (R,) bf16."""
    rows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, int8_cpu_nbytes(shape), "int8_cpu", shape)
    return flat[rows * 2:].view(torch.int8).view(rows, cols), _view_as(flat[: rows * 2], torch.bfloat16)


def dequantize_int8_cpu(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q, scale = int8_cpu_parts(buf, shape)
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype).reshape(tuple(shape))


def dequantize_int8_cpu_rows(buf, shape: Sequence[int], rows: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q, scale = int8_cpu_parts(buf, shape)
    return (q.index_select(0, rows).to(torch.float32) * scale.index_select(0, rows).to(torch.float32)[:, None]
            ).to(dtype)


# ------------------------------------------------------------------ raw floats
def _raw_format(name: str, stored: torch.dtype) -> QuantFormat:
    size = torch.empty((), dtype=stored).element_size()

    def nbytes(shape: Sequence[int]) -> int:
        return math.prod(int(s) for s in shape) * size

    def encode(w: torch.Tensor) -> torch.Tensor:
        return w.detach().to(stored).contiguous().view(torch.uint8).reshape(-1)

    def decode(buf, shape: Sequence[int], dtype: torch.dtype = stored) -> torch.Tensor:
        flat = as_uint8(buf)
        _check_len(flat, nbytes(shape), name, shape)
        return _view_as(flat, stored).view(tuple(shape)).to(dtype)  # a view when dtype == stored

    def decode_rows(buf, shape: Sequence[int], rows: torch.Tensor, dtype: torch.dtype = stored) -> torch.Tensor:
        nrows, cols = _rows_cols(shape)
        return decode(buf, shape, stored).reshape(nrows, cols).index_select(0, rows).to(dtype)

    return QuantFormat(name, nbytes, encode, decode, decode_rows)


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class QuantFormat:
    """How one weight matrix is stored as bytes.

    ``nbytes(shape)``: size of the encoded buffer; ``encode(w)`` -> flat uint8 tensor;
    ``decode(buf, shape, dtype)`` -> tensor of ``shape``; ``decode_rows(buf, shape, rows, dtype)`` -> (len(rows), C),
    only the rows the sparse kernel needs (rows index the flattened leading dims).
    """

    name: str
    nbytes: Callable[[Sequence[int]], int]
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[..., torch.Tensor]
    decode_rows: Callable[..., torch.Tensor]

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        return 8 * self.nbytes(shape) / math.prod(int(s) for s in shape)


# ------------------------------------------------------------------ q4_0x8: the native CPU kernel's layout
# The same Q4_0 blocks as "q4_0", reordered: rows in groups of 8, and per group and block column the 8 rows' fp16
# scales (16 bytes), then their 8 x 16 bytes of nibbles (144 bytes). The native kernel (engine/native.py, layout
# "x8") computes 8 rows a pass from it; rows r0..r1 with r0, r1 multiples of 8 keep their byte range.
X8_ROWS = 8


def _check_x8_rows(rows: int) -> None:
    if rows % X8_ROWS:
        raise ValueError(f"q4_0x8 interleaves rows by {X8_ROWS}: {rows} rows are not a multiple of {X8_ROWS}")


def q4_0x8_nbytes(shape: Sequence[int]) -> int:
    _check_x8_rows(_rows_cols(shape)[0])
    return q4_0_nbytes(shape)


def q4_0_to_x8(buf, shape: Sequence[int]) -> torch.Tensor:
    """ggml Q4_0 rows (flat uint8 of a (R, C) matrix, R a multiple of 8) -> the q4_0x8 order (a new tensor)."""
    rows, cols = _rows_cols(shape)
    _check_x8_rows(rows)
    flat = as_uint8(buf)
    _check_len(flat, q4_0_nbytes(shape), "q4_0", shape)
    g, nb = rows // X8_ROWS, cols // QK4_0
    b = flat.view(g, X8_ROWS, nb, Q4_0_BLOCK_BYTES).permute(0, 2, 1, 3)  # (G, B, 8, 18)
    return torch.cat([b[..., :2].reshape(g, nb, 16), b[..., 2:].reshape(g, nb, 128)], dim=-1).reshape(-1)


def q4_0_from_x8(buf, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`q4_0_to_x8`."""
    rows, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, q4_0x8_nbytes(shape), "q4_0x8", shape)
    g, nb = rows // X8_ROWS, cols // QK4_0
    x = flat.view(g, nb, X8_ROWS * Q4_0_BLOCK_BYTES)
    b = torch.cat([x[..., :16].reshape(g, nb, 8, 2), x[..., 16:].reshape(g, nb, 8, 16)], dim=-1)  # (G, B, 8, 18)
    return b.permute(0, 2, 1, 3).reshape(-1)


def q4_0x8_rows(buf, shape: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """The ggml Q4_0 bytes of rows ``rows`` of a q4_0x8 matrix (flat, ``len(rows)`` rows)."""
    r, cols = _rows_cols(shape)
    flat = as_uint8(buf)
    _check_len(flat, q4_0x8_nbytes(shape), "q4_0x8", shape)
    nb = cols // QK4_0
    groups = flat.view(r // X8_ROWS, nb, X8_ROWS * Q4_0_BLOCK_BYTES)[rows // X8_ROWS]  # (K, B, 144)
    j = (rows % X8_ROWS).view(-1, 1, 1)
    at = torch.cat([2 * j + torch.arange(2).view(1, 1, 2), 16 + 16 * j + torch.arange(16).view(1, 1, 16)], dim=2)
    return torch.gather(groups, 2, at.expand(-1, nb, -1)).reshape(-1)


def quantize_q4_0x8(w: torch.Tensor) -> torch.Tensor:
    return q4_0_to_x8(quantize_q4_0(w), w.shape)


def dequantize_q4_0x8(buf, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_q4_0(q4_0_from_x8(buf, shape), shape, dtype)


def dequantize_q4_0x8_rows(buf, shape: Sequence[int], rows: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_q4_0(q4_0x8_rows(buf, shape, rows), (int(rows.numel()), _rows_cols(shape)[1]), dtype)


FORMATS: dict[str, QuantFormat] = {
    "fp32": _raw_format("fp32", torch.float32),
    "fp16": _raw_format("fp16", torch.float16),
    "bf16": _raw_format("bf16", torch.bfloat16),
    "int8": QuantFormat("int8", int8_nbytes, quantize_int8, dequantize_int8, dequantize_int8_rows),
    "q4_0": QuantFormat("q4_0", q4_0_nbytes, quantize_q4_0, dequantize_q4_0, dequantize_q4_0_rows),
    "q4_0x8": QuantFormat("q4_0x8", q4_0x8_nbytes, quantize_q4_0x8, dequantize_q4_0x8, dequantize_q4_0x8_rows),
    "ggml_q4_0": _ggml_format("ggml_q4_0", QK4_0, Q4_0_BLOCK_BYTES, quantize_q4_0, _q4_0_blocks, _q4_0_values),
    "ggml_q8_0": _ggml_format("ggml_q8_0", QK8_0, Q8_0_BLOCK_BYTES, quantize_q8_0, _q8_0_blocks, _q8_0_values),
    "q4_0_cpu": QuantFormat("q4_0_cpu", q4_0_cpu_nbytes, quantize_q4_0_cpu, dequantize_q4_0_cpu,
                            dequantize_q4_0_cpu_rows),
    "int8_cpu": QuantFormat("int8_cpu", int8_cpu_nbytes, quantize_int8_cpu, dequantize_int8_cpu,
                            dequantize_int8_cpu_rows),
}
KERNEL_FORMATS = ("q4_0_cpu", "int8_cpu")  # stored in the operand layout of torch's CPU kernels (cpu_kernels.py)
NATIVE_FORMATS = ("q4_0x8",)  # the native Q4_0 kernel's layout (engine/native.py), down in the model's [H, F]


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}") from None


# ------------------------------------------------------------------ the GPU decode kernels' quantized experts
def kernel_experts(model, fmt: str, dequantise_model: bool = True):
    """The model's experts quantized for the Triton decode kernels (``smallthinker_lab.kernels.quant_experts``):
    an ExpertTable of ``fmt`` ("int8" per-row, "q4_0" ggml) records, gate/up [F, H] and down [H, F] quantized
    along their last dimension, the bytes this module's ``int8`` / ``q4_0`` formats write. ``dequantise_model``:
    also set the model's expert weights to the dequantised values (rounded to the model's dtype), so that its own
    forward (the kernel runner's prefill, an eager reference) computes the same weights up to that rounding."""
    from ..kernels.quant_experts import QUANT_FORMATS, pack_quantized

    if fmt not in QUANT_FORMATS:
        raise ValueError(f"the decode kernels read quantized experts as {QUANT_FORMATS}, not {fmt!r}")
    f = get_format(fmt)
    table = pack_quantized(model, fmt, f.encode)
    if dequantise_model:
        with torch.no_grad():
            for layer in model.model.layers:
                for ex in layer.block_sparse_moe.experts:
                    for lin in (ex.gate, ex.up, ex.down):
                        w = lin.weight
                        w.copy_(f.decode(f.encode(w.detach().float().cpu()), w.shape, torch.float32).to(w.dtype))
    return table
