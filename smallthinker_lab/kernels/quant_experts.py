"""Quantized experts for the decode kernels: their byte layouts, the launches of the int8 / Q4_0 expert products
(triton_quant.py), and packing a model's experts into a quantized ``ExpertTable``.

Formats (``EXPERT_FORMATS``): "bf16" (the bf16 kernels of triton_decode.py), "int8" and "q4_0". A quantized
table's base is a flat uint8 tensor and its offsets are byte offsets; an expert record holds gate [F, H], up [F, H]
and down [H, F] (the model's layouts, quantized along their last dimension), each at a multiple of 16 bytes.

int8 has per-row scales (one fp32 scale per output row): the product is then an int8 dot product times one scale
per row, the scales cost 4 bytes a row (0.3% at H = 1536, 0.5% for down's F = 768; per-group scales of 32 with
fp16 scales would cost 6%), and the bytes are the bundle's ``int8`` format as they are. The price is accuracy on
rows with outliers, where per-group scales would do better: Q4_0 is the per-group format here.

Bytes read per expert and token (``matrix_nbytes``): bf16 2 bytes a weight; int8 1 + 4 / C (a ~2x reduction);
Q4_0 18 / 32 = 0.5625 (~3.6x).

These modules do not quantize: the bytes come from the caller (the engine's smallthinker_lab.engine.quant, whose
``quantize_int8`` / ``quantize_q4_0`` write exactly these layouts; ``pack_quantized(model, fmt, encode)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .availability import INTERPRETER_BLOCKS, interpreted
from .tables import EXPERT_FORMATS, QK4_0, ExpertTable, _p2, check_shape, matrix_nbytes

QUANT_FORMATS = EXPERT_FORMATS[1:]
ALIGN = 64  # bytes: each matrix of a packed record starts at a multiple of this

# (rows of a weight matrix per program, warps) of the quantized products: the tiles benchmarks/bench_quant_kernels.py
# --tune chose on an H200 for the 4B shape (benchmarks/results/bench_quant_kernels.md: int8 374 -> 308 us per step,
# Q4_0 395 -> 329; bf16's products take 302 us there)
DEFAULT_QUANT_BLOCKS = {"int8": {"gate_up": (2, 4), "down": (4, 4)}, "q4_0": {"gate_up": (8, 4), "down": (2, 2)}}


def _triton():
    from . import triton_quant

    return triton_quant


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def record_layout(fmt: str, hidden: int, ffn: int) -> tuple[tuple[int, int, int], int]:
    """Byte offsets of gate, up and down in a packed expert record, and the record's stride (bytes)."""
    g = matrix_nbytes(fmt, ffn, hidden)
    d = matrix_nbytes(fmt, hidden, ffn)
    og, ou = 0, _align(g)
    od = ou + _align(g)
    return (og, ou, od), _align(od + d)


def expert_bytes(fmt: str, hidden: int, ffn: int) -> int:
    """Bytes the kernels read for one expert (gate, up and down): what a decode token reads per chosen expert."""
    return 2 * matrix_nbytes(fmt, ffn, hidden) + matrix_nbytes(fmt, hidden, ffn)


