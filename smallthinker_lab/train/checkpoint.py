"""Training state on disk: checkpoint.pt (written atomically, read back without running code) and the export of the
final model in the Hugging Face layout."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..model.atomic import pid_alive
from ..model.checkpoint import CheckpointError
from ..model.config import SmallThinkerConfig
from ..model.model import SmallThinkerForCausalLM

# ------------------------------------------------------------------ checkpoints and export
# checkpoint.pt is a torch zip archive of plain containers (dict, list, tuple, str, int, float, bool, None) and
# tensors only, read back with ``torch.load(weights_only=True)``: loading it runs no code. Anything else in that
# file (a pickle of other objects, the pickled numpy RNG state of older versions) is refused, never unpickled.
CHECKPOINT_FORMAT = "smallthinker-lab train state"
CHECKPOINT_VERSION = 2


def _plain(obj):
    """A JSON round trip: what the checkpoint stores of args and config is plain data (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def _rng_state(device) -> dict:
    """Every RNG state the run may depend on, as tensors and plain containers."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {"kind": str(kind), "key": [int(v) for v in key], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def _set_rng_state(rng: dict, device, path: Path) -> None:
    try:
        torch.set_rng_state(rng["torch"].cpu())
        n = rng["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
        py = rng["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))
        if rng.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path}: the stored RNG state is malformed ({type(e).__name__}: {e})") from None


def save_checkpoint(path: Path, model, opt, step: int, args, cfg: SmallThinkerConfig, device) -> None:
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "step": int(step), "model": model.state_dict(), "optimizer": opt.state_dict(), "args": _plain(asdict(args)),
        "config": _plain(cfg.to_dict()), "rng": _rng_state(device),
    }
    _write_atomic(path, state)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of writers of ``path`` that died (``<name>.tmp-<pid>`` of no live process, and the
    ``<stem>.pt.tmp`` of older versions)."""
    for p in path.parent.glob(f"{path.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
    path.with_suffix(".pt.tmp").unlink(missing_ok=True)


def _write_atomic(path: Path, state: dict) -> None:
    """torch.save into ``<name>.tmp-<pid>`` (created afresh, never through a symlink), fsync, then os.replace:
    a kill at any point leaves the previous checkpoint or the new one, never a partial file under ``path``."""
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_START_OVER = "delete it or pass resume=False (--no-resume) to start over"


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The training state in ``path`` (checkpoint.pt), loaded without running code.

    Raises :class:`CheckpointError` naming the file when it is not a torch zip archive, holds anything but
    tensors and plain containers (a planted pickle, or a checkpoint of an older version that pickled numpy
    objects: neither is unpickled), or lacks this format's marker and fields.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"refusing to load {path}: it is not a torch zip archive of training state (an old "
                              f"or foreign file, or a plain pickle); it was not unpickled; {_START_OVER}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers ({why}), so loading "
            f"it could run code; it is a checkpoint of an older smallthinker-lab version (pickled numpy RNG state) "
            f"or a planted file, and was not unpickled; {_START_OVER}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}; {_START_OVER}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a smallthinker-lab training checkpoint (no format marker "
                              f"{CHECKPOINT_FORMAT!r}); {_START_OVER}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has training-state version {state.get('version')!r}; this version reads "
                              f"{CHECKPOINT_VERSION}; {_START_OVER}")
    kinds = {"step": int, "model": dict, "optimizer": dict, "args": dict, "config": dict, "rng": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: field {key!r} is {type(state.get(key)).__name__}, expected "
                                  f"{kind.__name__}; {_START_OVER}")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: step {state['step']} is negative; {_START_OVER}")
    return state


def load_checkpoint(path: Path, model, opt, args, cfg: SmallThinkerConfig, device, resumable: set[str]) -> int:
    """Restore model, optimizer and RNG states from ``path``; the run's arguments (``args``, a dataclass) must match
    the checkpoint's except those named in ``resumable``, and the model config must match. Returns the step."""
    state = read_checkpoint(path, map_location=device)
    saved = state["args"]
    diff = {f.name: (saved.get(f.name), getattr(args, f.name)) for f in fields(args)
            if f.name not in resumable and _norm(saved.get(f.name)) != _norm(getattr(args, f.name))}
    if diff:
        raise ValueError(f"cannot resume from {path}: arguments differ from the checkpoint's "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
                         + "; pass resume=False (--no-resume) to start over")
    now = _plain(cfg.to_dict())
    cdiff = {k: (state["config"].get(k), now.get(k)) for k in sorted(set(now) | set(state["config"]))
             if state["config"].get(k) != now.get(k)}
    if cdiff:
        raise ValueError(f"cannot resume from {path}: the model config differs from the checkpoint's "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in cdiff.items())
                         + "; pass resume=False (--no-resume) to start over")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: the stored model or optimizer state does not fit this model "
                              f"({type(e).__name__}: {e}); {_START_OVER}") from None
    _set_rng_state(state["rng"], device, path)
    return state["step"]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")


def export_model(model: SmallThinkerForCausalLM, folder: str | os.PathLike, dtype: str = "bfloat16",
                 tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """save_pretrained in the HF layout (weights in ``dtype``), plus the tokenizer files of ``tokenizer_dir``."""
    from ..model.checkpoint import save_pretrained

    folder = Path(folder)
    save_pretrained(model, folder, dtype=dtype)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
        if not files:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
        for f in files:
            if f.resolve() != (folder / f.name).resolve():
                shutil.copyfile(f, folder / f.name)
    return folder
