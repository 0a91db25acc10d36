"""The files of a checkpoint folder, checked before anything is built from them: paths that stay inside the folder,
safetensors headers that safetensors itself accepts, config.json sizes against the stored tensors, the expected
tensor names, and where a folder, default or a Hugging Face repo id resolves."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..resources import default_model_dir, shipped_model_dir
from .config import SmallThinkerConfig
from .dense import dense_expected_tensors
from .dense_config import MODEL_TYPE as DENSE_MODEL_TYPE
from .dense_config import DenseConfig

log = logging.getLogger("smallthinker_lab.model.checkpoint")  # the reader's log, whichever file logs


CONFIG_FILE = "config.json"


SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


DEFAULT_MODEL_DIR = default_model_dir()  # package data when installed, the checkout's data/models otherwise


REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")


# safetensors dtype names: the floating-point ones a model can load, and the byte sizes of all of them
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


_ST_NAME = {v: k for k, v in FLOAT_DTYPES.items()}


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}


_CHUNK = 1 << 22  # elements generated at a time for synthetic tensors (16 MB of fp32)


# data starts on a 64-byte boundary, so mapped tensors are as aligned as fresh ones and matmul kernels take the
# same path for a file as for a fresh tensor (an 8-byte aligned start changed fp32 logits by 1 ulp)
_ALIGN = 64


_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint folder whose files do not hold a SmallThinker model; the message names file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]


def expected_tensors(config: SmallThinkerConfig | DenseConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the HF layout, in file order; no ``lm_head.weight`` when tied (a dense
    Qwen2 config: :func:`~.dense.dense_expected_tensors`)."""
    if isinstance(config, DenseConfig):
        return dense_expected_tensors(config)
    H, D, E, F = config.hidden_size, config.head_dim, config.num_experts, config.moe_ffn_hidden_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, H)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (q, H)
        out[p + "self_attn.k_proj.weight"] = (kv, H)
        out[p + "self_attn.v_proj.weight"] = (kv, H)
        out[p + "self_attn.o_proj.weight"] = (H, q)
        out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "block_sparse_moe.primary_router.weight"] = (E, H)
        for e in range(E):
            x = f"{p}block_sparse_moe.experts.{e}."
            out[x + "gate.weight"] = (F, H)
            out[x + "up.weight"] = (F, H)
            out[x + "down.weight"] = (H, F)
    out["model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, H)
    return out


# ---------------------------------------------------------------- reading
def _names(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


# layer and expert numbers in tensor names; at most 18 digits, so int() never meets a number of thousands of digits
_LAYER_RE = re.compile(r"model\.layers\.(\d{1,18})\.")


_EXPERT_RE = re.compile(r"\.experts\.(\d{1,18})\.")


_MAX_DIM = 1 << 63  # shape products and byte counts stay below this (safetensors multiplies them in u64)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (NaN and Infinity are not numbers in JSON)")


def _inside(root: Path, real: Path) -> bool:
    """Whether ``real`` (resolved) is a file of the folder ``root`` (resolved), or a blob of the Hugging Face hub
    cache that the folder is a snapshot of (``.../snapshots/REV/x -> ../../blobs/SHA``, as ``snapshot_download``
    lays a model out)."""
    if real.parent == root:
        return True
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def checkpoint_file(folder: str | os.PathLike, name: object, listed_in: Path | None = None,
                    names: Iterable[str] = ()) -> Path:
    """The path of the file ``name`` of a checkpoint folder: the one resolver every reader of a checkpoint uses.

    ``name`` must be a plain file name in ``folder`` (no separator, not ``..``, not absolute) that resolves into the
    folder: a symbolic link to a file elsewhere is refused, except into the Hugging Face hub cache's blobs of the
    snapshot the folder is. It must exist and be a regular file (a FIFO or a device would hang or never end).
    ``listed_in``/``names``: the index that names the file and the tensors it maps there, for the message.
    Raises :class:`CheckpointError`; returns ``folder / name`` (or the checked target of a link)."""
    folder = Path(folder)
    shown = name if isinstance(name, str) and name.isprintable() else repr(name)
    shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
    where = (f"{listed_in} names shard {shown}" + (f" (for {_names(names, 3)})" if names else "")
             if listed_in is not None else f"{folder / str(name)}")
    if not isinstance(name, str):
        raise CheckpointError(f"{where}, which is a {type(name).__name__}, not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts:
        raise CheckpointError(f"{where}, which is outside the checkpoint folder {folder}: a checkpoint's files "
                              f"must be in the folder itself")
    if len(parts) != 1 or name in ("", ".") or "\0" in name:
        raise CheckpointError(f"{where}, which is not the name of a file in the checkpoint folder {folder}")
    path = folder / name
    try:
        root = folder.resolve()
        if path.is_symlink():
            real = path.resolve()
            if not _inside(root, real):
                raise CheckpointError(f"{where}, but {path} is a symbolic link to {real}, outside the checkpoint "
                                      f"folder {folder}: refusing to read it")
            path = real
        exists, regular = path.exists(), path.is_file()
    except (OSError, RuntimeError) as e:  # a name too long, a loop of links
        raise CheckpointError(f"{where}, but {path} cannot be examined ({type(e).__name__}: {e})") from None
    if not exists:
        raise CheckpointError(f"{where} but {path} does not exist" if listed_in is not None
                              else f"{path} does not exist")
    if not regular:
        raise CheckpointError(f"{where}, but {path} is not a regular file")
    return path


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without trusting it: sizes, offsets, file length, and that the data of
    the tensors covers the data section exactly (what ``safe_open`` requires), so that a header this accepts is one
    the safetensors library opens."""
    file = Path(file)
    size = file.stat().st_size
    bad = f"{file} is truncated or not a safetensors file"
    if size < 8:
        raise CheckpointError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{bad}: the header claims {n} bytes; {size - 8} follow the length field "
                                  f"and headers are at most {_MAX_HEADER} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{bad}: cannot parse its JSON header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is a {type(header).__name__}, not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{file}: its __metadata__ {meta!r:.200} is not a map of strings to strings")
    data_start, infos, spans = 8 + n, {}, []
    for name, entry in header.items():
        try:
            name.encode("utf-8")  # a lone surrogate (\ud800) is JSON to Python but not to safetensors
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            begin, end = offsets
            ok = (isinstance(shape, list) and isinstance(offsets, list) and isinstance(dtype, str)
                  and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_DIM
                          for v in (*shape, begin, end)) and begin <= end)
            count = 1
            for d in shape if ok else ():
                count *= d
                ok = ok and count < _MAX_DIM
        except (KeyError, TypeError, ValueError, UnicodeEncodeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {entry!r:.300}")
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{file}: tensor {name} has unknown dtype {dtype!r}")
        shape = tuple(shape)
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != need:
            raise CheckpointError(f"{file}: tensor {name} is corrupt: its data_offsets span {end - begin} bytes "
                                  f"but shape {list(shape)} of {dtype} needs {need}")
        if data_start + end > size:
            raise CheckpointError(f"{bad}: tensor {name} ends at byte {data_start + end} but the file has "
                                  f"{size} bytes")
        infos[name] = TensorInfo(name, file, dtype, shape)
        spans.append((begin, end, name))
    spans.sort()
    at, last = 0, None  # the data section must be covered by the tensors, in order, without gaps or overlaps
    for begin, end, name in spans:
        if begin < at:
            raise CheckpointError(f"{file} is corrupt: the data of tensors {last} and {name} overlap")
        if begin > at:
            raise CheckpointError(f"{file} is corrupt: its tensor data is not contiguous: data bytes {at} to "
                                  f"{begin} " + (f"between tensors {last} and {name}" if last else
                                                f"before the first tensor {name}") + " belong to no tensor")
        at, last = end, name
    if data_start + at != size:
        raise CheckpointError(f"{file} is corrupt: its tensor data is not contiguous: the last {size - data_start - at}"
                              f" bytes of the file" + (f" (after tensor {last})" if last else "")
                              + " belong to no tensor")
    return infos


def _stored_tensors(folder: Path) -> tuple[dict[str, TensorInfo], Path]:
    """Every stored tensor with the file holding it, and the file that lists them (index or single file); every
    path goes through :func:`checkpoint_file`."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if os.path.lexists(index) and os.path.lexists(single):
        raise CheckpointError(f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE}: remove the stale one")
    if os.path.lexists(single):
        single = checkpoint_file(folder, SINGLE_FILE)
        return read_header(single), single
    if not os.path.lexists(index):
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (it has {_names(others)}, but no index listing them)" if others else ""
        raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
    index = checkpoint_file(folder, INDEX_FILE)
    if index.stat().st_size > _MAX_HEADER:
        raise CheckpointError(f"{index} is {index.stat().st_size} bytes: not a safetensors index (those are at most "
                              f"{_MAX_HEADER} bytes here)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"), parse_constant=_no_constant)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard, names in sorted(by_shard.items()):
        path = checkpoint_file(folder, shard, listed_in=index, names=names)
        headers[shard] = read_header(path)
        absent = [n for n in names if n not in headers[shard]]
        if absent:
            raise CheckpointError(f"{index} maps tensor {_names(absent, 3)} to {shard}, but {path} has no such tensor")
    infos: dict[str, TensorInfo] = {}
    for shard, held in headers.items():
        unlisted = sorted(set(held) - set(by_shard[shard]))
        if unlisted:
            raise CheckpointError(f"{folder / shard} holds tensor(s) the index {index.name} does not map to it: "
                                  f"{_names(unlisted)}")
        infos.update(held)
    return infos, index


def check_config_sizes(config_file: Path, raw: object, stored: dict[str, TensorInfo], listing: Path,
                       experts_elsewhere: tuple[int, int] | None = None) -> None:
    """Refuse a config.json whose layer or expert count the stored tensors cannot back, before anything that grows
    with those counts is built (the config's per-layer layouts, :func:`expected_tensors`, a model).

    ``raw`` is config.json as parsed JSON. The stored tensors are bounded by the files' sizes (:func:`read_header`),
    so this bounds every list built from the config: ``num_hidden_layers`` may not exceed the number of layers with
    stored tensors, ``moe_num_primary_experts`` the number of experts with stored tensors, and the tensor count the
    config describes may not exceed twice the stored count (``strict=False`` initialises some missing tensors, never
    most of a model). Anything else about the keys (types, ranges) is :class:`SmallThinkerConfig`'s to check."""
    if not isinstance(raw, dict):
        return
    dense = raw.get("model_type") == DENSE_MODEL_TYPE  # Qwen2: 12 tensors per layer (9 without q/k/v biases)
    layers = {int(m.group(1)) for n in stored if (m := _LAYER_RE.match(n))}
    experts = {int(m.group(1)) for n in stored if (m := _EXPERT_RE.search(n))}
    n_stored = len(stored)
    if experts_elsewhere is not None:  # the experts' tensors are in an expert bundle: its counts bound the config
        layers, experts = set(range(int(experts_elsewhere[0]))), set(range(int(experts_elsewhere[1])))
        n_stored += 3 * len(layers) * len(experts)
    default = (DenseConfig if dense else SmallThinkerConfig).__dataclass_fields__

    def number(key: str):
        v = raw.get(key, default[key].default)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    L, E = number("num_hidden_layers"), None if dense else number("moe_num_primary_experts")
    for key, value, have, what in (("num_hidden_layers", L, len(layers), "layers"),
                                   ("moe_num_primary_experts", E, len(experts), "experts")):
        if value is not None and value > have:
            raise CheckpointError(f"{config_file}: {key} is {value!r}, but the weights ({listing}) hold tensors of "
                                  f"only {have} {what}: refusing to build a model of that size")
    if L is not None and (E is not None or dense):
        described = 3 + L * (12 if dense else 7 + 3 * E)
        if described > 2 * n_stored + 16:
            what = f"num_hidden_layers={L!r}" + ("" if dense else f" x moe_num_primary_experts={E!r}")
            verb = "describes" if dense else "describe"
            raise CheckpointError(f"{config_file}: {what} {verb} {described:.0f} tensors, but the weights ({listing}) "
                                  f"hold only "
                                  f"{n_stored}: refusing to build a model of that size")


def _torch_dtype(dtype: torch.dtype | str | None, where: str) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CheckpointError(f"{where}: {dtype!r} is not a floating-point torch dtype")
    return value


def _config_hint(config: SmallThinkerConfig, unexpected: list[str]) -> str:
    """Explain unexpected tensors that come from more layers or experts than config.json declares."""
    layers = {int(m.group(1)) for n in unexpected if (m := _LAYER_RE.match(n))}
    experts = {int(m.group(1)) for n in unexpected if (m := _EXPERT_RE.search(n))}
    hints = []
    if layers and max(layers) >= config.num_hidden_layers:
        hints.append(f"the weights have tensors for {max(layers) + 1} layers but config.json says "
                     f"num_hidden_layers={config.num_hidden_layers}")
    if experts and isinstance(config, SmallThinkerConfig) and max(experts) >= config.num_experts:
        hints.append(f"the weights have {max(experts) + 1} experts per layer but config.json says "
                     f"moe_num_primary_experts={config.num_experts}")
    return f" ({'; '.join(hints)})" if hints else ""


def _is_repo_id(text: str) -> bool:
    """``owner/name`` as the Hugging Face hub spells repo ids (letters, digits, ``-_.``; one slash)."""
    return REPO_ID_RE.fullmatch(text) is not None and ".." not in text


def hub_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool = True) -> Path:
    """The folder of ``repo_id``'s snapshot in the Hugging Face hub cache (huggingface_hub's own lookup).

    The cache is ``cache_dir``, else huggingface_hub's (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
    ~/.cache/huggingface/hub). With ``local_files_only=False`` huggingface_hub downloads what is missing.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / (revision or "main")
        found = (f"{repo} has no snapshot for revision {revision or 'main'} ({ref} is missing)" if repo.is_dir()
                 else f"{repo} does not exist")
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face hub cache {cache}: {found}. "
            f"Download it (`hf download {repo_id}`, or from_pretrained(..., local_files_only=False)), set "
            f"HF_HUB_CACHE / HF_HOME to the cache that holds it, or pass the checkpoint folder") from None


def resolve_path(path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool = True) -> Path:
    """The checkpoint folder for ``path``.

    ``"default"`` is the shipped tiny model; an existing folder (or a ``.safetensors`` file in one) is itself; a
    shipped model's name (``"smallthinker-tiny-draft"``: resources.SHIPPED_MODELS) is its folder in the package data;
    otherwise an ``owner/name`` repo id is looked up in the local Hugging Face hub cache (:func:`hub_snapshot`).
    """
    if str(path) == "default":
        folder = DEFAULT_MODEL_DIR
        if not (folder / SINGLE_FILE).exists() and not (folder / INDEX_FILE).exists():
            raise FileNotFoundError(
                f"the default model {folder} has no weights yet: this install of smallthinker-lab lacks its "
                f"package data. Reinstall it from a wheel or with `pip install .` in a complete checkout; in a "
                f"checkout, restore the folder with `git checkout -- data/models/smallthinker-tiny`. Or pass a "
                f"checkpoint folder or a Hugging Face repo id (write_synthetic_checkpoint(path, "
                f"SmallThinkerConfig.from_name('smallthinker-tiny')) gives random weights of that shape)")
        return folder
    folder = Path(path).expanduser()
    if folder.is_file() and folder.suffix == ".safetensors":
        folder = folder.parent
    if folder.is_dir():
        return folder
    shipped = shipped_model_dir(str(path))
    if shipped is not None:
        if not (shipped / SINGLE_FILE).exists():
            raise FileNotFoundError(f"the shipped model {str(path)!r} has no weights at {shipped}: this install of "
                                    f"smallthinker-lab lacks its package data (reinstall it from a complete checkout)")
        return shipped
    if isinstance(path, str) and _is_repo_id(path):
        return hub_snapshot(path, revision, cache_dir, local_files_only)
    raise FileNotFoundError(f"no checkpoint folder at {folder}")
