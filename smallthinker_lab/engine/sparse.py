"""Sparse ReGLU for one expert: skip the up row and the down row of every neuron whose gate is <= 0.

The expert is y = W_down (W_up x * relu(W_gate x)). A neuron j with relu(gate_j) == 0 contributes nothing, so after
the (always dense) gate product only the active rows of W_up and of the transposed down matrix are read, as
PowerInfer's fused sparse MoE kernel does with ``--transpose-down``.

Shape letters: N tokens, H hidden, F expert ffn size, K active neurons (union over the N tokens).
Weights, as the engine stores them: ``wg``, ``wu`` (F, H) = nn.Linear weights of gate and up; ``wd_t`` (F, H) =
the down weight transposed (row j = column j of W_down), so an active neuron's down row is one contiguous gather.

Every function returns ``(y, n_active)``: y has x's shape (x is (N, H) or (H,)), ``n_active`` is an int, the number
of neurons active for at least one of the N tokens, i.e. the rows of up and down the sparse kernel reads (for a
single token: its active neurons). Sparsity of a call = 1 - n_active / F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .shapes import neuron_bucket, pad_index

# Sparsity (share of inactive neurons in the union over the tokens) above which the sparse kernel beats the dense
# one, measured by benchmarks/sparse_crossover.py on the 4B expert shape (H=1536, F=768) with the weights cold (read
# from DRAM, as in a decode that streams the experts), interpolated crossover rounded to 0.05:
# benchmarks/results/sparse_crossover.json, the 2-core AMD EPYC development machine, 1 torch thread (with 2 threads
# the other users' processes on the machine made the timings scheduler noise). The GPU machine's host CPU (Xeon,
# AVX512, 2 threads, sparse_crossover_h100host.json) gave 0.70 / 0.38 / 0.48 / 0.38: the same but for bf16 with
# several tokens, which is compute-bound on the AMD (no native bf16) and so pays off earlier there.
# Keys: (dtype, a single token?).
MIN_SPARSITY: dict[tuple[torch.dtype, bool], float] = {
    (torch.float32, True): 0.65,
    (torch.float32, False): 0.4,
    (torch.bfloat16, True): 0.45,
    (torch.bfloat16, False): 0.15,
}
DEFAULT_MIN_SPARSITY = 0.65  # dtypes not measured (fp16, fp64): the highest measured value
# Experts this small (gate weights F * H below it) stay dense: for the tiny shape (H=256, F=64) the sparse kernel's
# extra small ops cost more than the rows it skips at every sparsity up to 0.98, fp32 and bf16 (same file).
SMALL_EXPERT_NUMEL = 1 << 18


def default_min_sparsity(dtype: torch.dtype, n_tokens: int, weight_numel: int | None = None) -> float:
    """The measured crossover for this dtype and token count (``MIN_SPARSITY``); 1.0 (never sparse) for an expert
    whose gate matrix has fewer than ``SMALL_EXPERT_NUMEL`` weights, when ``weight_numel`` is given."""
    if weight_numel is not None and weight_numel < SMALL_EXPERT_NUMEL:
        return 1.0
    return MIN_SPARSITY.get((dtype, n_tokens == 1), DEFAULT_MIN_SPARSITY)


def _down(a: torch.Tensor, wd_t: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j a[:, j] * wd_t[idx[j]]: (N, K) x (F, H) -> (N, H); idx None means all F rows.

    fp32 uses a BLAS product (on the gathered rows); other dtypes use embedding_bag, a weighted row sum that reads
    the rows in place: on the AMD development machine (AVX2, no native bf16) torch's bf16 product with an (F, H)
    right operand is 15-20x slower than with an (H, F) one, embedding_bag as fast as the latter (the baselines
    'dense_matmul' and 'dense_linear' in benchmarks/results/sparse_crossover*.json).
    """
    if wd_t.dtype == torch.float32:
        return a @ (wd_t if idx is None else wd_t.index_select(0, idx))
    n, k = a.shape
    if k == 0:  # embedding_bag rejects empty bags
        return a.new_zeros(n, wd_t.shape[1])
    rows = torch.arange(k, device=a.device) if idx is None else idx
    return F.embedding_bag(rows.expand(n, k), wd_t, per_sample_weights=a.contiguous(), mode="sum")  # (N, H)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (N, H)


