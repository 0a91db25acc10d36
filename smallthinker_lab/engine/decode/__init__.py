"""Decode backends of the engine: how a decode step runs (docs/engine.md). ``eager`` is the engine's own layer loop
(engine/engine.py); the graph backends live here: ``graph`` and ``fused`` (graph.py), ``kernels`` (kernels.py,
kernels_offload.py). ``make_decoder`` builds the one a backend name asks for.
"""

from __future__ import annotations

from .base import Decoder, GraphBase
from .graph import GraphDecoder
from .kernels import KernelDecoder

__all__ = ["Decoder", "GraphBase", "GraphDecoder", "KernelDecoder", "make_decoder"]


def make_decoder(engine, backend: str) -> Decoder | None:
    """The decoder of ``backend`` for ``engine`` (None for eager: the engine's own loop)."""
    if backend == "eager":
        return None
    if backend == "kernels":
        return KernelDecoder(engine)
    if backend in ("graph", "fused"):
        return GraphDecoder(engine, fused=backend == "fused" or not engine.exact)
    raise ValueError(f"unknown backend {backend!r}")
