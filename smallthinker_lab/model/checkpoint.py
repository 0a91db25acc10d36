"""Checkpoints in the Hugging Face layout: load, save, and synthetic weights of the released shapes.

A checkpoint is a folder holding ``config.json`` and either ``model.safetensors`` or shards
``model-0000N-of-0000M.safetensors`` listed in ``model.safetensors.index.json``; tensor names and
shapes are those of the released files (:func:`expected_tensors`). Loading memory-maps the files and
hands the mapped tensors to a model built on the meta device, so a checkpoint is never held twice.
Every reader (``load_model``, the engine, ``convert``) goes through :func:`read_checkpoint`: file paths must stay in
the folder (:func:`checkpoint_file`), headers are checked before the safetensors library sees them
(:func:`read_header`), and config.json's sizes are checked against the stored tensors before anything grows with them.
Writing is streamed tensor by tensor into temporary files that are renamed at the end.
Kept here rather than safetensors' ``save_file`` or transformers' ``save_pretrained``: both take whole tensors in
memory, and a 21B-shaped checkpoint (about 40 GiB of bf16) must be written chunk by chunk on a smaller machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_files import (  # noqa: F401
    _ALIGN,
    _CHUNK,
    _EXPERT_RE,
    _ITEMSIZE,
    _LAYER_RE,
    _MAX_DIM,
    _MAX_HEADER,
    _ST_NAME,
    CONFIG_FILE,
    DEFAULT_MODEL_DIR,
    FLOAT_DTYPES,
    INDEX_FILE,
    REPO_ID_RE,
    SHARD_RE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    TensorInfo,
    _config_hint,
    _inside,
    _is_repo_id,
    _names,
    _no_constant,
    _stored_tensors,
    _torch_dtype,
    check_config_sizes,
    checkpoint_file,
    expected_tensors,
    hub_snapshot,
    log,
    read_header,
    resolve_path,
)
from .config import ConfigError, SmallThinkerConfig
from .dense import DenseForCausalLM
from .dense_config import MODEL_TYPE as DENSE_MODEL_TYPE
from .dense_config import DenseConfig
from .layers import RotaryEmbedding
from .model import CHECKPOINT_IO, SmallThinkerForCausalLM


def _check_finite(t: torch.Tensor, name: str, file: Path, after: str = "") -> None:
    """CheckpointError naming ``file`` and tensor ``name`` when ``t`` holds a NaN or an infinity (read in chunks)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK]
        bad = ~torch.isfinite(part)
        if bool(bad.any()):
            first = i + int(bad.nonzero()[0])
            nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
            raise CheckpointError(f"{file}: tensor {name} is not finite{after}: {nan} NaN and {inf} infinite "
                                  f"value(s) of {flat.numel()}, the first at flat index {first} "
                                  f"({flat[first].item()})")


def check_finite_tensors(files: dict[str, Path]) -> None:
    """Read every tensor of ``files`` (tensor name -> safetensors file, in the order to check) and raise
    :class:`CheckpointError` naming the first that holds a NaN or an infinity."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(Path(file), []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                _check_finite(f.get_tensor(name), name, file)


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A checkpoint folder whose config.json and stored tensors agree (:func:`read_checkpoint`)."""

    folder: Path
    config_file: Path
    config: SmallThinkerConfig
    stored: dict[str, TensorInfo]  # the tensors to load (a tied checkpoint's stored lm_head.weight dropped)
    listing: Path  # the index, or the single weight file
    expected: dict[str, tuple[int, ...]]  # expected_tensors(config)
    missing: list[str]  # expected but not stored (strict=False only)


