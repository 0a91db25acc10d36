"""The expert bundle: every expert of a checkpoint in one file, plus a small JSON index.

Layout of ``experts.bin`` (all offsets absolute, in bytes):

* ``[0, 4096)``: header: magic ``STLXBND1``, a little-endian u32 format version, the 16-byte bundle id, a u32
  length, then that many bytes of JSON (format, shapes); zero padding.
* then one record per (layer, expert), layer-major: record ``(l, e)`` starts at ``4096 + (l * E + e) * stride``.
  A record holds ``gate [F, H]``, ``up [F, H]`` and ``down`` **transposed** ``[F, H]`` (so a sparse ReGLU gathers
  rows of all three), each encoded in the bundle's weight format (:mod:`.quant`) and starting at a 64-byte
  aligned offset inside the record; the record is zero padded to ``stride``, a multiple of 4096, so every record
  is page aligned and a whole record is one aligned read (O_DIRECT friendly).
  The kernel formats (``q4_0_cpu``, ``int8_cpu``: the operand layout of torch's CPU kernels, see :mod:`.quant`)
  store down in the model's ``[H, F]`` (the kernel's (out, in) operand) and name their packing in the header and
  index (``packing``); a bundle packed under another layout (another CPU capability or torch) is refused.

``experts.json`` (the index, written last) repeats the header, the per-matrix layout, and per layer, per expert
the absolute offsets of gate/up/down, the record's payload size and its checksum: XXH3-64 (``xxhash``, about
16 GB/s on one core here, so verifying a read costs a small fraction of reading it) or, where xxhash is not
installed, crc32 (zlib, about 3.4 GB/s); the index names the algorithm.
Non-expert weights stay in the checkpoint folder. A folder may keep its experts only in bundles of its own (a
GGUF's, engine/gguf.py; a synthetic model written straight into bundles, engine/synthetic.py, whose
``experts_in_bundles.json`` names them): the engine opens those, and nothing is converted.

Conversion streams tensor by tensor (``safe_open``), writes ``.experts.bin.tmp-PID-TOKEN`` and
``.experts.json.tmp-PID-TOKEN`` (created exclusively, never through a symbolic link), removes any previous index, then
renames data and index into place, so an interrupted conversion leaves no index, and a bundle without an index is not
a bundle. The next conversion into the folder removes the temporaries of dead processes (a killed conversion's).
The checkpoint is read through :func:`..model.checkpoint.read_checkpoint`, so ``convert`` and the engine refuse what
``load_model`` refuses; the default bundle folder must be a real folder of the checkpoint (not a symbolic link).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model.checkpoint import CONFIG_FILE, INDEX_FILE, CheckpointError, read_checkpoint, resolve_path
from ..model.config import SmallThinkerConfig
from ..model.dense import DenseModelError
from ..model.dense_config import DenseConfig
from .errors import BundleError, ExpertReadError  # noqa: F401
from .files import (  # noqa: F401
    _LIVE_LOCK,
    _LIVE_TEMPS,
    _TEMP_RE,
    _create_exclusive,
    _fsync_dir,
    _open_lock,
    remove_stale_temporaries,
)
from .quant import KERNEL_FORMATS, NATIVE_FORMATS, get_format, int4pack_layout

# 3: the kernel formats and "packing" (2: per-expert "checksum" with the algorithm named in the index; 1: crc32 only)
BUNDLE_VERSION = 3
MAGIC = b"STLXBND1"
PAGE = 4096  # record alignment (and the header size)
MATRIX_ALIGN = 64  # alignment of each matrix inside a record
DATA_NAME = "experts.bin"
INDEX_NAME = "experts.json"
MATRICES = ("gate", "up", "down")  # order inside a record; down is stored transposed [F, H]
QUANTIZATIONS = (None, "bf16", "fp16", "fp32", "int8", "q4_0", *KERNEL_FORMATS, *NATIVE_FORMATS)
_DTYPE_FORMAT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ST_FORMAT = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
FORMAT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _xxh3_64():
    import xxhash  # noqa: PLC0415  (optional at import: a bundle with crc32 checksums reads without it)

    return xxhash.xxh3_64_intdigest


# checksum name -> () -> function(buffer) -> int; both release the GIL on large buffers (the I/O threads verify)
CHECKSUMS = {"xxh3_64": _xxh3_64, "crc32": lambda: zlib.crc32}


def default_checksum() -> str:
    """XXH3-64 when the xxhash package is installed (a dependency of the project), else crc32."""
    try:
        CHECKSUMS["xxh3_64"]()
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class MatrixSpec:
    """One matrix inside an expert record: offset relative to the record start, encoded size, logical shape."""

    name: str
    offset: int
    nbytes: int
    shape: tuple[int, int]


RAW_FORMATS = ("bf16", "fp16", "fp32")  # formats whose down matrix may be stored in the model's [H, F] layout
# quantized formats the GPU decode kernels read as they are (smallthinker_lab.kernels.quant_experts): with down in the
# model's [H, F] layout, quantized along F (as a GGUF's down blocks run)
GPU_KERNEL_FORMATS = ("int8", "q4_0")


def packing(fmt: str) -> str | None:
    """The kernel layout a format's bytes depend on in this process (None: portable bytes)."""
    return int4pack_layout() if fmt == "q4_0_cpu" else None


