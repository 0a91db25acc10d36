"""The attention projections (q/k/v/o) in ggml Q4_0, computed through the native Q4_0 x Q8_0 kernel (:mod:`.native`).

On the CPU a decode token is memory-bound; with the experts and the LM head in Q4_0 (``quantization="q4_0"``,
``exact=False``) the bf16 attention projections are the largest bytes left per layer (4B shape: 11 MB a layer in
bf16, 3.1 MB in Q4_0), and llama.cpp's Q4_0 file quantizes them too. With the engine option ``attention_format``
(:func:`resolve_format`) set to ``"q4_0"`` (the ``"auto"`` choice when the LM head runs in the native ``q4_0``)
each layer's projections are replaced (:func:`quantize_model`) by

* :class:`Q4_0QKV` on ``attn.qkv``: q, k and v as ONE Q4_0 matrix (their rows concatenated), one activation
  quantization to Q8_0 and one kernel call per forward, split again into the model's q / k / v
  (``Attention.project``; the edit hooks ``hook_q/k/v`` then act on them as on the model's);
  ``attn.q_proj`` / ``k_proj`` / ``v_proj`` are :class:`Q4_0Linear` views of its rows (no copy), so a caller of the
  projection alone gets the same numbers;
* :class:`Q4_0Linear` on ``attn.o_proj``;

the bf16 weights are dropped; a bias (the dense Qwen2 model's q/k/v have them) is kept in the model's dtype and
added to the fp32 product. The result is the product of the dequantised weights with the Q8_0-rounded activations
(what :mod:`.native` computes), cast to the activations' dtype.

Quantizing the 4B shape's 8 layers (44 M weights) takes ~1.4 s on one core, so the bytes are cached beside the
bundle (:func:`load_or_quantize`, ``attention-q4_0.bin``: the LM head cache's file format, a header naming what it
holds, the shapes, an XXH3 (or crc32) of each source weight and of the payload; a stale or damaged file is rebuilt).

Shape letters: N tokens, H hidden, h query heads, k kv heads, D head_dim, R rows (output features).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from . import quant
from .quant import QK4_0

ATTENTION_FORMATS = (None, "auto", "q4_0")
CACHE_VERSION = 1
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_format_name(value) -> None:
    """ValueError naming the valid values for anything ``attention_format`` does not accept."""
    if value not in ATTENTION_FORMATS:
        raise ValueError(f"attention_format must be one of {', '.join(repr(v) for v in ATTENTION_FORMATS)} (None: "
                         f"the model's own projections; 'auto': 'q4_0' when the LM head runs in the native 'q4_0'; "
                         f"'q4_0': the native Q4_0 kernel), got {value!r}")


def _shape_reason(config) -> str | None:
    """Why the config's projections cannot be Q4_0 matrices (input features not a multiple of 32), or None."""
    H, q = config.hidden_size, config.num_attention_heads * config.head_dim
    for name, cols in (("q/k/v_proj (hidden_size)", H), ("o_proj (num_attention_heads * head_dim)", q)):
        if cols % QK4_0:
            return f"the input features of {name} are {cols}, not a multiple of {QK4_0}"
    return None


def _native_reason() -> str | None:
    from . import native

    return native.unavailable_reason()


def resolve_format(value, lm_head_format: str | None, device: torch.device, exact: bool, config) -> str | None:
    """The attention format an engine runs: None (the model's bf16 Linear modules) or "q4_0".

    "auto": "q4_0" exactly when the LM head's resolved format is the native "q4_0" (quantization="q4_0" on the CPU,
    exact=False, the kernel built) and the projections' input features are multiples of 32, else None. "q4_0":
    raises a ValueError naming why where it cannot run (a CUDA device, exact=True, no kernel, such features)."""
    check_format_name(value)
    if value is None:
        return None
    if value == "auto":
        ok = (lm_head_format == "q4_0" and device.type == "cpu" and not exact and _native_reason() is None
              and _shape_reason(config) is None)
        return "q4_0" if ok else None
    if device.type != "cpu":
        raise ValueError(f"attention_format='q4_0' runs the native Q4_0 kernel on the CPU: it needs device='cpu', "
                         f"not {device}")
    if exact:
        raise ValueError("attention_format='q4_0' quantizes the attention projections: exact=True (the model's own "
                         "kernels and weights) excludes it (use attention_format=None)")
    if _native_reason() is not None:
        raise ValueError(f"attention_format='q4_0' runs the native Q4_0 kernel: {_native_reason()}")
    why = _shape_reason(config)
    if why is not None:
        raise ValueError(f"attention_format='q4_0' needs Q4_0 blocks of {QK4_0} input features: {why}")
    return value


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of one layer's q/k/v/o projections."""
    H, D = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}


