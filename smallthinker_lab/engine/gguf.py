"""A GGUF as a folder the engine opens: config.json, the non-expert weights, the tokenizer and an expert bundle
written straight from the GGUF's expert tensors.

Q4_0 and Q8_0 experts go into the bundle byte for byte (formats ``ggml_q4_0`` / ``ggml_q8_0`` of :mod:`.quant`:
gate and up blocked along H as the bundle stores them, down blocked along F as the GGUF stores it), so the engine
computes with exactly the weights llama.cpp does. BF16 / F16 / F32 experts keep their dtype (down transposed to
the bundle's [F, H]); any other type (K-quants, mixed types) is dequantised with ``gguf.quants`` to fp32. The
non-expert weights are those :func:`..model.gguf.load_gguf` loads, in its default dtype, so an engine over the
folder and ``load_model`` of the GGUF compute with the same numbers.

The folder is ``<file>.gguf.smallthinker/`` beside the file when that is writable, else under the user cache; it
is rebuilt when the GGUF's size or mtime changes (recorded in ``gguf_source.json``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from ..model.gguf import EXPERT_TENSORS, GGUFModel, default_dtype, gguf_state_dict, load_gguf_tokenizer, read_gguf
from .bundle import (
    CHECKSUMS,
    DATA_NAME,
    GGUF_SOURCE_FILE,
    INDEX_NAME,
    MATRICES,
    PAGE,
    _header_bytes,
    _index_dict,
    default_bundle_dir,
    default_checksum,
    record_layout,
    source_fingerprint,
)
from .quant import get_format, ggml_prefix

SOURCE_FILE = GGUF_SOURCE_FILE  # its presence: the experts are only in the bundle
_VERBATIM = {GGMLQuantizationType.Q4_0: "ggml_q4_0", GGMLQuantizationType.Q8_0: "ggml_q8_0"}
_RAW = {GGMLQuantizationType.BF16: "bf16", GGMLQuantizationType.F16: "fp16", GGMLQuantizationType.F32: "fp32"}
_GGUF_MATRIX = {m: k for k, m in EXPERT_TENSORS.items()}  # "gate" -> "ffn_gate_exps"


def materialised_dir(path: str | os.PathLike) -> Path:
    """Where :func:`materialise` puts the folder of ``path``."""
    src = Path(path).expanduser().resolve()
    if os.access(src.parent, os.W_OK):
        return src.with_name(src.name + ".smallthinker")
    key = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smallthinker_lab" / "gguf"
    return base / f"{src.name}-{key}"


def _stamp(src: Path) -> dict:
    st = src.stat()
    return {"gguf": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def materialise(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The engine's folder for a SmallThinker GGUF (built on first use, or when the file changed); returns it.
    ``Engine.from_pretrained(materialise("model.gguf"), ...)`` runs on the file's own expert weights."""
    src = Path(path).expanduser().resolve()
    out = Path(out_dir) if out_dir is not None else materialised_dir(src)

    def current() -> bool:
        try:
            recorded = json.loads((out / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return recorded == _stamp(src) and (default_bundle_dir(out) / INDEX_NAME).is_file()

    if current():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:  # one build at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not current():
            _build(src, out, progress)
    return out


def _build(src: Path, out: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    g = read_gguf(src)
    dtype = default_dtype(g)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        g.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(tmp)
        state = gguf_state_dict(g, dtype, experts=False)
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": src.name})
        tok = load_gguf_tokenizer(g)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        fingerprint = source_fingerprint(tmp)  # names, sizes, mtimes: unchanged by the rename below
        write_expert_bundle(g, tmp / default_bundle_dir(tmp).name, fingerprint, progress)
        (tmp / SOURCE_FILE).write_text(json.dumps(_stamp(src)) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bundle_format(g: GGUFModel) -> str:
    """The bundle format of a GGUF's experts: ggml_q4_0 / ggml_q8_0 (verbatim), bf16 / fp16 / fp32 (as stored), or
    fp32 (dequantised) when they are of another type or of several."""
    kinds = {g.tensors[f"blk.{i}.{k}.weight"].tensor_type
             for i in range(g.config.num_hidden_layers) for k in EXPERT_TENSORS}
    if len(kinds) == 1:
        kind = kinds.pop()
        return _VERBATIM.get(kind) or _RAW.get(kind) or "fp32"
    return "fp32"


def _expert_matrices(g: GGUFModel, layer: int, fmt: str) -> dict[str, list[np.ndarray]]:
    """Per matrix, the E encoded buffers of one layer (the bundle's [F, H] orientation)."""
    E = g.config.num_experts
    out = {}
    for m in MATRICES:
        name = f"blk.{layer}.{_GGUF_MATRIX[m]}.weight"
        if fmt.startswith("ggml_"):  # the file's blocks; per expert one contiguous run
            prefix = np.frombuffer(ggml_prefix(1 if m == "down" else 0), np.uint8)
            raw = g.raw(name).reshape(E, -1)
            out[m] = [np.concatenate([prefix, raw[e]]) for e in range(E)]
        else:
            w = g.array(name)  # (E, F, H), down (E, H, F); the stored dtype or dequantised fp32
            if m == "down":
                w = w.transpose(1, 2)
            codec = get_format(fmt)
            out[m] = [codec.encode(w[e].contiguous()).numpy() for e in range(E)]
    return out


def write_expert_bundle(g: GGUFModel, out: Path, source: dict, progress: bool = True) -> Path:
    """An expert bundle (engine/bundle.py's file format) from a GGUF's expert tensors, in :func:`bundle_format`."""
    c = g.config
    L, E, H, F = c.num_hidden_layers, c.num_experts, c.hidden_size, c.moe_ffn_hidden_size
    fmt = bundle_format(g)
    specs, payload, stride = record_layout(H, F, fmt, down_transposed=True)
    header = {"format": fmt, "num_layers": L, "num_experts": E, "hidden_size": H, "ffn_size": F, "stride": stride,
              "payload_nbytes": payload, "down_transposed": True}
    bundle_id, algo = uuid.uuid4().hex, default_checksum()
    digest = CHECKSUMS[algo]()
    offsets, sums = np.zeros((L, E), np.int64), np.zeros((L, E), np.uint64)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=L, desc=f"experts of {g.path.name} ({fmt})", unit="layer", leave=False)
    try:
        with open(out / DATA_NAME, "wb") as f:
            f.write(_header_bytes(bundle_id, header))
            pos = PAGE
            for layer in range(L):
                mats = _expert_matrices(g, layer, fmt)
                for e in range(E):
                    record = bytearray(stride)
                    for m in MATRICES:
                        buf, s = mats[m][e], specs[m]
                        if buf.nbytes != s.nbytes:
                            raise RuntimeError(f"{g.path}: layer {layer} expert {e} {m}: {buf.nbytes} bytes, the "
                                               f"{fmt} bundle needs {s.nbytes}")
                        record[s.offset:s.offset + s.nbytes] = buf.tobytes()
                    sums[layer, e] = digest(memoryview(record)[:payload])
                    offsets[layer, e] = pos
                    f.write(record)
                    pos += stride
                if bar is not None:
                    bar.update(1)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if bar is not None:
            bar.close()
    index = _index_dict(bundle_id, header, specs, offsets, sums, algo, pos, source)
    (out / INDEX_NAME).write_text(json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")
    return out

