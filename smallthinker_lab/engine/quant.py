"""Weight-only quantisation formats, dequantised at use: bf16 / fp16 / fp32 raw, int8 per row, ggml Q4_0.

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
"""

from __future__ import annotations

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
    pos = x.abs().argmax(dim=-1, keepdim=True)  # first index of the largest |x|, as ggml's strict '<' scan
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
def int8_nbytes(shape: Sequence[int]) -> int:
    rows, cols = _rows_cols(shape)
    return rows * 4 + rows * cols


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 of ``w`` (..., C) -> flat uint8: R fp32 scales, then R x C int8."""
    rows, cols = _rows_cols(w.shape)
    x = w.detach().to(torch.float32).reshape(rows, cols)  # (R, C)
    scale = x.abs().amax(dim=1) / 127.0  # (R,)
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
    d = x.abs().amax(dim=-1, keepdim=True) / 127  # (R, B, 1)
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


FORMATS: dict[str, QuantFormat] = {
    "fp32": _raw_format("fp32", torch.float32),
    "fp16": _raw_format("fp16", torch.float16),
    "bf16": _raw_format("bf16", torch.bfloat16),
    "int8": QuantFormat("int8", int8_nbytes, quantize_int8, dequantize_int8, dequantize_int8_rows),
    "q4_0": QuantFormat("q4_0", q4_0_nbytes, quantize_q4_0, dequantize_q4_0, dequantize_q4_0_rows),
    "ggml_q4_0": _ggml_format("ggml_q4_0", QK4_0, Q4_0_BLOCK_BYTES, quantize_q4_0, _q4_0_blocks, _q4_0_values),
    "ggml_q8_0": _ggml_format("ggml_q8_0", QK8_0, Q8_0_BLOCK_BYTES, quantize_q8_0, _q8_0_blocks, _q8_0_values),
}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}") from None
