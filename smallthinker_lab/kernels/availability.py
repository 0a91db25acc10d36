"""Where the decode kernels can run: CUDA devices, or a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch


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