def attention_nbytes(config, fmt: str | None, itemsize: int = 2) -> int:
    """Bytes of every layer's q/k/v/o weight matrices (biases not included): in Q4_0 for fmt "q4_0", else
    ``itemsize`` bytes a weight (the memory plan's count, from the config alone)."""
    shapes = projection_shapes(config).values()
    if fmt == "q4_0":
        per = sum(quant.q4_0_nbytes(s) for s in shapes)
    elif fmt is None:
        per = sum(r * c for r, c in shapes) * itemsize
    else:
        raise ValueError(f"attention formats: None or 'q4_0', not {fmt!r}")
    return config.num_hidden_layers * per


# ------------------------------------------------------------------ the modules
def _check_bytes(qweight: torch.Tensor, rows: int, cols: int) -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 1:
        raise ValueError("a Q4_0 weight is a flat uint8 tensor of its ggml blocks (quant.quantize_q4_0)")
    if qweight.numel() != quant.q4_0_nbytes((rows, cols)):
        raise ValueError(f"a Q4_0 matrix of shape ({rows}, {cols}) is {quant.q4_0_nbytes((rows, cols))} bytes, "
                         f"got {qweight.numel()}")


def _check_layout(layout: str, rows: int) -> None:
    if layout not in ("rows", "x8"):
        raise ValueError(f"a Q4_0 projection's layout is 'rows' or 'x8', not {layout!r}")
    if layout == "x8" and rows % 8:
        raise ValueError(f"the x8 layout interleaves rows by 8: {rows} rows are not a multiple of 8")


def _row_bytes(qweight: torch.Tensor, rows: int, cols: int, layout: str) -> torch.Tensor:
    """ggml's row layout of ``qweight`` (itself, or converted from x8)."""
    if layout == "rows":
        return qweight
    from . import native

    return native.from_x8(qweight, rows, cols)


def _product(qweight: torch.Tensor, rows: int, cols: int, bias: torch.Tensor | None, x: torch.Tensor,
             layout: str = "rows") -> torch.Tensor:
    """fp32 (..., rows) = x (..., cols) times the Q4_0 matrix (Q8_0 activations), plus the bias."""
    from . import native

    if x.shape[-1] != cols:
        raise ValueError(f"this Q4_0 projection takes {cols} input features, got a tensor of shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"the native Q4_0 kernel runs on the CPU, not on {x.device}")
    y = native.matmul(qweight, rows, cols, x.reshape(-1, cols), layout=layout)  # (N, R) fp32
    if bias is not None:
        y += bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], rows)