def down_transposed_for(fmt: str | None, down_transposed: bool = True) -> bool:
    """The down layout a conversion to ``fmt`` uses: the kernel formats (torch's and the native one) always store the
    model's [H, F]."""
    return False if fmt in KERNEL_FORMATS + NATIVE_FORMATS else down_transposed


def record_layout(hidden: int, ffn: int, fmt: str, down_transposed: bool = True
                  ) -> tuple[dict[str, MatrixSpec], int, int]:
    """The matrices of one record, the payload size (end of the last matrix) and the stride (4 KiB aligned).

    ``down_transposed`` (the default) stores down as [F, H], rows per neuron for the sparse ReGLU; False keeps the
    model's [H, F] (raw float formats, and int8 / q4_0 for the GPU decode kernels, quantized along F): what
    ``exact=True`` and the decode kernels compute with, so no read needs a transpose.
    The kernel formats need False (their down is the kernel's (out, in) operand)."""
    f = get_format(fmt)
    if not down_transposed and fmt not in RAW_FORMATS + KERNEL_FORMATS + GPU_KERNEL_FORMATS + NATIVE_FORMATS:
        raise BundleError(f"down in the model's [H, F] layout needs a raw float format {RAW_FORMATS} or one the GPU "
                          f"decode kernels read {GPU_KERNEL_FORMATS}, not {fmt}")
    if down_transposed and fmt in KERNEL_FORMATS + NATIVE_FORMATS:
        raise BundleError(f"format {fmt} stores down in the model's [H, F] layout: down_transposed must be False")
    specs, off = {}, 0
    for name in MATRICES:
        shape = (ffn, hidden) if name != "down" or down_transposed else (hidden, ffn)
        nbytes = f.nbytes(shape)
        specs[name] = MatrixSpec(name, off, nbytes, shape)
        off = _align(off + nbytes, MATRIX_ALIGN)
    payload = specs[MATRICES[-1]].offset + specs[MATRICES[-1]].nbytes
    return specs, payload, _align(payload, PAGE)


@dataclass
class Bundle:
    """An opened, validated bundle: where each expert lives and how to decode it."""

    directory: Path
    data_path: Path
    bundle_id: str
    format: str
    num_layers: int
    num_experts: int
    hidden_size: int
    ffn_size: int
    stride: int  # bytes per record (4 KiB multiple): what one read moves and one cache slot holds
    payload_nbytes: int  # bytes of the three matrices (checksummed)
    matrices: dict[str, MatrixSpec]
    offsets: np.ndarray  # (L, E) int64 absolute record offsets
    checksums: np.ndarray  # (L, E) uint64, of each record's payload
    file_size: int
    source: dict = field(default_factory=dict)
    checksum: str = "xxh3_64"  # the algorithm (CHECKSUMS)
    down_transposed: bool = True  # down stored [F, H] (else the model's [H, F]; see record_layout)

    @property
    def expert_nbytes(self) -> int:
        return self.stride

    @property
    def total_expert_bytes(self) -> int:
        return self.stride * self.num_layers * self.num_experts

    def offset(self, layer: int, expert: int) -> int:
        return int(self.offsets[layer, expert])

    def describe(self) -> str:
        down = "[F, H]" if self.down_transposed else "[H, F] (model layout)"
        return (f"{self.data_path}: {self.num_layers} layers x {self.num_experts} experts, format {self.format}, "
                f"{self.stride} bytes per expert, down {down}, {self.file_size / 2**20:.1f} MiB")


