"""Fused decode kernels: one token of SmallThinker in five Triton kernels per layer, for the model and the engine.

The eager decode step of the PyTorch model launches dozens of small kernels per layer; on a GPU their launches and
gaps, not the bytes of weights read, set the time of a token. ``DecodeKernels`` runs a decode step as five fused
kernels per layer (triton_decode.py says which), captured as one CUDA graph per step. It serves two callers:

* the in-memory model: ``KernelRunner(model)`` (prefill eager, decode through the kernels; ``.generate``);
* the engine: its ``backend="kernels"``, what ``backend="auto"`` picks on a GPU.

Both address experts as one flat tensor plus an [L, E, 3] table of element offsets (``ExpertTable``): the engine's
slot arena, or the model's experts packed per layer (``pack_experts``, which makes the model's expert parameters
views of the packed buffer). They run the same kernels on the same layouts and values, so the engine's greedy
tokens equal the kernel model's, bit for bit.

Numerics against the eager model: the kernels keep the model's bf16 roundings (each product's output, RMSNorm's
cast, rotary, ReGLU, the combine in ascending expert id) but accumulate in another order than cuBLAS and flash
attention, so logits differ in the last bits. On a trained model the greedy tokens agree; on a model with random
weights, near-tied router logits can pick another expert and the tokens then drift (benchmarks/gpu_decode_graph.py
measures both).

Requirements: bf16 weights on a CUDA device (on a CPU only under ``TRITON_INTERPRET=1``, set before this package is
first imported: the tests run the kernels so); q/k/v/o, router and expert matrices contiguous; down in the model's
[H, F] layout.

Quantized experts: an ``ExpertTable`` of format "int8" (per-row scales) or "q4_0" (ggml blocks) holds uint8 records
read by the int8 / Q4_0 expert products of triton_quant.py, dequantised in registers (about 2x / 3.6x fewer bytes
per token than bf16); the rest of the step is unchanged. ``smallthinker_lab.engine.quant.kernel_experts(model,
fmt)`` quantizes a model's experts so (``KernelRunner(model, experts=...)``).

Files: availability.py (where they run), tables.py (how experts are addressed), decode_kernels.py (the step),
runner.py (the in-memory model through them), triton_decode.py (the kernels), quant_experts.py and
triton_quant.py (quantized experts: layouts and launches, kernels).
"""

from .availability import interpreted, unavailable_reason
from .decode_kernels import DEFAULT_BLOCKS, DecodeKernels
from .quant_experts import DEFAULT_QUANT_BLOCKS, QUANT_FORMATS, pack_quantized
from .runner import KernelRunner
from .tables import EXPERT_FORMATS, ExpertLRU, ExpertTable, _p2, pack_experts, workspace_bytes

__all__ = ["DEFAULT_BLOCKS", "DEFAULT_QUANT_BLOCKS", "EXPERT_FORMATS", "QUANT_FORMATS", "DecodeKernels", "ExpertLRU",
           "ExpertTable", "KernelRunner", "interpreted", "pack_experts", "pack_quantized", "unavailable_reason",
           "workspace_bytes"]
_ = _p2  # benchmarks/zero_copy.py sizes its tiles with it