class Q4_0Linear(nn.Module):
    """y = x W^T (+ b) with W (out, in) held as ggml Q4_0 blocks along its rows (``qweight``, flat uint8), through
    the native kernel: x (..., in) -> (..., out) in x's dtype. ``bias``: (out,) or None."""

    def __init__(self, qweight: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, layout: str = "rows") -> None:
        """``layout``: how ``qweight`` holds the blocks: "rows" (ggml's) or "x8" (``native.to_x8_``)."""
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        _check_bytes(qweight, self.out_features, self.in_features)
        _check_layout(layout, self.out_features)
        self.layout = layout
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"the bias of a ({out_features}, {in_features}) projection is ({out_features},), got "
                             f"{tuple(bias.shape)}")
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Q4_0Linear:
        """The Q4_0 copy of an nn.Linear (its weight quantized along the input features)."""
        w = linear.weight.detach().cpu()
        return cls(quant.quantize_q4_0(w), w.shape[0], w.shape[1], linear.bias)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weights the kernel computes with."""
        return quant.dequantize_q4_0(_row_bytes(self.qweight, self.out_features, self.in_features, self.layout),
                                     (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self.qweight, self.out_features, self.in_features, self.bias, x, self.layout).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"q4_0 ({self.layout})")


class Q4_0QKV(nn.Module):
    """q, k and v projections as one Q4_0 matrix (rows of q, then k, then v; flat uint8 ``qweight``) and one kernel
    call: x (..., H) -> (q (..., h*D), k (..., k*D), v (..., k*D)) in x's dtype. ``parts()`` gives the three
    :class:`Q4_0Linear` views of its rows (the same bytes, no copy)."""

    def __init__(self, qweight: torch.Tensor, sizes: tuple[int, int, int], in_features: int,
                 bias: torch.Tensor | None = None, layout: str = "rows") -> None:
        """``layout``: "rows" or "x8" (``native.to_x8_``; each of q, k, v a multiple of 8 rows, so that its rows
        stay a range of the bytes)."""
        super().__init__()
        self.sizes, self.in_features = tuple(int(s) for s in sizes), int(in_features)
        if len(self.sizes) != 3:
            raise ValueError(f"Q4_0QKV holds three projections (q, k, v), got sizes {sizes}")
        self.rows = sum(self.sizes)
        _check_bytes(qweight, self.rows, self.in_features)
        if layout == "x8" and any(n % 8 for n in self.sizes):
            raise ValueError(f"the x8 layout keeps q, k and v apart only in whole groups of 8 rows: sizes {sizes}")
        _check_layout(layout, self.rows)
        self.layout = layout
        if bias is not None and tuple(bias.shape) != (self.rows,):
            raise ValueError(f"the fused q/k/v bias is ({self.rows},), got {tuple(bias.shape)}")
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linears(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> Q4_0QKV:
        ws = [m.weight.detach().cpu() for m in (q, k, v)]
        biases = [m.bias for m in (q, k, v)]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("q/k/v projections with a bias on some but not all of them cannot be fused")
        bias = None if biases[0] is None else torch.cat([b.detach().cpu() for b in biases])
        buf = torch.cat([quant.quantize_q4_0(w) for w in ws])  # row-major blocks: the rows concatenate
        return cls(buf, tuple(w.shape[0] for w in ws), ws[0].shape[1], bias)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.numel())

    def parts(self) -> list[Q4_0Linear]:
        """q_proj, k_proj, v_proj: Q4_0Linear views of this matrix's rows and bias."""
        row_bytes = quant.q4_0_nbytes((1, self.in_features))
        out, r0 = [], 0
        for n in self.sizes:
            b = None if self.bias is None else self.bias[r0:r0 + n]
            out.append(Q4_0Linear(self.qweight[r0 * row_bytes:(r0 + n) * row_bytes], n, self.in_features, b,
                                  self.layout))
            r0 += n
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = _product(self.qweight, self.rows, self.in_features, self.bias, x, self.layout).to(x.dtype)  # (..., R)
        return tuple(y.split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}, bias={self.bias is not None}, q4_0 ({self.layout})"


# ------------------------------------------------------------------ the engine's model
def _cache_path(folder: str | os.PathLike, fmt: str) -> Path:
    return Path(folder) / f"attention-{fmt}.bin"


def _expected_header(weights: list[torch.Tensor], fmt: str, shapes: list[tuple[int, int]]) -> dict:
    from .lm_head_quant import _checksum_fn, _weight_bytes

    algo, fn = _checksum_fn()
    return {"version": CACHE_VERSION, "tensor": "attention q/k/v/o per layer", "format": fmt,
            "shapes": [list(s) for s in shapes], "source_dtype": str(weights[0].dtype).removeprefix("torch."),
            "checksum": algo, "source_checksums": [int(fn(_weight_bytes(w))) for w in weights],
            "nbytes": sum(quant.q4_0_nbytes(s) for s in shapes)}


