"""Bounded operand shapes for the engine's CPU products, so that oneDNN's per-shape kernels stay few.

torch computes bf16/fp16 matrix products on the CPU through oneDNN, which compiles a kernel for every distinct
operand shape and keeps it (a primitive cache and ideep's LRU cache of 1024 entries each): measured with torch
2.13 on an AMX Xeon, about 0.7 MB of resident memory per new (rows x 1536) @ (1536 x 768) shape, never returned. An
engine product whose shape depends on the data (tokens routed to an expert in prefill, active neurons of a sparse
ReGLU) would grow the process by that much per new shape, outside every memory limit (tests/test_engine_memory.py).
So the engine keeps those shapes in a small fixed set:

* rows (tokens per expert) are padded to :func:`row_bucket` (1, 2, 3, 4, 6, 8, 12, ... : at most 1.5x the rows)
  by repeating the last token's index: the padded rows are copies of a real one, so the union of active neurons
  and the real rows' results are unchanged; results are sliced back to the real rows;
* active-neuron counts of the sparse up product are padded to a multiple of :data:`NEURON_BUCKET` the same way
  (the repeated neuron's columns are dropped before the down product, which is a row sum, not a oneDNN product).

Each output column or row is still the same dot product, so results equal the unpadded products' (the default
model's engine tokens equal the in-memory model's, notebooks/01_tour.ipynb). torch's native one-row kernels would
compile nothing per shape (and were faster for one row here: 0.29 ms against oneDNN's 0.44 ms for 1 x 1536 @
1536 x 1536 bf16, 1 thread), but they round differently from the model's oneDNN products: the engine's greedy
tokens then drift from the model's.
"""

from __future__ import annotations

import torch

NEURON_BUCKET = 64


def row_bucket(n: int) -> int:
    """The smallest size >= n of the form 2^k or 3 * 2^(k-1): 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    if n <= 2:
        return n
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    return p * 3 // 4 if p * 3 // 4 >= n else p


def pad_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """``index`` (n,) extended to ``size`` entries by repeating its last entry (n >= 1)."""
    n = index.shape[0]
    if size <= n:
        return index
    return torch.cat([index, index[-1:].expand(size - n)])


def neuron_bucket(k: int, total: int) -> int:
    """Active-neuron count k padded to a multiple of NEURON_BUCKET, at most ``total``."""
    return min(total, -(-k // NEURON_BUCKET) * NEURON_BUCKET) if k else 0