def read_checkpoint(path: str | os.PathLike = "default", strict: bool = True,
                    experts_elsewhere: tuple[int, int] | None = None) -> CheckedCheckpoint:
    """Read and check a checkpoint folder without loading any weights: what :func:`load_model`, the engine and
    ``convert`` all read through, so they accept and refuse the same folders.

    Every file path is validated (:func:`checkpoint_file`), every header checked (:func:`read_header`), config.json
    checked against the stored tensors before anything grows with it (:func:`check_config_sizes`), then every
    stored tensor must be one the config describes, with the expected shape and a floating-point dtype
    (``strict=False``: missing ones are listed in ``missing`` and unexpected ones skipped, with a warning).
    ``experts_elsewhere=(layers, experts)``: the folder stores no expert tensors (an engine folder whose experts are
    only in its expert bundle, e.g. a GGUF's): config.json's counts are checked against these instead, and the
    expert tensors are not required."""
    folder = resolve_path(path)
    if not os.path.lexists(folder / CONFIG_FILE):
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint folder {folder}")
    config_file = checkpoint_file(folder, CONFIG_FILE)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        SmallThinkerConfig.from_json(config_file)  # names what is wrong with config.json
        raise
    if isinstance(raw, dict) and raw.get("model_type", "smallthinker") not in ("smallthinker", DENSE_MODEL_TYPE):
        raise ConfigError(f"{config_file}: unknown model_type {raw['model_type']!r}: smallthinker_lab loads model_type "
                          f"'smallthinker' (MoE) and '{DENSE_MODEL_TYPE}' (dense)")
    stored, listing = _stored_tensors(folder)
    check_config_sizes(config_file, raw, stored, listing, experts_elsewhere)
    dense = isinstance(raw, dict) and raw.get("model_type") == DENSE_MODEL_TYPE
    config = (DenseConfig if dense else SmallThinkerConfig).from_json(config_file)
    check_config_sizes(config_file, {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
                                     "moe_num_primary_experts": getattr(config, "num_experts", None)}, stored,
                       listing, experts_elsewhere)
    expected = expected_tensors(config)
    if experts_elsewhere is not None:
        expected = {n: s for n, s in expected.items() if not _EXPERT_RE.search(n)}

    if config.tie_word_embeddings and "lm_head.weight" in stored:
        log.debug("%s: ignoring the stored lm_head.weight of a tied checkpoint (the head is the embedding)",
                  stored.pop("lm_head.weight").file)
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    if unexpected:
        kind = "Qwen2 (dense)" if dense else "SmallThinker"
        msg = (f"{listing}: {len(unexpected)} unexpected tensor(s) that a {kind} model of this "
               f"config.json does not have{_config_hint(config, unexpected)}: {_names(unexpected)}")
        if strict:
            raise CheckpointError(msg)
        log.warning("%s; skipping them", msg)
        for n in unexpected:
            stored.pop(n)
    if missing:
        msg = f"{listing}: {len(missing)} tensor(s) missing that {config_file} requires: {_names(missing)}"
        if strict:
            raise CheckpointError(msg)
        log.warning("%s; initialising them", msg)
    for name, shape in expected.items():
        info = stored.get(name)
        if info is None:
            continue
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)} but {config_file} "
                                  f"expects {list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; weights must be one of "
                                  f"{', '.join(FLOAT_DTYPES)}")
    return CheckedCheckpoint(folder, config_file, config, stored, listing, expected, missing)