def load_or_quantize(model, fmt: str = "q4_0", folder: str | os.PathLike | None = None) -> dict:
    """Every layer's q/k/v/o of ``model`` (a SmallThinker model with nn.Linear projections, on the CPU) replaced in
    place by the Q4_0 modules (``attn.qkv`` a :class:`Q4_0QKV`, ``q_proj``/``k_proj``/``v_proj`` its views,
    ``o_proj`` a :class:`Q4_0Linear`); the bf16 weights are dropped. The bytes are read from ``folder``'s
    ``attention-q4_0.bin`` when it matches these weights (a checksum of each), shapes and its own checksum, else
    quantized here and written there (where writable; ``folder`` None: not cached). Returns
    ``{"format", "nbytes", "source", "open_seconds"}`` (source: "cache", "quantized" or "quantized, cached")."""
    from .lm_head_quant import _read_cache, _write_cache

    if fmt != "q4_0":
        raise ValueError(f"attention formats: 'q4_0', not {fmt!r}")
    t0 = time.perf_counter()
    attns = [layer.self_attn for layer in model.model.layers]
    weights, shapes = [], []
    for a in attns:
        for p in _PROJ:
            lin = getattr(a, p)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {a.layer_idx}'s {p} is a {type(lin).__name__}, not an nn.Linear: the "
                                 f"attention is quantized already")
            weights.append(lin.weight.detach().cpu())
            shapes.append(tuple(lin.weight.shape))
    want = _expected_header(weights, fmt, shapes)
    path = _cache_path(folder, fmt) if folder is not None else None
    buf = _read_cache(path, want) if path is not None else None
    source = "cache"
    if buf is None:
        buf = torch.cat([quant.quantize_q4_0(w) for w in weights])
        source = "quantized"
        if path is not None and _write_cache(path, buf, want):
            source = "quantized, cached"
    from . import native

    off = 0
    for i, a in enumerate(attns):
        (q, H), (kv, _), _, (_, qc) = shapes[4 * i:4 * i + 4]
        # in memory in the kernel's x8 layout where the rows allow it (the cache file keeps ggml's rows)
        x8 = native.x8_ok(q) and native.x8_ok(kv)
        n_qkv = quant.q4_0_nbytes((q + 2 * kv, H))
        biases = [getattr(a, p).bias for p in _PROJ[:3]]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        part = buf[off:off + n_qkv]
        if x8:
            native.to_x8_(part, q + 2 * kv, H)
        qkv = Q4_0QKV(part, (q, kv, kv), H, bias, layout="x8" if x8 else "rows")
        off += n_qkv
        n_o = quant.q4_0_nbytes((H, qc))
        part = buf[off:off + n_o]
        if native.x8_ok(H):
            native.to_x8_(part, H, qc)
        o = Q4_0Linear(part, H, qc, a.o_proj.bias, layout="x8" if native.x8_ok(H) else "rows")
        off += n_o
        a.qkv = qkv
        a.q_proj, a.k_proj, a.v_proj = qkv.parts()
        a.o_proj = o
    if off != buf.numel():  # pragma: no cover  (the header's nbytes is the shapes' sum)
        raise RuntimeError(f"attention Q4_0 bytes: laid out {off}, have {buf.numel()}")
    return {"format": fmt, "nbytes": int(buf.numel()), "source": source, "open_seconds": time.perf_counter() - t0}


def dequantize_model(model) -> None:
    """``model``'s q/k/v/o weights set, in place, to their Q4_0 encoding decoded again (in the weight's dtype): the
    in-memory reference of an engine with ``attention_format="q4_0"`` (the same bytes: quantize_q4_0 of the same
    weights)."""
    for layer in model.model.layers:
        for p in _PROJ:
            lin = getattr(layer.self_attn, p)
            w = lin.weight.detach()
            d = quant.dequantize_q4_0(quant.quantize_q4_0(w.cpu()), tuple(w.shape), w.dtype).to(w.device)
            lin.weight = nn.Parameter(d, requires_grad=False)
