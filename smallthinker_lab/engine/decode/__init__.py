"""Decode backends of the engine: how a forward and its decode steps run (docs/engine.md). ``eager`` is the layer
loop over the model's modules with experts from the cache (eager.py, each expert from its slot in
expert_compute.py); the graph backends: ``graph`` and ``fused`` (graph.py), ``kernels`` (kernels.py,
kernels_offload.py). A decoder works on the engine's ``EngineState`` (engine/state.py), never on the Engine;
``make_decoder(state, backend)`` builds the one a backend name asks for.
"""

from __future__ import annotations

from ..state import EngineState
from .base import Decoder, GraphBase
from .eager import EagerDecoder
from .graph import GraphDecoder
from .kernels import KernelDecoder

__all__ = ["Decoder", "EagerDecoder", "GraphBase", "GraphDecoder", "KernelDecoder", "make_decoder"]


def make_decoder(state: EngineState, backend: str) -> Decoder:
    """The decoder of ``backend`` over an engine's ``state``."""
    if backend == "eager":
        return EagerDecoder(state)
    if backend == "kernels":
        return KernelDecoder(state)
    if backend in ("graph", "fused"):
        return GraphDecoder(state, fused=backend == "fused" or not state.exact)
    raise ValueError(f"unknown backend {backend!r}")
