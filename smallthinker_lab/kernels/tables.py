"""How the kernels address experts: one flat tensor plus an [L, E, 3] table of element offsets (``ExpertTable``), the
device-resolved LRU cache (``ExpertLRU``), the model's experts packed per layer (``pack_experts``), and the kernels'
static workspace (``workspace_bytes``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


EXPERT_FORMATS = ("bf16", "int8", "q4_0")  # how the kernels read experts (quant_experts.py: the quantized ones)
QK4_0, Q4_0_BLOCK = 32, 18  # ggml Q4_0: weights and bytes per block


def check_format(fmt: str) -> str:
    if fmt not in EXPERT_FORMATS:
        raise ValueError(f"expert format must be one of {EXPERT_FORMATS}, got {fmt!r}")
    return fmt


def matrix_nbytes(fmt: str, rows: int, cols: int) -> int:
    """Bytes of one [rows, cols] weight matrix in ``fmt`` (quantized along cols)."""
    check_format(fmt)
    if fmt == "bf16":
        return rows * cols * 2
    if fmt == "int8":
        return rows * 4 + rows * cols
    if cols % QK4_0:
        raise ValueError(f"Q4_0 needs the dot-product dimension divisible by {QK4_0}, got a [{rows}, {cols}] matrix")
    return rows * (cols // QK4_0) * Q4_0_BLOCK


def check_shape(fmt: str, hidden: int, ffn: int) -> None:
    """That the kernels of ``fmt`` compute experts of this shape (Q4_0: H and F multiples of 32)."""
    matrix_nbytes(fmt, ffn, hidden)
    matrix_nbytes(fmt, hidden, ffn)


@dataclass
class ExpertTable:
    """Where each expert's matrices are: ``bases[l]`` a flat tensor of the weights' dtype, ``offsets[l, e]`` the
    element offsets in it of gate [F, H], up [F, H] and down [H, F] (row-major, multiples of 16 elements).

    ``format`` "int8" or "q4_0" (quant_experts.py): the bases are flat uint8 tensors of quantized records and the
    offsets are byte offsets (multiples of 16 bytes)."""

    bases: list[torch.Tensor]
    offsets: torch.Tensor  # [L, E, 3] int64, on the device
    format: str = "bf16"

    def check(self, num_layers: int, num_experts: int, ffn: int, hidden: int) -> None:
        fmt = check_format(self.format)
        if len(self.bases) != num_layers or tuple(self.offsets.shape) != (num_layers, num_experts, 3):
            raise ValueError(f"expert table: {len(self.bases)} bases and offsets {tuple(self.offsets.shape)}, "
                             f"expected {num_layers} and ({num_layers}, {num_experts}, 3)")
        unit = "elements" if fmt == "bf16" else "bytes"
        if bool((self.offsets % 16 != 0).any()):
            raise ValueError(f"expert table: every matrix offset must be a multiple of 16 {unit}")
        if fmt != "bf16":
            check_shape(fmt, hidden, ffn)
            bad = [i for i, b in enumerate(self.bases) if b.dtype != torch.uint8]
            if bad:
                raise ValueError(f"expert table: {fmt} experts need uint8 bases; layer {bad[0]}'s is "
                                 f"{self.bases[bad[0]].dtype}")
        size = ffn * hidden if fmt == "bf16" else max(matrix_nbytes(fmt, ffn, hidden), matrix_nbytes(fmt, hidden, ffn))
        for i, base in enumerate(self.bases):
            end = int(self.offsets[i].max()) + size
            if base.numel() < end:
                raise ValueError(f"expert table: layer {i}'s base holds {base.numel()} {unit}, fewer than its "
                                 f"offsets address ({end})")


@dataclass
class ExpertLRU:
    """An LRU cache of expert records resolved on the device, inside the decode step: the routing program of each
    layer looks its K chosen experts up in ``owner`` and stamps them; a missed one takes the least recently used
    slot and is read by the expert kernels straight from its record in host memory (page-locked, addressed from the
    device: zero-copy over the bus), which they also write into that slot. No host round trip per layer: the whole
    step stays one CUDA graph. The step's slots (a miss as -1 - slot) are in ``DecodeKernels.slots`` for the
    host's accounting, which replays the requests through the engine's ExpertCache and checks they agree.

    The state mirrors an ExpertCache with the LRU policy (``load``): the same victims in the same order, so the
    same slots, hits and misses."""

    owner: torch.Tensor  # [S] int64: the key (layer * E + expert) each slot holds, or -1
    stamp: torch.Tensor  # [S] int64: last use; free slots negative, the most negative taken first
    clock: torch.Tensor  # [1] int64: the last stamp given
    src: torch.Tensor  # [L * E] int64: element offset of each expert's record in host memory, from the slots' base
    stride: int  # elements per record (slot)
    mats: tuple[int, int, int]  # element offsets of gate, up and down in a record

    def __post_init__(self) -> None:
        if any(int(v) % 16 for v in (self.stride, *self.mats)) or bool((self.src % 16 != 0).any()):
            raise ValueError("expert LRU: record strides and offsets must be multiples of 16 elements")

    @property
    def slots(self) -> int:
        return self.owner.numel()

    def load(self, owner: Sequence[int], stamp: Sequence[int], clock: int) -> None:
        """Set the state (from the host's cache): per slot its key or -1 and its stamp; the clock."""
        self.owner.copy_(torch.tensor(owner, dtype=torch.long))
        self.stamp.copy_(torch.tensor(stamp, dtype=torch.long))
        self.clock.fill_(int(clock))


def pack_experts(model) -> ExpertTable:
    """Pack each layer's experts (gate, up, down per expert) into one flat buffer and make the model's expert
    parameters views of it (the eager model runs unchanged on them). Idempotent; memory peaks at one layer's
    experts more than the model."""
    packed = getattr(model, "_packed_experts", None)
    if packed is not None:
        return packed
    cfg = model.config
    L, E, Fh, H = cfg.num_hidden_layers, cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    n = Fh * H
    bases = []
    for layer in model.model.layers:
        experts = layer.block_sparse_moe.experts
        ref = experts[0].gate.weight
        flat = torch.empty(E * 3 * n, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for e, ex in enumerate(experts):
                for m, lin in enumerate((ex.gate, ex.up, ex.down)):
                    view = flat[(3 * e + m) * n:(3 * e + m + 1) * n].view(lin.weight.shape)
                    view.copy_(lin.weight)
                    lin.weight.data = view
        bases.append(flat)
    offs = torch.arange(E * 3, dtype=torch.int64).view(E, 3) * n
    table = ExpertTable(bases, offs.expand(L, E, 3).contiguous().to(bases[0].device))
    model._packed_experts = table
    return table


def workspace_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the static buffers of one decode step (the logits row included)."""
    isz = torch.empty((), dtype=dtype).element_size()
    H, K, Fh = config.hidden_size, config.top_k, config.moe_ffn_hidden_size
    nq, nk = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    act = (3 * H + (nq + 2 * nk + 2 * config.num_experts) + nq + K * Fh + K + config.vocab_size) * isz
    L, E = config.num_hidden_layers, config.num_experts
    lru = (3 * L * E + L * K + 3 * K + 1) * 8  # a device LRU (ExpertLRU) of at most L x E slots and its outputs
    return act + (K * 4 + L * K + 2) * 8 + lru  # offsets, predicted ids, ids, token, position
