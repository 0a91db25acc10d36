"""The engine's rarely used knobs (:class:`EngineOptions`) and the choice of a decode backend.

Backends, fastest first where they apply (docs/engine.md has the table):

* ``"kernels"``: one CUDA graph per decode step of the Triton decode kernels (smallthinker_lab.kernels), reading the
  experts in place from their cache slots; offloaded with the LRU resolved on the GPU; bf16 only;
* ``"fused"``: one CUDA graph per step of torch.compile'd kernels (equal to the model up to rounding), every expert
  resident;
* ``"graph"``: CUDA graphs of the model's own kernels per layer (bit-identical tokens), every expert resident;
* ``"eager"``: the model's modules step by step, with experts from the cache: every device, policy, hook and option.

``backend="auto"`` picks the kernels on a CUDA device when they can run for the checkpoint and options, else eager.
A backend asked for by name that cannot run raises :class:`BackendUnavailable` naming why. A decode step that the
chosen graph backend cannot take (an instrument's hooks are registered, the cache misses with the graph variants)
runs eager; ``Engine.explain()`` says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

BACKENDS = ("kernels", "fused", "graph", "eager")  # fastest first
_LEGACY_CUDA_GRAPH = {False: "eager", True: "graph", "fused": "fused", "kernels": "kernels"}


class BackendUnavailable(ValueError):
    """A backend asked for by name cannot run here; the message says why."""


def _option(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class EngineOptions:
    """Rarely used engine knobs, validated together. Pass as ``options=EngineOptions(...)`` or as keywords of
    ``Engine.from_pretrained`` (each keyword is one of these fields)."""

    max_context: int | None = _option(None, "KV-cache positions reserved; default min(2048, max_position_embeddings)")
    prefill_chunk: int = _option(256, "tokens per prefill forward")
    dtype: torch.dtype | str | None = _option(None, "compute dtype; default the checkpoint's")
    bundle_dir: str | os.PathLike | None = _option(None, "the expert bundle's folder; default expert_bundle* in the "
                                                         "checkpoint folder")
    lookahead: bool | str = _option(False, "decode: read layer l+1's predicted experts during layer l (True: after "
                                           "its attention, 'early': before)")
    sparse_reglu: bool | str = _option("auto", "CPU: skip the up/down rows of inactive neurons ('auto': where the "
                                               "measured crossover says it pays)")
    exact: bool = _option(False, "experts through the model's own kernels and layouts: tokens bit-identical to it")
    lm_head_predictor: object = _option(None, "path or LMHeadPredictor: a sparse LM head at decode")
    fill_value: float = _option(float("-inf"), "logit of the vocabulary rows the sparse LM head skips")
    lm_head_format: str | None = _option("auto", "CPU: the LM head quantized to a CPU kernel format ('q4_0_cpu', "
                                                 "'int8_cpu'; 'auto': the bundle's when it is one; None: the "
                                                 "model's own head; 'screened': the model's head with an exact "
                                                 "argmax from an int8 screen, greedy decoding only), "
                                                 "engine/lm_head_quant.py")
    attention_format: str | None = _option("auto", "CPU: the attention projections (q/k/v/o) in 'q4_0' through the "
                                                   "native Q4_0 kernel ('auto': when the LM head runs in the native "
                                                   "'q4_0'; None: the model's own), engine/attention_quant.py")
    io_threads: int = _option(4, "threads that read experts from storage")
    bypass_page_cache: bool = _option(False, "O_DIRECT reads (or pages dropped after each): misses come from storage")
    verify_checksums: bool = _option(True, "check each expert record's checksum after its read")
    host_cache: bool = _option(False, "CUDA: a pinned host copy of the whole bundle (misses cross PCIe only)")
    compute_threads: int | None = _option(None, "torch intra-op threads while the engine computes")
    progress: bool = _option(True, "a progress bar while the bundle is converted")
    check_finite: bool = _option(False, "read every stored tensor first; CheckpointError names one holding NaN/Inf")
    belady_trace: Sequence | None = _option(None, "policy='belady': the future request trace it replays")
    warm_start: object = _option(None, "fill the cache first: a recorded trace or prompts (engine/warm.py)")
    fault: Callable | None = field(default=None, repr=False,
                                   metadata={"doc": "test hook: called in the I/O thread after each read"})

    def __post_init__(self) -> None:
        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        # max_context is checked by the engine against the checkpoint's max_position_embeddings
        positive_int("prefill_chunk", self.prefill_chunk)
        positive_int("io_threads", self.io_threads)
        positive_int("compute_threads", self.compute_threads, allow_none=True)
        if self.lookahead not in (False, True, "early"):
            raise ValueError(f"lookahead must be False, True or 'early', got {self.lookahead!r}")
        if self.sparse_reglu not in ("auto", True, False):
            raise ValueError(f"sparse_reglu must be 'auto', True or False, got {self.sparse_reglu!r}")
        if self.exact and self.sparse_reglu is True:
            raise ValueError("exact=True computes experts densely with the model's kernels: it excludes "
                             "sparse_reglu=True")
        from .lm_head_quant import check_format_name

        check_format_name(self.lm_head_format)
        from .attention_quant import check_format_name as check_attention_format

        check_attention_format(self.attention_format)
        if self.exact and self.attention_format == "q4_0":
            raise ValueError("attention_format='q4_0' quantizes the attention projections: exact=True (the model's "
                             "own kernels and weights) excludes it (use attention_format=None)")
        if not isinstance(self.fill_value, (int, float)) or math.isnan(self.fill_value):
            raise ValueError(f"fill_value must be a number, got {self.fill_value!r}")

    @classmethod
    def resolve(cls, options: EngineOptions | None, overrides: dict) -> tuple[EngineOptions, str | None]:
        """``options`` with keyword overrides applied; also returns the backend named by the legacy keyword
        ``cuda_graph`` (False/True/"fused"/"kernels"), if given. Unknown keywords raise a TypeError naming the
        valid ones."""
        overrides = dict(overrides)
        legacy = None
        if "cuda_graph" in overrides:
            value = overrides.pop("cuda_graph")
            if value not in _LEGACY_CUDA_GRAPH:
                raise ValueError(f"cuda_graph must be False, True, 'fused' or 'kernels', got {value!r}")
            legacy = _LEGACY_CUDA_GRAPH[value]
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; EngineOptions has: "
                            f"{', '.join(sorted(names))}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}")
        base = options or cls()
        return (replace(base, **overrides) if overrides else base), legacy


EngineOptions.__doc__ += "\n\n" + "\n".join(f"* ``{f.name}`` (default {f.default!r}): {f.metadata['doc']}"
                                          for f in fields(EngineOptions))


# why backend="auto" keeps eager for int8 / q4_0 experts (explain() says it)
AUTO_QUANTIZED_NOTE = ("not chosen: int8 / q4_0 experts decode with the kernels when asked for by name "
                       "(backend='kernels'); auto keeps eager until their kernels are measured on the GPU")


def static_reasons(device: torch.device, dtype: torch.dtype, quantization: str | None,
                   options: EngineOptions) -> dict[str, str | None]:
    """For each backend, why it cannot run at all for this device, dtype and options (None: it can)."""
    reasons: dict[str, str | None] = {"eager": None}
    cuda = device.type == "cuda"
    for name in ("graph", "fused"):
        reasons[name] = None if cuda else f"CUDA graphs need a CUDA device, not {device}"
    if not cuda:
        reasons["kernels"] = f"the decode kernels run on a CUDA device, not {device}"
    else:
        from ..kernels import unavailable_reason

        why = unavailable_reason(device)
        if why is None and dtype != torch.bfloat16:
            why = f"the decode kernels compute in bfloat16; this engine's dtype is {str(dtype).removeprefix('torch.')}"
        if why is None and quantization not in (None, "int8", "q4_0"):
            why = (f"the decode kernels read bfloat16, int8 or q4_0 experts, not quantization={quantization!r} "
                   "(int8 / q4_0: a bundle with down in the model's [H, F] layout, made on first use)")
        if why is None and options.lm_head_predictor is not None:
            why = "the decode kernels have no sparse LM head (lm_head_predictor)"
        if why is None and options.sparse_reglu is True:
            why = "the decode kernels compute experts densely (sparse_reglu=True asks for sparse)"
        reasons["kernels"] = why
    return reasons


def choose(requested: str, reasons: dict[str, str | None], quantization: str | None = None) -> str:
    """The backend to build: ``requested`` if it can run (else BackendUnavailable), or for "auto" the kernels when
    they can run, else eager (graph and fused are chosen by name: graph is slower than the kernels, fused is not
    bit-identical to the model; int8 / q4_0 experts run the kernels only by name, ``AUTO_QUANTIZED_NOTE``)."""
    if requested == "auto":
        return "kernels" if reasons["kernels"] is None and quantization is None else "eager"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {requested!r}")
    if reasons[requested] is not None:
        raise BackendUnavailable(f"backend {requested!r} cannot run: {reasons[requested]}")
    return requested
