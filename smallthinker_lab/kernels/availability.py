"""Where the decode kernels can run: CUDA devices, or a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

# under Triton's interpreter (TRITON_INTERPRET=1, the tests on a CPU) each program runs in Python, so the product
# kernels (decode_kernels.py, and gate_up / down of quant_experts.py) take up to 64 rows per program: 10x fewer
# programs on the test shapes. A row's dot product does not depend on how many rows share its program, so the
# logits are the same bits (tests/test_kernels.py compares both tilings).
INTERPRETER_BLOCKS = {"pre": (64, 4), "oproj": (64, 4), "gate_up": (64, 2), "down": (64, 2)}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device``, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the decode kernels need the triton package (pip install triton)"
    dev = torch.device(device)
    if dev.type == "cuda":
        return None
    if dev.type == "cpu" and interpreted():
        return None
    return f"the decode kernels run on CUDA devices (on a CPU only under TRITON_INTERPRET=1), not on {dev}"


def _pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreted() and torch.cuda.get_device_capability(device)[0] >= 9