def active_neurons(g: torch.Tensor) -> torch.Tensor:
    """Ids of the neurons with relu(gate) > 0 for at least one token: gate (N, F) -> (K,) long, ascending."""
    mask = g[0] > 0 if g.shape[0] == 1 else (g > 0).any(dim=0)  # (F,)
    return torch.nonzero(mask).flatten()


def reglu_from_rows(x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, wu_rows: torch.Tensor,
                    wd_t_rows: torch.Tensor) -> torch.Tensor:
    """The sparse expert from rows already gathered (e.g. decoded with ``QuantFormat.decode_rows``, so that only
    the active rows of a quantised matrix are dequantised): x (N, H), gate g (N, F), idx (K,) from
    ``active_neurons(g)``, wu_rows = wu[idx] (K, H), wd_t_rows = wd_t[idx] (K, H) -> y (N, H). ``wu_rows`` may
    hold more rows than idx (padded, see engine/shapes.py): only the first K are used."""
    a = F.linear(x, wu_rows)[:, :idx.shape[0]] * F.relu(g.index_select(1, idx))  # (N, K)
    return _down(a, wd_t_rows)  # (N, H)


def _dense_from_gate(x: torch.Tensor, g: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor) -> torch.Tensor:
    a = F.linear(x, wu) * F.relu(g)  # (N, F)
    return _down(a, wd_t)  # (N, H)


def _sparse_from_gate(x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, wu: torch.Tensor,
                      wd_t: torch.Tensor) -> torch.Tensor:
    # relu again on the union: a neuron active for one token is masked for the tokens where it is not
    k = idx.shape[0]
    # the up product's shape from a bounded set (engine/shapes.py), the padded neurons dropped after it
    up_idx = pad_index(idx, neuron_bucket(k, wu.shape[0])) if k else idx
    a = F.linear(x, wu.index_select(0, up_idx))[:, :k] * F.relu(g.index_select(1, idx))  # (N, K)
    return _down(a, wd_t, idx)  # (N, H)


def reglu_dense(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                wd_t: torch.Tensor, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The reference: all F neurons. Returns (y, n_active) (n_active counted, not exploited).

    ``gate``: x @ wg^T when the caller already computed it (it is not computed again)."""
    xf = _flat(x)
    g = F.linear(xf, wg) if gate is None else gate  # (N, F)
    y = _dense_from_gate(xf, g, wu, wd_t)
    return y.reshape(x.shape), int(active_neurons(g).numel())


def reglu_sparse(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                 wd_t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Up and down only for the neurons active for some token; equal to ``reglu_dense`` up to rounding."""
    xf = _flat(x)
    g = F.linear(xf, wg)  # (N, F)
    idx = active_neurons(g)
    y = _sparse_from_gate(xf, g, idx, wu, wd_t)
    return y.reshape(x.shape), int(idx.numel())


def reglu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor,
          min_sparsity: float | None = None, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Dense or sparse, chosen per call from the sparsity seen after the gate.

    The sparse kernel runs when 1 - n_active / F > ``min_sparsity`` (default: the measured crossover,
    ``default_min_sparsity(x.dtype, N, wg.numel())``). ``min_sparsity=1.0`` forces dense, ``-1.0`` forces sparse.
    ``gate``: x @ wg^T when the caller already computed it (it is not computed again).
    """
    xf = _flat(x)
    g = F.linear(xf, wg) if gate is None else gate  # (N, F)
    idx = active_neurons(g)
    n_active = int(idx.numel())
    if min_sparsity is None:
        min_sparsity = default_min_sparsity(x.dtype, xf.shape[0], wg.numel())
    if 1.0 - n_active / wg.shape[0] > min_sparsity:
        y = _sparse_from_gate(xf, g, idx, wu, wd_t)
    else:
        y = _dense_from_gate(xf, g, wu, wd_t)
    return y.reshape(x.shape), n_active