def read_tensors(file: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``names`` from one safetensors file, memory-mapped (views of the file's pages); an error
    of the safetensors library or of the file system becomes a :class:`CheckpointError` naming file and tensor."""
    from safetensors import SafetensorError, safe_open

    name = None
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        at = f"tensor {name}" if name is not None else "opening it"
        raise CheckpointError(f"{file}: cannot read {at}: {type(e).__name__}: {e}") from None


def load_model(path: str | os.PathLike = "default", dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", strict: bool = True, check_finite: bool = False, *,
               revision: str | None = None, cache_dir: str | os.PathLike | None = None,
               local_files_only: bool = True) -> SmallThinkerForCausalLM | DenseForCausalLM:
    """A SmallThinkerForCausalLM in eval mode from a folder in the Hugging Face layout; a DenseForCausalLM when
    config.json says model_type "qwen2" (Qwen2ForCausalLM's files, e.g. SmallThinker-3B-Preview's), checked the same.

    ``path``: ``"default"`` (the shipped tiny model), a folder, a ``.gguf`` file, or a Hugging Face repo id such
    as ``"PowerInfer/SmallThinker-4BA0.6B-Instruct"``, found in the local hub cache (``cache_dir``, else
    huggingface_hub's default, which follows HF_HUB_CACHE and HF_HOME) at ``revision`` (default main);
    ``local_files_only=False`` lets huggingface_hub download it.

    The weights are memory-mapped (tensors from ``safe_open`` are views of the file's pages, which the
    model then owns; nothing is copied unless ``dtype`` or ``device`` asks for a conversion). The mapping is
    private (copy-on-write), and :func:`save_pretrained` replaces files rather than rewriting them, so saving
    over the folder a model was loaded from is safe; rewriting those files in place by other means is not.
    ``dtype=None`` keeps the stored dtype (config.json's ``torch_dtype`` when the files mix dtypes).

    Every stored tensor must be one the config describes, with the expected shape and a floating-point
    dtype; anything else raises :class:`CheckpointError` naming the file and tensor (:func:`read_checkpoint`:
    the engine and ``convert`` check the same). One documented exception: a checkpoint with
    ``tie_word_embeddings`` may also store ``lm_head.weight`` (the released 4B does); it is ignored (logged at
    debug level) and the head is the embedding. Every file must be in the folder itself (a shard path with
    ``..``, an absolute one or a symbolic link to a file elsewhere is refused), and config.json may not
    describe more layers or experts than the files store.
    With ``strict=False`` missing tensors are initialised as :meth:`init_weights` does and unexpected
    ones are skipped, both with a warning; shape, dtype and file errors still raise.
    ``check_finite=True`` reads every weight once more and raises :class:`CheckpointError` naming the first
    tensor that holds a NaN or an infinity (stored so, or overflowing the requested ``dtype``).
    A path ending in ``.gguf`` is read as a SmallThinker GGUF (:func:`.gguf.load_gguf`).
    """
    if isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".gguf"):
        from .gguf import load_gguf  # the gguf package, imported only for a GGUF (model/gguf.py reads it)

        return load_gguf(path, dtype=dtype, device=device, strict=strict)
    folder = resolve_path(path, revision, cache_dir, local_files_only)
    checked = read_checkpoint(folder, strict)
    config, config_file, stored, expected, missing = (checked.config, checked.config_file, checked.stored,
                                                      checked.expected, checked.missing)

    target = _torch_dtype(dtype, "load_model(dtype=...)")
    if target is None:
        kinds = {stored[n].dtype for n in expected if n in stored}
        target = (FLOAT_DTYPES[kinds.pop()] if len(kinds) == 1
                  else _torch_dtype(config.torch_dtype, f"{config_file} torch_dtype"))
    device = torch.device(device)

    with torch.device("meta"):
        model = (DenseForCausalLM if isinstance(config, DenseConfig) else SmallThinkerForCausalLM)(config)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in stored:
            by_file.setdefault(stored[name].file, []).append(name)

    for file, names in by_file.items():
        for name, t in read_tensors(file, names):  # views of the mapped file
            if check_finite:
                _check_finite(t, name, file)
            if t.dtype != target or t.device != device:
                t = t.to(device=device, dtype=target)
                if check_finite:
                    _check_finite(t, name, file, f" after conversion to {target}")
            state[name] = t
    if missing:
        state.update(_initialised(config, missing, expected, target, device))
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if config.tie_word_embeddings:  # assign=True gives each name its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"load_model left tensors unmaterialised on the meta device: {_names(left)}")
    model.name_or_path = str(folder)  # where its tokenizer is looked for
    return model.eval()


def _initialised(config: SmallThinkerConfig, names: list[str], shapes: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n in names:
        shape = shapes[n]
        t = (torch.zeros(shape) if n.endswith(".bias") else torch.ones(shape) if len(shape) == 1
             else torch.empty(shape).normal_(0.0, config.initializer_range, generator=gen))
        out[n] = t.to(device=device, dtype=dtype)
    return out


# ---------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MiB" (2^20) or "1024"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5000000, '500MB' or '5GB'")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** "BKMGT".index(m.group(2).upper() or "B"))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _plan_shards(items: list[tuple[str, str, tuple[int, ...]]], max_bytes: int | None) -> list[list[int]]:
    """Indices of items per shard, greedily filled in order; a tensor larger than max_bytes gets its own."""
    if max_bytes is None:
        return [list(range(len(items)))]
    shards, cur, cur_bytes = [], [], 0
    for i, (_, dtype, shape) in enumerate(items):
        n = math.prod(shape) * _ITEMSIZE[dtype]
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    return shards + [cur] if cur else shards


def _write_safetensors(path: Path, items: list[tuple[str, str, tuple[int, ...]]],
                       produce: Callable[[str], Iterator[torch.Tensor]], progress=None) -> int:
    """Write a safetensors file tensor by tensor; ``produce(name)`` yields its data in row-major chunks."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in items:
        n = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % _ALIGN)  # pad with spaces (as safetensors does) so the data starts aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape in items:
            want, written = math.prod(shape) * _ITEMSIZE[dtype], 0
            for chunk in produce(name):
                if chunk.dtype != FLOAT_DTYPES[dtype]:
                    raise TypeError(f"{name}: produced {chunk.dtype}, expected {dtype}")
                data = chunk.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != want:
                raise RuntimeError(f"{name}: wrote {written} bytes, expected {want}")
            if progress is not None:
                progress.update(want)
        f.flush()
        os.fsync(f.fileno())
    return offset


def _write_checkpoint(folder: Path, config: SmallThinkerConfig, items: list[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], Iterator[torch.Tensor]], max_shard_size: int | str | None) -> Path:
    """Write config.json and the weights to temporary names, then rename them into place."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; writing on a big-endian machine is not supported")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    plan = _plan_shards(items, max_bytes)
    names = ([SINGLE_FILE] if len(plan) == 1
             else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    total = sum(math.prod(s) * _ITEMSIZE[d] for _, d, s in items)
    tag = f".tmp-{os.getpid()}"
    temps: list[tuple[Path, Path]] = []  # (temporary, final)
    progress = None
    if total > 1 << 30:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {folder.name}")
    try:
        for file, idx in zip(names, plan):
            tmp = folder / f".{file}{tag}"
            temps.append((tmp, folder / file))
            _write_safetensors(tmp, [items[i] for i in idx], produce, progress)
        if len(plan) > 1:
            weight_map = {items[i][0]: file for file, idx in zip(names, plan) for i in idx}
            tmp = folder / f".{INDEX_FILE}{tag}"
            tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                           + "\n", encoding="utf-8")
            temps.append((tmp, folder / INDEX_FILE))
        tmp = folder / f".config{tag}.json"
        config.save(tmp)
        temps.append((tmp, folder / CONFIG_FILE))
        # drop weights of an earlier save that the new layout would contradict, then rename into place
        new = {final.name for _, final in temps}
        for old in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
            if old.name not in new and (old.name in (SINGLE_FILE, INDEX_FILE) or SHARD_RE.fullmatch(old.name)):
                old.unlink(missing_ok=True)
        for tmp, final in temps:
            os.replace(tmp, final)  # a new inode: models memory-mapping the old file keep their pages
    finally:
        if progress is not None:
            progress.close()
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    _verify(folder, names, plan, items)
    return folder


def _verify(folder: Path, names: list[str], plan: list[list[int]], items) -> None:
    from safetensors import safe_open

    for file, idx in zip(names, plan):
        with safe_open(str(folder / file), framework="pt") as f:
            want = {items[i][0]: list(items[i][2]) for i in idx}
            got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            if got != want:
                raise RuntimeError(f"{folder / file}: written tensors do not read back as written")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: SmallThinkerForCausalLM, path: str | os.PathLike, max_shard_size: int | str | None = None,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write config.json and the weights in the HF layout; shards and an index when ``max_shard_size`` is given.

    ``dtype`` converts tensor by tensor as they are written (None: as they are); config.json's
    ``torch_dtype`` says what was written. A tied model writes no ``lm_head.weight``.

    Crash-safe: the new checkpoint is written into a staging folder next to ``path`` and swapped in at
    once (:func:`~smallthinker_lab.model.atomic.replace_folder`), so a process killed at any point leaves
    the old checkpoint or the new one, never a mix; leftovers of killed saves are removed by the next one.
    save_pretrained owns ``config.json``, ``model.safetensors``, ``model.safetensors.index.json`` and the
    ``model-NNNNN-of-NNNNN.safetensors`` shards: those of an earlier save are replaced (stale shards go).
    Every other file or folder in ``path`` (tokenizer files, an expert bundle, your notes) is kept as it is,
    and nothing else is copied in. Where no staging folder can be made next to ``path`` (``path`` is a
    mount point, or its parent is not writable) the files are written in place with a warning: a crash
    there can leave a mix.
    """
    config = model.config
    target = _torch_dtype(dtype, "save_pretrained(dtype=...)")
    state = model.state_dict()
    expected = expected_tensors(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if set(state) != set(expected):
        raise CheckpointError(f"model state does not match the {type(model).__name__} layout: missing "
                              f"{_names(set(expected) - set(state))}, extra {_names(set(state) - set(expected))}")
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, the config expects {list(expected[name])}")
    items = [(n, _ST_NAME[target or state[n].dtype], expected[n]) for n in expected]
    kinds = {d for _, d, _ in items}
    torch_dtype = _dtype_name(FLOAT_DTYPES[kinds.pop()]) if len(kinds) == 1 else config.torch_dtype
    produce = lambda name: iter((state[name] if target is None else state[name].to(target),))
    return _write_checkpoint_staged(Path(path), config.replace(torch_dtype=torch_dtype), items, produce,
                                    max_shard_size)


# temporaries that _write_checkpoint leaves inside the folder when killed: .model.safetensors.tmp-PID, ...
_INSIDE_TEMP_RE = re.compile(r"\.(?:model[^/]*\.safetensors|model\.safetensors\.index\.json)\.tmp-(\d+)"
                             r"|\.config\.tmp-(\d+)\.json")


def _owned_by_checkpoint(name: str) -> bool:
    """Names in a checkpoint folder that a save replaces: config, weights, index, shards and their temporaries."""
    return (name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) or SHARD_RE.fullmatch(name) is not None
            or _INSIDE_TEMP_RE.fullmatch(name) is not None)


def _write_checkpoint_staged(folder: Path, config: SmallThinkerConfig, items: list[tuple[str, str, tuple[int, ...]]],
                             produce: Callable[[str], Iterator[torch.Tensor]],
                             max_shard_size: int | str | None) -> Path:
    """Write config.json and the weights into a staging folder and swap it in (see :func:`save_pretrained`)."""
    from . import atomic

    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; writing on a big-endian machine is not supported")
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    plan = _plan_shards(items, max_bytes)
    names = ([SINGLE_FILE] if len(plan) == 1
             else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    total = sum(math.prod(s) * _ITEMSIZE[d] for _, d, s in items)
    reason = atomic.staging_unavailable(folder)
    if reason is not None:
        log.warning("%s; writing the checkpoint in place, where a crash can leave old and new files mixed", reason)
        atomic.clean_stale_inside(atomic.target_folder(folder), _INSIDE_TEMP_RE)
        return _write_checkpoint(folder, config, items, produce, max_shard_size)
    with atomic.replace_folder(folder, _owned_by_checkpoint) as tmp:
        progress = None
        if total > 1 << 30:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {folder.name}")
        try:
            for file, idx in zip(names, plan):
                _write_safetensors(tmp / file, [items[i] for i in idx], produce, progress)
                atomic.fault("shard-written")
        finally:
            if progress is not None:
                progress.close()
        atomic.fault("weights-written")
        if len(plan) > 1:
            weight_map = {items[i][0]: file for file, idx in zip(names, plan) for i in idx}
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n", encoding="utf-8")
            atomic.fault("index-written")
        config.save(tmp / CONFIG_FILE)
        atomic.fault("config-written")
        _verify(tmp, names, plan, items)
    return folder


# ------------------------------------------------------------ synthetic
def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def synthetic_tensor_chunks(name: str, shape: tuple[int, ...], seed: int, std: float,
                            dtype: torch.dtype, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """The data of one synthetic tensor in row-major chunks: ones for norms (1-D), else N(0, std) (biases too).

    One generator per tensor, seeded by ``seed`` and the name (so per layer, expert and matrix for the experts),
    drawn on ``device``: the CPU's stream is the same on every machine; a CUDA generator (Philox) draws other values,
    which may depend on the GPU and torch version. The chunks are on ``device``."""
    n = math.prod(shape)
    dev = torch.device(device)
    if len(shape) == 1 and not name.endswith(".bias"):
        yield torch.ones(n, dtype=dtype, device=dev)
        return
    gen = torch.Generator(device=dev).manual_seed(_tensor_seed(seed, name))
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        yield torch.randn(m, generator=gen, device=dev).mul_(std).to(dtype)


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """One whole synthetic tensor of ``shape`` on ``device``: the chunks of :func:`synthetic_tensor_chunks`."""
    chunks = list(synthetic_tensor_chunks(name, shape, seed, std, dtype, device))
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).view(shape)


def write_synthetic_checkpoint(path: str | os.PathLike, config: SmallThinkerConfig, seed: int = 0,
                               dtype: torch.dtype | str = torch.bfloat16, max_shard_size: int | str | None = None,
                               tokenizer=None, store_tied_lm_head: bool = False, experts: bool = True,
                               device: str | torch.device = "cpu") -> Path:
    """Random weights in the exact released layout, streamed tensor by tensor (the 21B fits in no RAM).

    Matrices are N(0, initializer_range), norms 1; each tensor comes from its own generator seeded by
    ``seed`` and its name, so the content does not depend on sharding or order. ``store_tied_lm_head``
    also writes ``lm_head.weight`` (equal to the embedding) in a tied checkpoint, as the released 4B does.
    ``tokenizer``: an object with ``save_pretrained`` or a folder whose tokenizer files are copied.
    ``experts=False`` writes the non-expert tensors only (a folder whose experts go straight into an expert
    bundle: engine/synthetic.py); ``device``: where the values are drawn (:func:`synthetic_tensor_chunks`).
    Returns the folder.
    """
    target = _torch_dtype(dtype, "write_synthetic_checkpoint(dtype=...)")
    shapes = expected_tensors(config)
    if not experts:
        shapes = {n: s for n, s in shapes.items() if not _EXPERT_RE.search(n)}
    if config.tie_word_embeddings and store_tied_lm_head:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    items = [(n, _ST_NAME[target], s) for n, s in shapes.items()]
    std = config.initializer_range

    def produce(name: str) -> Iterator[torch.Tensor]:
        source = "model.embed_tokens.weight" if config.tie_word_embeddings and name == "lm_head.weight" else name
        return (c.cpu() for c in synthetic_tensor_chunks(source, shapes[name], seed, std, target, device))

    folder = _write_checkpoint(Path(path), config.replace(torch_dtype=_dtype_name(target)), items, produce,
                               max_shard_size)
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(folder))
        else:
            src = Path(tokenizer)
            files = [src] if src.is_file() else [src / f for f in TOKENIZER_FILES if (src / f).exists()]
            if not files:
                raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
            for f in files:
                shutil.copyfile(f, folder / f.name)
    return folder


CHECKPOINT_IO.update(load=load_model, save=save_pretrained)  # SmallThinkerForCausalLM.from_pretrained / save
