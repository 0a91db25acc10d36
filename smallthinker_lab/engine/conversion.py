"""Conversion of a checkpoint's experts into an expert bundle (``convert``), and ``ensure_bundle``: the bundle of a
checkpoint, converted first when missing or stale. The format is bundle.py's; the bytes are written by
bundle_writer.py's ``BundleWriter`` (also used by engine/synthetic.py's direct writer)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..model.checkpoint import CheckpointError, resolve_path
from .bundle import (
    _ST_FORMAT,
    BUNDLE_VERSION,
    MAGIC,
    MATRICES,
    QUANTIZATIONS,
    BundleError,
    _checked_default_dir,
    _expert_name,
    _index_summary,
    bundle_format,
    bundle_only_dir,
    bundle_only_names,
    checkpoint_tensors,
    down_transposed_for,
    packing,
    source_fingerprint,
)
from .bundle_writer import BundleWriter
from .files import _open_lock
from .quant import get_format


def convert(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
            quantization: str | None = None, progress: bool = True, down_transposed: bool = True) -> Path:
    """Write the expert bundle of a checkpoint folder; returns the bundle folder.

    ``quantization``: None keeps the stored precision (bf16/fp16/fp32); "bf16"/"fp16"/"fp32" convert,
    "int8" (per-row absmax) and "q4_0" (ggml) quantise weight-only. ``down_transposed=False`` keeps the down
    matrix in the model's [H, F] layout (raw formats; what the engine's ``exact=True`` reads without a transpose).
    One expert's three matrices are in memory at a time.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    ckpt = resolve_path(checkpoint_dir)
    config, tensors = checkpoint_tensors(ckpt)
    L, E, H, F = config.num_hidden_layers, config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
    missing = [_expert_name(layer, e, m) for layer in range(L) for e in range(E) for m in MATRICES
               if _expert_name(layer, e, m) not in tensors]
    if missing:
        raise BundleError(f"{ckpt}: {len(missing)} expert tensor(s) missing, e.g. {missing[0]}")
    if quantization is None:
        kinds = {tensors[_expert_name(0, 0, m)][1] for m in MATRICES}
        if len(kinds) != 1 or next(iter(kinds)) not in _ST_FORMAT:
            raise BundleError(f"{ckpt}: expert tensors have dtype(s) {sorted(kinds)}; pass quantization=...")
        fmt = _ST_FORMAT[kinds.pop()]
    else:
        fmt = quantization
    down_transposed = down_transposed_for(fmt, down_transposed)
    out = Path(out_dir) if out_dir is not None else _checked_default_dir(ckpt, quantization, down_transposed)
    from safetensors import SafetensorError, safe_open

    with BundleWriter(out, L, E, H, F, fmt, down_transposed, progress, f"converting experts ({fmt})",
                      codec=get_format(fmt)) as w:
        for layer in range(L):
            handles: dict[Path, object] = {}  # reopened per layer: mapped pages of earlier layers are dropped
            try:
                for e in range(E):
                    mats = {}
                    for m in MATRICES:
                        name = _expert_name(layer, e, m)
                        file = tensors[name][0]
                        try:
                            if file not in handles:
                                handles[file] = safe_open(str(file), framework="pt", device="cpu")
                            mats[m] = handles[file].get_tensor(name)
                        except (SafetensorError, OSError) as err:
                            raise CheckpointError(f"{file}: cannot read tensor {name}: {type(err).__name__}: "
                                                  f"{err}") from None
                    w.add(layer, e, mats, where=f"{tensors[_expert_name(layer, e, 'gate')][0]}: layer {layer} "
                                                f"expert {e}")
            finally:
                handles.clear()
        w.finish(source_fingerprint(ckpt))
    return out



def native_quantization(checkpoint_dir: Path, bundle_dir: Path | None) -> str:
    """The bundle format of a CPU engine with quantization="q4_0" and the native kernel (engine/native.py):
    "q4_0x8", the same blocks with rows interleaved by 8 (8 rows a pass), except where a bundle already in ggml's
    "q4_0" rows is there to read as it is (the kernel's row layout): an explicit ``bundle_dir`` of that format, or
    a folder storing its experts only in bundles with no q4_0x8 one."""
    if bundle_dir is not None:
        return "q4_0" if bundle_format(bundle_dir) == "q4_0" else "q4_0x8"
    names = bundle_only_names(checkpoint_dir)
    if names is not None and not any(v.get("format") == "q4_0x8" for v in names.values()):
        return "q4_0"
    return "q4_0x8"


def ensure_bundle(checkpoint_dir: Path, bundle_dir: Path | None, quantization: str | None,
                  progress: bool = True, down_transposed: bool = True) -> Path:
    """The bundle folder for a checkpoint, converting first when it has no index (never converted, or an
    interrupted conversion), when the index is of another version or format, or when the checkpoint changed since
    (sizes or mtimes of its files). A bundle that claims to be current but fails validation (truncated data,
    missing data file) is an error, not silently rebuilt: storage problems must be seen. ``down_transposed`` is the
    layout of a new conversion; the default folder is per layout, and an explicit ``bundle_dir`` of the other
    layout is used as it is (the engine reads both)."""
    down_transposed = down_transposed_for(quantization, down_transposed)
    if bundle_only_names(checkpoint_dir) is not None:  # nothing to convert from: the folder's own bundles
        return Path(bundle_dir) if bundle_dir is not None else bundle_only_dir(checkpoint_dir, quantization,
                                                                               down_transposed)
    out = Path(bundle_dir) if bundle_dir is not None else _checked_default_dir(checkpoint_dir, quantization,
                                                                               down_transposed)

    def stale() -> bool:
        idx = _index_summary(out)
        return (idx is None or idx.get("magic") != MAGIC.decode() or idx.get("version") != BUNDLE_VERSION
                or (quantization is not None and idx.get("format") != quantization)
                or (bundle_dir is None and idx.get("down_transposed") != down_transposed)
                or idx.get("packing") != packing(idx.get("format", ""))
                or idx.get("source") != source_fingerprint(checkpoint_dir))

    if stale():
        out.mkdir(parents=True, exist_ok=True)
        lock = _open_lock(out / ".convert.lock")  # one conversion at a time (engines opened in parallel)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if stale():  # another process may have converted it meanwhile
                convert(checkpoint_dir, out, quantization, progress=progress, down_transposed=down_transposed)
        finally:
            os.close(lock)  # releases the lock
    return out