def pack_quantized(model, fmt: str, encode: Callable[[torch.Tensor], torch.Tensor]) -> ExpertTable:
    """A quantized copy of the model's experts as an ``ExpertTable`` (one uint8 base per layer, byte offsets):
    ``encode(w)`` gives the flat uint8 bytes of a weight matrix in ``fmt`` (for "int8" / "q4_0":
    ``smallthinker_lab.engine.quant.FORMATS[fmt].encode``). The model's own expert weights are left as they are."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"pack_quantized packs {QUANT_FORMATS}, not {fmt!r} (bf16: pack_experts)")
    cfg = model.config
    L, E, Fh, H = cfg.num_hidden_layers, cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    (og, ou, od), stride = record_layout(fmt, H, Fh)
    sizes = {og: matrix_nbytes(fmt, Fh, H), ou: matrix_nbytes(fmt, Fh, H), od: matrix_nbytes(fmt, H, Fh)}
    dev = model.model.layers[0].block_sparse_moe.experts[0].gate.weight.device
    bases = []
    with torch.no_grad():
        for layer in model.model.layers:
            flat = torch.zeros(E * stride, dtype=torch.uint8, device=dev)
            for e, ex in enumerate(layer.block_sparse_moe.experts):
                for off, lin in zip((og, ou, od), (ex.gate, ex.up, ex.down)):
                    b = encode(lin.weight.detach().float().cpu()).reshape(-1)
                    if b.dtype != torch.uint8 or b.numel() != sizes[off]:
                        raise ValueError(f"encode gave {b.numel()} {b.dtype} for a {tuple(lin.weight.shape)} "
                                         f"matrix; {fmt} needs {sizes[off]} uint8")
                    flat[e * stride + off:e * stride + off + b.numel()].copy_(b)
            bases.append(flat)
    offs = torch.arange(E, dtype=torch.int64)[:, None] * stride + torch.tensor([og, ou, od])
    return ExpertTable(bases, offs.expand(L, E, 3).contiguous().to(dev), fmt)


def blocks_for(fmt: str, blocks: dict | None) -> dict:
    """The tiles of ``fmt``'s products: DEFAULT_QUANT_BLOCKS updated by ``blocks`` ({"gate_up": (rows, warps),
    "down": (rows, warps)})."""
    interp = {k: INTERPRETER_BLOCKS[k] for k in ("gate_up", "down")} if interpreted() else {}
    return {**DEFAULT_QUANT_BLOCKS[fmt], **interp, **(blocks or {})}


def _check_launch(fmt: str, base: torch.Tensor, H: int, F: int) -> None:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantized expert kernels compute {QUANT_FORMATS}, not {fmt!r}")
    if base.dtype != torch.uint8:
        raise ValueError(f"{fmt} experts are read from a flat uint8 tensor of records, not {base.dtype}")
    check_shape(fmt, H, F)


def launch_gate_up(fmt: str, x, ln, base, sel_off, a, eps: float, H: int, F: int, K: int, M: int = 1,
                   blocks: dict | None = None, pdl: bool = False, launch: dict | None = None,
                   dst_off=None) -> None:
    """RMSNorm, gate and up of the K chosen experts of each of M rows, ReGLU, into ``a`` [M, K, F] (bf16): x [M, H]
    bf16, ln [H], base uint8, sel_off [M, K, 3] int64 byte offsets; ``dst_off``: write-through (see triton_quant)."""
    _check_launch(fmt, base, H, F)
    tq = _triton()
    rows, warps = blocks_for(fmt, blocks)["gate_up"]
    wt = {"dst_off_ptr": dst_off, "WRITE": True} if dst_off is not None else {}
    grid = (M * K, -(-F // rows))
    common = dict(H=H, F=F, K=K, BLOCK_R=rows, BLOCK_H=_p2(H), PDL=pdl, num_warps=warps, **wt, **(launch or {}))
    if fmt == "int8":
        tq._gate_up_int8_kernel[grid](x, ln, base, sel_off, a, float(eps), **common)
    elif fmt == "q4_0":
        tq._gate_up_q4_0_kernel[grid](x, ln, base, sel_off, a, float(eps), BLOCK_B=_p2(H // QK4_0), **common)
    else:
        raise AssertionError(fmt)  # _check_launch


def launch_down(fmt: str, a, base, sel_off, sel_w, x, out, H: int, F: int, K: int, M: int = 1,
                blocks: dict | None = None, pdl: bool = False, launch: dict | None = None, dst_off=None) -> None:
    """down of each row's K experts, the combine weighted by ``sel_w`` [M, K] in ascending expert id, plus the
    residual ``x`` [M, H], into ``out`` [M, H] (bf16)."""
    _check_launch(fmt, base, H, F)
    tq = _triton()
    rows, warps = blocks_for(fmt, blocks)["down"]
    wt = {"dst_off_ptr": dst_off, "WRITE": True} if dst_off is not None else {}
    grid = (M, -(-H // rows))
    common = dict(H=H, F=F, K=K, BLOCK_K=_p2(K), BLOCK_R=rows, PDL=pdl, num_warps=warps, **wt, **(launch or {}))
    if fmt == "int8":
        tq._down_int8_kernel[grid](a, base, sel_off, sel_w, x, out, BLOCK_F=_p2(F), **common)
    elif fmt == "q4_0":
        tq._down_q4_0_kernel[grid](a, base, sel_off, sel_w, x, out, BLOCK_B=_p2(F // QK4_0), **common)
    else:
        raise AssertionError(fmt)  # _check_launch
