import math

import numpy as np
import pytest
import torch

from smallthinker_lab.engine.quant import (
    FORMATS,
    as_uint8,
    dequantize_int8,
    dequantize_q4_0,
    dequantize_q4_0_rows,
    get_format,
    quantize_int8,
    quantize_q4_0,
)


def q4_0_reference(w: np.ndarray) -> bytes:
    """ggml's quantize_row_q4_0_ref, scalar, element by element in float32."""
    out = bytearray()
    for row in w.astype(np.float32):
        for b in range(0, len(row), 32):
            x = row[b:b + 32]
            amax, vmax = np.float32(0), np.float32(0)
            for v in x:
                if amax < abs(v):
                    amax, vmax = abs(v), v
            d = np.float32(vmax / np.float32(-8))
            inv = np.float32(np.float32(1) / d) if d != 0 else np.float32(0)
            q = [min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5)))) for v in x]  # int() truncates
            out += np.float16(d).tobytes()
            out += bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return bytes(out)


def q4_0_dequant_reference(buf: bytes, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for b in range(cols // 32):
            blk = buf[(r * cols // 32 + b) * 18:][:18]
            d = np.float32(np.frombuffer(blk[:2], np.float16)[0])
            for j in range(16):
                out[r, b * 32 + j] = np.float32((blk[2 + j] & 0x0F) - 8) * d
                out[r, b * 32 + j + 16] = np.float32((blk[2 + j] >> 4) - 8) * d
    return out


def tricky_matrix(rows: int = 6, cols: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 2, rows)[:, None]
    w[0, :32] = 0.0  # an all-zero block: d = 0, every q = 8
    w[1, 32:64] = 0.0
    w[1, 40], w[1, 50] = -0.75, 0.75  # tie on |x|: the first one (negative) sets the sign of d
    w[2, 64:96] = torch.linspace(-1, 1, 32)  # exact halves hit the +8.5 rounding edges
    w[3, 96:128] = torch.randint(-8, 8, (32,), generator=gen).float() / 8
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_0_bit_exact_with_ggml_reference(dtype):
    w = tricky_matrix().to(dtype)
    got = quantize_q4_0(w)
    assert got.dtype == torch.uint8 and got.dim() == 1
    assert bytes(got.numpy()) == q4_0_reference(w.float().numpy())


def test_q4_0_bit_exact_with_gguf_quants():
    """The same bytes as llama.cpp's own Python quantiser, and the same decoded values."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    w = tricky_matrix(rows=8, cols=256, seed=1)
    ours = quantize_q4_0(w)
    theirs = quants.quantize(w.numpy(), T.Q4_0)
    assert bytes(ours.numpy()) == theirs.tobytes()
    np.testing.assert_array_equal(dequantize_q4_0(ours, w.shape).numpy(), quants.dequantize(theirs, T.Q4_0))


def test_q4_0_dequant_matches_reference_and_ggml_formula():
    w = tricky_matrix()
    buf = quantize_q4_0(w)
    deq = dequantize_q4_0(buf, w.shape)
    np.testing.assert_array_equal(deq.numpy(), q4_0_dequant_reference(bytes(buf.numpy()), *w.shape))
    assert torch.all(deq[0, :32] == 0)
    assert deq[1, 40] == -0.75  # the extreme value is exact: q = 0, d = 0.75 / 8
    assert dequantize_q4_0(buf, w.shape, torch.bfloat16).dtype == torch.bfloat16


def test_q4_0_round_trip_error_and_size():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    buf = quantize_q4_0(w)
    assert buf.numel() == 64 * 256 // 32 * 18
    assert FORMATS["q4_0"].bits_per_weight(w.shape) == 4.5
    err = (dequantize_q4_0(buf, w.shape) - w).abs().reshape(64, 8, 32)
    amax = w.abs().reshape(64, 8, 32).amax(-1, keepdim=True)
    # step |d| = amax / 8, levels -8..7 steps: rounding keeps the error within half a step, plus the fp16 scale's
    # rounding (|q - 8| <= 8 times 2^-11 relative: 0.004 step), except above +7 steps on the side opposite the
    # extreme, clipped to q = 15: within one step
    step = amax / 8
    inside = w.abs().reshape(64, 8, 32) <= 7 * amax / 8
    assert torch.all(err <= 1.004 * step)
    assert torch.all(err[inside] <= 0.504 * step.expand_as(err)[inside])
    assert (err[~inside] > 0.51 * step.expand_as(err)[~inside]).any()  # the clipped edge is real
    assert err.norm() < 0.1 * w.norm()  # 4-bit on Gaussian weights: ~8.5% relative RMS error


def test_q4_0_rejects_columns_not_multiple_of_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_q4_0(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="divisible by 32"):
        FORMATS["q4_0"].nbytes((4, 48))


def test_q4_0_rows_subset_equals_full_decode():
    w = torch.randn(40, 96)
    buf = quantize_q4_0(w)
    rows = torch.tensor([39, 0, 7, 7, 12])
    np.testing.assert_array_equal(dequantize_q4_0_rows(buf, w.shape, rows).numpy(),
                                  dequantize_q4_0(buf, w.shape)[rows].numpy())


def test_int8_round_trip():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 100, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    w[5] = 0.0
    buf = quantize_int8(w)
    assert buf.numel() == FORMATS["int8"].nbytes(w.shape) == 16 * 4 + 16 * 100
    deq = dequantize_int8(buf, w.shape)
    step = w.abs().amax(1, keepdim=True) / 127
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(deq[5] == 0)
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)  # the row max is exact


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_registry_encode_decode_on_flat_buffers(name, tmp_path):
    fmt = get_format(name)
    w = torch.randn(3, 16, 64)  # leading dims flatten to rows (48: q4_0_cpu needs a multiple of 16)
    buf = fmt.encode(w)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == fmt.nbytes(w.shape)
    tol = {"fp32": 0, "fp16": 1e-3, "bf16": 1e-2, "int8": 2e-2, "q4_0": 0.3, "ggml_q4_0": 0.3, "ggml_q8_0": 2e-2,
           "int8_cpu": 2e-2, "q4_0_cpu": 0.3, "q4_0x8": 0.3}[name]
    back = fmt.decode(buf, w.shape, torch.float32)
    assert back.shape == w.shape and (back - w).abs().max() <= tol * w.abs().max()
    # a page-aligned numpy buffer holding several matrices, as the engine's expert file does
    page = 4096
    slot = -(-fmt.nbytes(w.shape) // page) * page
    arena = np.zeros(2 * slot, np.uint8)
    arena[slot:slot + buf.numel()] = buf.numpy()
    view = as_uint8(arena)[slot:slot + fmt.nbytes(w.shape)]
    np.testing.assert_array_equal(fmt.decode(view, w.shape, torch.float32).numpy(), back.numpy())
    # through a file and a read-only bytes object
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(buf.numpy()))
    np.testing.assert_array_equal(fmt.decode(path.read_bytes(), w.shape, torch.float32).numpy(), back.numpy())
    rows = torch.tensor([0, 23, 5])
    np.testing.assert_array_equal(fmt.decode_rows(buf, w.shape, rows, torch.float32).numpy(),
                                  back.reshape(48, 64)[rows].numpy())
    with pytest.raises(ValueError, match="bytes"):
        fmt.decode(buf[:-2], w.shape)


def test_raw_formats_decode_without_copy():
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    arena = np.zeros(4096, np.uint8)
    arena[:512] = FORMATS["bf16"].encode(w).numpy()
    t = FORMATS["bf16"].decode(as_uint8(arena)[:512], w.shape, torch.bfloat16)
    assert torch.equal(t, w)
    assert t.data_ptr() == arena.ctypes.data  # a view of the buffer itself


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown weight format"):
        get_format("q4_k")


def test_bits_per_weight():
    assert {n: f.bits_per_weight((768, 1536)) for n, f in FORMATS.items()} == {
        "fp32": 32, "fp16": 16, "bf16": 16, "int8": 8 + 32 / 1536, "q4_0": 4.5,
        "ggml_q4_0": 4.5 + 8 * 64 / (768 * 1536), "ggml_q8_0": 8.5 + 8 * 64 / (768 * 1536),  # + the 64-byte prefix
        "int8_cpu": 8 + 16 / 1536, "q4_0x8": 4.5,
        "q4_0_cpu": 5}  # the int4 kernel's scales and zeros: 2 bf16 per 32 weights
    assert math.isclose(FORMATS["q4_0"].nbytes((768, 1536)), 663_552)  # the reference's B for the 4B expert


def test_q4_0x8_holds_the_q4_0_blocks_with_rows_interleaved_by_8():
    """q4_0x8 (the native CPU kernel's layout) is q4_0 reordered: its bytes map back to q4_0's exactly, it decodes to
    the same weights (whole and by rows), and rows not in groups of 8 are refused, naming the need."""
    from smallthinker_lab.engine import quant

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(9))
    rows_bytes, x8 = quant.quantize_q4_0(w), quant.quantize_q4_0x8(w)
    assert x8.numel() == rows_bytes.numel() and not torch.equal(x8, rows_bytes)
    assert torch.equal(quant.q4_0_from_x8(x8, w.shape), rows_bytes)
    assert torch.equal(quant.dequantize_q4_0x8(x8, w.shape), quant.dequantize_q4_0(rows_bytes, w.shape))
    idx = torch.tensor([0, 7, 8, 23])
    assert torch.equal(quant.dequantize_q4_0x8_rows(x8, w.shape, idx), quant.dequantize_q4_0(rows_bytes, w.shape)[idx])
    with pytest.raises(ValueError, match="multiple of 8"):
        quant.quantize_q4_0x8(torch.randn(12, 64))