# ------------------------------------------------------------------ source checkpoint
def _expert_name(layer: int, expert: int, matrix: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"


def is_expert_tensor(name: str) -> bool:
    return ".block_sparse_moe.experts." in name


def checkpoint_tensors(folder: str | os.PathLike) -> tuple[SmallThinkerConfig, dict[str, tuple[Path, str]]]:
    """The config and name -> (file, safetensors dtype) of every tensor of a checkpoint folder, checked as
    :func:`load_model` checks them (:func:`read_checkpoint`, strict): file paths inside the folder, config.json sizes
    against the stored tensors, every tensor expected with its shape and a floating-point dtype. A tied
    checkpoint's stored ``lm_head.weight`` is left out. Raises CheckpointError (FileNotFoundError: no weights)."""
    elsewhere = _bundle_only_experts(folder)
    try:
        checked = read_checkpoint(folder, strict=True, experts_elsewhere=elsewhere)
    except CheckpointError:
        if elsewhere is None and _stores_no_experts(folder):
            raise BundleError(f"{resolve_path(folder)} stores no expert tensors and has no expert bundle of its own "
                              f"(no {BUNDLE_ONLY_FILE} naming one): the engine needs the experts either in the "
                              f"checkpoint or in a bundle written with them (smallthinker_lab.engine.synthetic for a "
                              f"synthetic model); pass the folder that holds them") from None
        raise
    if isinstance(checked.config, DenseConfig):
        raise DenseModelError(
            f"{checked.config_file} describes a dense Qwen2 model (model_type 'qwen2'): it has no experts to offload, "
            f"so the engine and convert do not apply. Load it in memory with "
            f"smallthinker_lab.load_model({str(checked.folder)!r}) and generate with smallthinker_lab.generate")
    return checked.config, {n: (i.file, i.dtype) for n, i in checked.stored.items()}


GGUF_SOURCE_FILE = "gguf_source.json"  # engine/gguf.py: the folder's experts are only in its bundle
# engine/synthetic.py: the folder's experts are only in the bundles this file names ({"bundles": {name: {...}}})
BUNDLE_ONLY_FILE = "experts_in_bundles.json"


def _stores_no_experts(folder) -> bool:
    from ..model.checkpoint_files import _stored_tensors

    try:
        stored, _ = _stored_tensors(resolve_path(folder))
    except (CheckpointError, OSError, ValueError):
        return False
    return bool(stored) and not any(is_expert_tensor(n) for n in stored)


def bundle_only_names(folder) -> dict[str, dict] | None:
    """The bundles (folder name -> {"format", "down_transposed"}) of a folder whose experts are only in bundles of
    its own (:data:`BUNDLE_ONLY_FILE`, written by engine/synthetic.py), or None for any other folder."""
    folder = resolve_path(folder)
    marker = folder / BUNDLE_ONLY_FILE
    if not marker.is_file():
        return None
    try:
        names = json.loads(marker.read_text(encoding="utf-8"))["bundles"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{marker} is not a list of bundles ({type(e).__name__}: {e})") from None
    if not isinstance(names, dict) or not names or any(
            not isinstance(n, str) or Path(n).name != n or not n.startswith("expert_bundle") or
            not isinstance(v, dict) for n, v in names.items()):
        raise BundleError(f"{marker}: 'bundles' must map folder names expert_bundle* to their format, got "
                          f"{names!r:.200}")
    return names


def bundle_only_dir(folder, quantization: str | None, down_transposed: bool) -> Path:
    """The bundle an engine over a bundle-only folder (:func:`bundle_only_names`) reads: the one of
    ``quantization`` (None: the checkpoint's precision) in the layout asked for, else in the other layout. A
    missing one, or one written for other non-expert files, is a BundleError (such a folder cannot be converted)."""
    folder = resolve_path(folder)
    names = bundle_only_names(folder)
    base = "expert_bundle" + (f"-{quantization}" if quantization else "")
    for name in (base + ("" if down_transposed else "-down_hf"), base + ("-down_hf" if down_transposed else "")):
        if name in names:
            idx = _index_summary(folder / name)
            if idx is None:
                raise BundleError(f"{folder / name}: the expert bundle {BUNDLE_ONLY_FILE} names has no readable "
                                  f"{INDEX_NAME} (an interrupted write): write the folder again")
            if idx.get("source") != source_fingerprint(folder):
                raise BundleError(f"{folder / name} was written for other non-expert files than {folder} holds now "
                                  f"(sizes or mtimes changed): write the folder again")
            return folder / name
    have = ", ".join(f"{n} ({v.get('format')})" for n, v in names.items())
    raise BundleError(f"{folder} stores its experts only in its bundles ({have}); none is "
                      f"{quantization or 'in the checkpoint precision'}: write the folder with that format too (a "
                      f"folder without expert tensors cannot be converted)")


def _bundle_only_experts(folder) -> tuple[int, int] | None:
    """(layers, experts) of the default expert bundle of a folder that stores its experts only there (one made
    from a GGUF, engine/gguf.py, or by engine/synthetic.py), or None: a folder with expert tensors of its own is
    checked against them."""
    folder = resolve_path(folder)
    names = bundle_only_names(folder)
    if names is not None:
        for name in names:
            summary = _index_summary(folder / name)
            if summary is not None:
                where = f"{folder / name / INDEX_NAME}"
                return (_index_int(summary, "num_layers", where, low=1),
                        _index_int(summary, "num_experts", where, low=1))
        raise BundleError(f"{folder}: {BUNDLE_ONLY_FILE} names expert bundles ({', '.join(names)}), none has a "
                          f"readable {INDEX_NAME}: write the folder again")
    if not (folder / GGUF_SOURCE_FILE).is_file():
        return None
    summary = _index_summary(default_bundle_dir(folder))
    if summary is None:
        raise BundleError(f"{folder}: made from a GGUF ({GGUF_SOURCE_FILE}) but its expert bundle "
                          f"{default_bundle_dir(folder)} is missing or unreadable: materialise the GGUF again")
    where = f"{default_bundle_dir(folder) / INDEX_NAME}"
    return _index_int(summary, "num_layers", where, low=1), _index_int(summary, "num_experts", where, low=1)


def checkpoint_tensor_files(folder: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """Name -> (file, safetensors dtype) of every stored tensor (:func:`checkpoint_tensors`)."""
    return checkpoint_tensors(folder)[1]


def source_fingerprint(folder: Path) -> dict:
    """Names, sizes and mtimes of the checkpoint's weight and config files: a changed checkpoint is reconverted."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name in (CONFIG_FILE, INDEX_FILE))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def default_bundle_dir(checkpoint_dir: str | os.PathLike, quantization: str | None = None,
                       down_transposed: bool = True) -> Path:
    """``<checkpoint>/expert_bundle[-FMT][-down_hf]`` when the folder is writable, else a per-checkpoint cache
    folder (``-down_hf``: down in the model's layout, see :func:`record_layout`)."""
    folder = Path(checkpoint_dir).resolve()
    name = "expert_bundle" + (f"-{quantization}" if quantization else "") + ("" if down_transposed else "-down_hf")
    if os.access(folder, os.W_OK):
        return folder / name
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smallthinker_lab" / "bundles"
    return base / f"{folder.name}-{key}" / name


def _checked_default_dir(checkpoint_dir: str | os.PathLike, quantization: str | None, down_transposed: bool) -> Path:
    """:func:`default_bundle_dir`, refused when it is in the checkpoint folder but is a symbolic link (or anything
    else that resolves elsewhere): whoever can write the checkpoint folder must not choose where a conversion
    writes. An explicit ``bundle_dir`` is the user's choice and used as it is."""
    out = default_bundle_dir(checkpoint_dir, quantization, down_transposed)
    root = Path(checkpoint_dir).resolve()
    if out.parent == root and os.path.lexists(out):
        if out.is_symlink() or out.resolve().parent != root:
            raise BundleError(f"the default bundle folder {out} is a symbolic link to {out.resolve()}, outside the "
                              f"checkpoint folder {root}: refusing to write the bundle there (remove the link, or "
                              f"pass bundle_dir=... to choose that folder explicitly)")
        if not out.is_dir():
            raise BundleError(f"the default bundle folder {out} exists but is not a folder: remove it")
    return out


def _header_bytes(bundle_id: str, header: dict) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    raw = MAGIC + struct.pack("<I", BUNDLE_VERSION) + uuid.UUID(bundle_id).bytes + struct.pack("<I", len(blob)) + blob
    if len(raw) > PAGE:
        raise BundleError("bundle header does not fit in one page")
    return raw + bytes(PAGE - len(raw))


def _index_dict(bundle_id, header, specs, offsets, sums, algo, file_size, source) -> dict:
    experts = []
    for layer in range(offsets.shape[0]):
        row = []
        for e in range(offsets.shape[1]):
            base = int(offsets[layer, e])
            row.append({"offset": base, "nbytes": header["payload_nbytes"], "checksum": int(sums[layer, e]),
                        **{m: base + specs[m].offset for m in MATRICES}})
        experts.append(row)
    return {
        "magic": MAGIC.decode(), "version": BUNDLE_VERSION, "bundle_id": bundle_id, "data_file": DATA_NAME,
        "file_size": file_size, "alignment": PAGE, "checksum": algo, **header,
        "matrices": {m: {"offset": s.offset, "nbytes": s.nbytes, "shape": list(s.shape), "format": header["format"],
                         "transposed": m == "down" and header["down_transposed"]} for m, s in specs.items()},
        "source": source, "experts": experts,
    }


# ------------------------------------------------------------------ open
_MAX_INDEX = 1 << 30  # bytes of experts.json read at most (the 21B's is about 0.5 MB)
_INT_LIMIT = 1 << 62  # offsets, sizes and shapes in an index (numpy int64 holds them, sums of them too)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (NaN and Infinity are not numbers in JSON)")


def _index_int(d: dict, key: str, where: str, low: int = 0, high: int = _INT_LIMIT) -> int:
    """``d[key]``: an integer in [low, high), else a BundleError naming the file, the entry and the key."""
    if key not in d:
        raise BundleError(f"{where}: key {key!r} is missing")
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v < high:
        raise BundleError(f"{where}: {key} is {v!r:.80}, not an integer in [{low}, {high})")
    return v


def _index_value(d: dict, key: str, where: str, kind: type | tuple[type, ...]):
    if key not in d:
        raise BundleError(f"{where}: key {key!r} is missing")
    v = d[key]
    if not isinstance(v, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BundleError(f"{where}: {key} is {v!r:.80}, not a {names}")
    return v


def open_bundle(directory: str | os.PathLike, config: SmallThinkerConfig | None = None) -> Bundle:
    """Read and validate a bundle folder: index present and well formed, version, data size, header id,
    and (with ``config``) the shapes a model of that config needs. Raises :class:`BundleError`, naming the file and
    the key, for every malformed index (a missing key, a value of the wrong type or out of range)."""
    directory = Path(directory)
    index_path, data_path = directory / INDEX_NAME, directory / DATA_NAME
    if not index_path.exists():
        hint = " (an interrupted conversion leaves no index: convert again)" if data_path.exists() else ""
        raise BundleError(f"no expert bundle in {directory}: {INDEX_NAME} is missing{hint}")
    if not index_path.is_file() or index_path.stat().st_size > _MAX_INDEX:
        raise BundleError(f"{index_path} is not an expert bundle index (not a regular file of at most "
                          f"{_MAX_INDEX} bytes)")
    try:
        idx = json.loads(index_path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{index_path} is not valid JSON: {e}") from None
    if not isinstance(idx, dict) or idx.get("magic") != MAGIC.decode():
        raise BundleError(f"{index_path} is not an expert bundle index")
    if idx.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{index_path} has bundle version {idx.get('version')!r:.40}, this engine reads version "
                          f"{BUNDLE_VERSION}: convert the checkpoint again")
    where = str(index_path)
    L, E, H, F = (_index_int(idx, k, where, low=1) for k in ("num_layers", "num_experts", "hidden_size", "ffn_size"))
    stride, payload, size = (_index_int(idx, k, where) for k in ("stride", "payload_nbytes", "file_size"))
    fmt = _index_value(idx, "format", where, str)
    algo = _index_value(idx, "checksum", where, str)
    bundle_id = _index_value(idx, "bundle_id", where, str)
    down_t = _index_value(idx, "down_transposed", where, bool)
    experts = _index_value(idx, "experts", where, list)
    matrices = _index_value(idx, "matrices", where, dict)
    source = idx.get("source", {})
    if not isinstance(source, dict):
        raise BundleError(f"{where}: source is {source!r:.80}, not an object")
    if algo not in CHECKSUMS:
        raise BundleError(f"{index_path}: unknown checksum {algo!r} (known: {', '.join(CHECKSUMS)})")
    try:
        specs, want_payload, want_stride = record_layout(H, F, fmt, down_t)
    except ValueError as e:  # an unknown format
        raise BundleError(f"{index_path}: format {fmt!r}: {e}") from None
    if idx.get("packing") != packing(fmt):
        raise BundleError(f"{index_path}: format {fmt} was packed for kernel layout {idx.get('packing')}, this "
                          f"process's torch uses {packing(fmt)} (another CPU capability or torch version): convert "
                          f"again")
    if (stride, payload) != (want_stride, want_payload):
        raise BundleError(f"{index_path}: stride/payload {stride}/{payload} do not match format {fmt} "
                          f"({want_stride}/{want_payload})")
    for m, s in specs.items():
        got = matrices.get(m)
        if not isinstance(got, dict) or got.get("offset") != s.offset or got.get("nbytes") != s.nbytes or \
                got.get("transposed") != (m == "down" and down_t):
            raise BundleError(f"{index_path}: matrix {m} layout {got!r:.200} does not match format {fmt}")
    if len(experts) != L or any(not isinstance(row, list) or len(row) != E for row in experts):
        raise BundleError(f"{index_path}: expert table is not {L} layers x {E} experts")
    offsets = np.zeros((L, E), dtype=np.int64)
    sums = np.zeros((L, E), dtype=np.uint64)
    for layer, row in enumerate(experts):
        for e, r in enumerate(row):
            at = f"{index_path}: layer {layer} expert {e}"
            if not isinstance(r, dict):
                raise BundleError(f"{at}: the entry is {r!r:.80}, not an object")
            base = _index_int(r, "offset", at)
            sums[layer, e] = _index_int(r, "checksum", at, high=1 << 64)
            if any(_index_int(r, m, at) != base + specs[m].offset for m in MATRICES) or \
                    _index_int(r, "nbytes", at) != payload:
                raise BundleError(f"{at}: matrix offsets inconsistent")
            offsets[layer, e] = base
    try:
        CHECKSUMS[algo]()
    except ImportError:
        raise BundleError(f"{index_path}: checksums are {algo}, which needs the xxhash package: pip install xxhash "
                          f"(or convert again without it, for crc32)") from None
    if size != PAGE + L * E * stride or offsets.min() < PAGE or offsets.max() + stride > size \
            or np.any(offsets % PAGE):
        raise BundleError(f"{index_path}: record offsets do not fit a file of {size} bytes")
    if not data_path.exists():
        raise BundleError(f"expert bundle data file {data_path} is missing")
    if not data_path.is_file():
        raise BundleError(f"expert bundle data file {data_path} is not a regular file")
    actual = data_path.stat().st_size
    if actual != size:
        raise BundleError(f"expert bundle {data_path} is {'truncated' if actual < size else 'too long'}: "
                          f"{actual} bytes, the index says {size}")
    with open(data_path, "rb") as f:
        head = f.read(PAGE)
    if head[:8] != MAGIC or struct.unpack("<I", head[8:12])[0] != BUNDLE_VERSION \
            or uuid.UUID(bytes=head[12:28]).hex != bundle_id:
        raise BundleError(f"{data_path} does not belong to {index_path} (header mismatch): convert again")
    if config is not None:
        want = (config.num_hidden_layers, config.num_experts, config.hidden_size, config.moe_ffn_hidden_size)
        if want != (L, E, H, F):
            raise BundleError(f"bundle {directory} holds {L} layers x {E} experts of [{F}, {H}], but the config "
                              f"needs {want[0]} x {want[1]} of [{want[3]}, {want[2]}]")
    return Bundle(directory, data_path, bundle_id, fmt, L, E, H, F, stride, payload, specs, offsets, sums,
                  size, source, algo, down_t)


def bundle_format(directory: str | os.PathLike) -> str | None:
    """The expert format a bundle folder's index names (None: no readable index there)."""
    idx = _index_summary(Path(directory))
    fmt = idx.get("format") if idx is not None else None
    return fmt if isinstance(fmt, str) else None


def _index_summary(directory: Path) -> dict | None:
    try:
        idx = json.loads((Path(directory) / INDEX_NAME).read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return idx if isinstance(idx, dict) else None
