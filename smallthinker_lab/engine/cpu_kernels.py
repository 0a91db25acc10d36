"""ReGLU experts on the CPU through torch's weight-only low-bit kernels, from a slot's bytes in a kernel format.

One expert is y = down(relu(gate x) * up x), with gate and up (F, H) and down (H, F) stored in ``q4_0_cpu``
(``torch._weight_int4pack_mm_for_cpu``, group size 32) or ``int8_cpu`` (``torch._weight_int8pack_mm``): see
:mod:`.quant` for the layouts and how Q4_0 maps to the int4 kernel. The kernels' operands are views of the slot's
bytes, so nothing is repacked or decoded per token.

The kernels run on bf16 activations: with fp32 or fp16 inputs torch 2.13 takes a scalar path, 40-60x slower (one
token, gate 768 x 1536, 1 thread, AVX512 Xeon: int4 0.056 ms in bf16, 2.2 ms in fp32, 3.0 ms in fp16). So x is cast
to bf16, each product's output is bf16 (accumulated in fp32 by the kernel), and y is cast back to x's dtype.

Shape letters: N tokens, H hidden, F expert ffn size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import KERNEL_FORMATS, QK4_0, int8_cpu_parts, q4_0_cpu_parts

MATRICES = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertOperands:
    """One expert's kernel operands, views of its record's bytes: (weight, scales) per matrix.

    q4_0_cpu: weight (R, C/2) uint8 packed, scales (C/32, R, 2) bf16; int8_cpu: weight (R, C) int8, scales (R,) bf16.
    Views of a cache slot stay valid whatever the slot holds, so an engine can build them once per slot."""

    fmt: str
    gate: tuple[torch.Tensor, torch.Tensor]  # (F, H)
    up: tuple[torch.Tensor, torch.Tensor]  # (F, H)
    down: tuple[torch.Tensor, torch.Tensor]  # (H, F), the model's layout: the kernel's (out, in)


def check_format(fmt: str) -> None:
    if fmt not in KERNEL_FORMATS:
        raise ValueError(f"format {fmt!r} has no CPU kernel; kernel formats: {KERNEL_FORMATS}")


def expert_operands(mats: Mapping[str, object], fmt: str, shape: Sequence[int]) -> ExpertOperands:
    """Operands of one record: ``mats`` maps gate/up/down to their bytes (uint8 tensor, numpy array, bytes or
    mmap; the engine's ``_slot_bytes(slot)``), ``shape`` is the gate's (F, H) (``bundle.matrices["gate"].shape``)."""
    check_format(fmt)
    missing = [m for m in MATRICES if m not in mats]
    if missing:
        raise ValueError(f"expert record lacks matrix {missing[0]!r} (has {sorted(mats)})")
    f, h = (int(s) for s in shape)
    parts = q4_0_cpu_parts if fmt == "q4_0_cpu" else int8_cpu_parts
    return ExpertOperands(fmt, parts(mats["gate"], (f, h)), parts(mats["up"], (f, h)), parts(mats["down"], (h, f)))


def linear(x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor], fmt: str) -> torch.Tensor:
    """x (N, C) bf16 times one stored matrix (R, C) -> (N, R) bf16, through the format's kernel."""
    w, scales = operand
    if fmt == "q4_0_cpu":
        return torch._weight_int4pack_mm_for_cpu(x, w, QK4_0, scales)
    return torch._weight_int8pack_mm(x, w, scales)


def reglu(x: torch.Tensor, ops: ExpertOperands) -> tuple[torch.Tensor, torch.Tensor]:
    """y = down(relu(gate x) * up x) -> (y like x, gate product (N, F) bf16, for hooks and neuron counters).

    x is (N, H) or (H,), any float dtype (computed in bf16, see the module docstring)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, H)
    h = ops.gate[0].shape[1] * (2 if ops.fmt == "q4_0_cpu" else 1)
    if flat.shape[1] != h:
        raise ValueError(f"expert input has {flat.shape[1]} features, the expert's gate takes {h}")
    if flat.shape[0] == 0:  # the kernels need at least one row
        f = ops.down[0].shape[1] * (2 if ops.fmt == "q4_0_cpu" else 1)
        return torch.zeros_like(x), flat.new_zeros(0, f, dtype=torch.bfloat16)
    xb = flat.to(torch.bfloat16).contiguous()
    g = linear(xb, ops.gate, ops.fmt)  # (N, F)
    a = F.relu(g).mul_(linear(xb, ops.up, ops.fmt))  # (N, F)
    y = linear(a, ops.down, ops.fmt)  # (N, H)
    return y.to(x.dtype).reshape(x.shape), g


def expert_forward(x: torch.Tensor, mats: Mapping[str, object], fmt: str, shape: Sequence[int]) -> torch.Tensor:
    """One expert's ReGLU from its record's bytes in a kernel format: ``reglu(x, expert_operands(...))[0]``."""
    return reglu(x, expert_operands(mats, fmt, shape))[0]
