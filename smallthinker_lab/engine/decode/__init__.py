"""Decode backends of the engine: how a decode step runs (docs/engine.md). ``eager`` is the engine's own layer loop
(eager.py, mixed into the Engine); the graph backends live here: ``graph`` and ``fused`` (graph.py), ``kernels``
(kernels.py, kernels_offload.py). A decoder works on the engine's ``EngineState`` (engine/state.py), never on the
Engine; ``make_decoder(state, backend)`` builds the one a backend name asks for.
"""

from __future__ import annotations

from ..state import EngineState
from .base import Decoder, GraphBase
from .graph import GraphDecoder
from .kernels import KernelDecoder

__all__ = ["Decoder", "GraphBase", "GraphDecoder", "KernelDecoder", "make_decoder"]


def make_decoder(state: EngineState, backend: str) -> Decoder | None:
    """The decoder of ``backend`` over an engine's ``state`` (None for eager: the engine's own loop)."""
    if backend == "eager":
        return None
    if backend == "kernels":
        return KernelDecoder(state)
    if backend in ("graph", "fused"):
        return GraphDecoder(state, fused=backend == "fused" or not state.exact)
    raise ValueError(f"unknown backend {backend!r}")
