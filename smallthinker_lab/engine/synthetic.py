"""A synthetic model written straight into the engine's form, for shapes whose full checkpoint and bundle do not
fit on one disk together (the 21B: 42 GB of bf16 weights, plus as much again for its bundle).

The folder holds config.json and the NON-expert tensors only (``model.safetensors``), and one expert bundle per
requested format, written expert by expert from the same seeded generators as
:func:`~smallthinker_lab.model.checkpoint.write_synthetic_checkpoint` (one per layer, expert and matrix, seeded by
the seed and the tensor's name): bf16 as drawn, int8 / q4_0 quantised on the fly from those same bf16 values, each
through :class:`.bundle_writer.BundleWriter`, the writer ``convert`` uses, so on the CPU a bundle is byte for byte
what writing the full checkpoint and converting it gives (tests/test_synthetic_bundle.py). A CUDA generator draws
other values than the CPU's (torch's Philox stream, which may differ between GPU models and torch versions); the
folder's marker (:data:`.bundle.BUNDLE_ONLY_FILE`) says where they were drawn. Memory stays bounded: one layer
being drawn and encoded, at most one more queued for the writer threads (one per bundle: checksum and write). A
preflight check refuses to start when the file system lacks the bytes the folder needs.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..model.checkpoint import expected_tensors, synthetic_tensor, write_synthetic_checkpoint
from ..model.config import SmallThinkerConfig
from .bundle import BUNDLE_ONLY_FILE, INDEX_NAME, MATRICES, PAGE, is_expert_tensor, record_layout, source_fingerprint
from .bundle_writer import BundleWriter

_EXPERT_SHAPE = {"gate": lambda c: (c.moe_ffn_hidden_size, c.hidden_size),
                 "up": lambda c: (c.moe_ffn_hidden_size, c.hidden_size),
                 "down": lambda c: (c.hidden_size, c.moe_ffn_hidden_size)}
_FORMAT_OF = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class DiskSpaceError(OSError):
    """Too few free bytes on the file system for what is about to be written; names both numbers."""


def bundle_name(quantization: str | None, down_transposed: bool) -> str:
    """The bundle folder's name inside the model folder (as ``default_bundle_dir`` names it)."""
    return "expert_bundle" + (f"-{quantization}" if quantization else "") + ("" if down_transposed else "-down_hf")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Where values are drawn: "auto" is CUDA when torch sees a GPU, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)


def _dtype(dtype) -> torch.dtype:
    t = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
    if t not in _FORMAT_OF:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return t


def planned_bytes(config: SmallThinkerConfig, dtype, bundles: Sequence[tuple[str | None, bool]]) -> dict:
    """Bytes the folder will take: the non-expert tensors, and per bundle its data file (the indexes, some
    hundred KB, are counted at 1 KB per expert)."""
    t = _dtype(dtype)
    shapes = expected_tensors(config)
    non_expert = sum(math.prod(s) for n, s in shapes.items() if not is_expert_tensor(n)) * t.itemsize
    n = config.num_hidden_layers * config.num_experts
    out = {}
    for q, dt in bundles:
        fmt = q or _FORMAT_OF[t]
        _, _, stride = record_layout(config.hidden_size, config.moe_ffn_hidden_size, fmt, dt)
        out[bundle_name(q, dt)] = PAGE + n * stride + 1024 * n
    return {"non_expert": non_expert, "bundles": out, "total": non_expert + (1 << 20) + sum(out.values())}


def check_disk(folder: str | os.PathLike, needed: int) -> dict:
    """Raise :class:`DiskSpaceError` unless the file system of ``folder`` (or its nearest existing parent) has
    ``needed`` bytes free; returns what it saw."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if needed > free:
        raise DiskSpaceError(f"{folder}: the synthetic model needs {needed} bytes ({needed / 2**30:.1f} GiB) on the "
                             f"file system of {p}, which has {free} bytes ({free / 2**30:.1f} GiB) free: free space, "
                             f"choose another folder, or write fewer formats or layers")
    return {"needed": needed, "free": free, "checked_at": str(p)}


class _Sink(threading.Thread):
    """A writer thread: checksums and appends the records handed to it in order (a bounded queue)."""

    def __init__(self, writer: BundleWriter, depth: int) -> None:
        super().__init__(daemon=True, name=f"bundle-sink-{writer.fmt}")
        self.writer, self.q, self.error = writer, queue.Queue(maxsize=depth), None
        self.busy = 0.0  # seconds in checksum + write

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                t0 = time.perf_counter()
                try:
                    self.writer.add_encoded(*item)
                except BaseException as e:  # noqa: BLE001  raised in the producer's thread
                    self.error = e
                self.busy += time.perf_counter() - t0

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def write_synthetic_bundles(folder: str | os.PathLike, config: SmallThinkerConfig, seed: int = 0,
                            dtype=torch.bfloat16, bundles: Sequence[tuple[str | None, bool]] = ((None, True),),
                            device: str | torch.device = "auto", progress: bool = True,
                            log: Callable[[str], None] | None = None) -> dict:
    """Write the expert bundles of a synthetic model into ``folder``, which already holds its config and
    non-expert tensors (their fingerprint goes into each index, as ``convert`` records it).

    ``bundles``: (quantization, down_transposed) per bundle; quantization None is ``dtype`` as drawn, else a
    format of :mod:`.quant` ("q4_0", "int8", ...) quantised from those values. ``device``: where values are drawn
    and encoded ("auto": CUDA when available). Returns timings and byte counts; the marker file naming the bundles
    is written last."""
    folder = Path(folder)
    t = _dtype(dtype)
    dev = resolve_device(device)
    L, E, H, F = config.num_hidden_layers, config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
    if len({bundle_name(q, dt) for q, dt in bundles}) != len(bundles) or not bundles:
        raise ValueError(f"bundles must be distinct (quantization, down_transposed) pairs, got {list(bundles)}")
    source = source_fingerprint(folder)
    std = config.initializer_range
    writers = [BundleWriter(folder / bundle_name(q, dt), L, E, H, F, q or _FORMAT_OF[t], dt,
                            progress=progress and i == 0, desc=f"synthetic experts ({dev.type})")
               for i, (q, dt) in enumerate(bundles)]
    workers = 1 if dev.type == "cuda" else max(1, min(8, os.cpu_count() or 1))

    def record(layer: int, e: int) -> list:  # per writer, the encoded record (stride bytes)
        mats = {m: synthetic_tensor(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{m}.weight",
                                    _EXPERT_SHAPE[m](config), seed, std, t, dev) for m in MATRICES}
        return [w.encode(layer, e, mats) for w in writers]

    t0 = time.perf_counter()
    gen = 0.0
    entered, sinks = [], []
    try:
        for w in writers:
            entered.append(w.__enter__())
        sinks = [_Sink(w, E) for w in writers]
        for s in sinks:
            s.start()
        with ThreadPoolExecutor(workers) as pool:
            for layer in range(L):
                g0 = time.perf_counter()
                recs = list(pool.map(lambda e, layer=layer: record(layer, e), range(E)))
                gen += time.perf_counter() - g0
                for e, per_writer in enumerate(recs):
                    for s, enc in zip(sinks, per_writer):
                        s.put((layer, e, enc))
                del recs
                if log is not None and (layer + 1) % max(1, L // 8) == 0:
                    done = (layer + 1) * E * sum(w.stride for w in writers)
                    log(f"  synthetic experts: {layer + 1}/{L} layers, {done / 2**30:.1f} GiB handed to the writers, "
                        f"{done / (time.perf_counter() - t0) / 1e9:.2f} GB/s so far")
        for s in sinks:
            s.close()
        written = time.perf_counter() - t0
        f0 = time.perf_counter()
        for w in writers:
            w.finish(source)  # fsync: what the page cache still held reaches the disk
        fsync = time.perf_counter() - f0
    finally:
        for s in sinks:
            if s.is_alive():  # an error in this thread: the sink drains what is queued, then stops
                s.q.put(None)
                s.join()
        for w in entered:
            w.__exit__(None, None, None)
    total = sum(w.file_size for w in writers)
    seconds = time.perf_counter() - t0
    marker = {"bundles": {bundle_name(q, dt): {"format": w.fmt, "down_transposed": w.down_transposed,
                                               "file_size": w.file_size}
                          for (q, dt), w in zip(bundles, writers)},
              "seed": seed, "dtype": str(t).removeprefix("torch."), "drawn_on": dev.type,
              "writer": "smallthinker_lab.engine.synthetic"}
    tmp = folder / f".{BUNDLE_ONLY_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / BUNDLE_ONLY_FILE)
    return {"bytes": total, "seconds": seconds, "generate_encode_seconds": gen, "write_seconds": written,
            "fsync_seconds": fsync, "sink_busy_seconds": [s.busy for s in sinks], "rate_bytes_per_s": total / seconds,
            "device": dev.type, "bundles": marker["bundles"]}


def write_synthetic_engine_folder(folder: str | os.PathLike, config: SmallThinkerConfig, seed: int = 0,
                                  dtype=torch.bfloat16, bundles: Sequence[tuple[str | None, bool]] = ((None, True),),
                                  device: str | torch.device = "auto", progress: bool = True,
                                  after_non_experts: Callable[[Path], None] | None = None,
                                  log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """The whole folder: preflight disk check, config + non-expert tensors, ``after_non_experts(folder)`` (e.g.
    rescaling tensors in place, before the bundles record the files' fingerprint), then the bundles
    (:func:`write_synthetic_bundles`). ``Engine.from_pretrained(folder, ...)`` opens it. A folder already there is
    replaced. Returns (folder, what was written and how fast)."""
    folder = Path(folder)
    t = _dtype(dtype)
    plan = planned_bytes(config, t, bundles)
    if folder.exists():
        if (folder / "config.json").is_file() or (folder / BUNDLE_ONLY_FILE).is_file() or not any(folder.iterdir()):
            shutil.rmtree(folder)
        else:
            raise FileExistsError(f"{folder} exists and is not a model folder: refusing to replace it")
    disk = check_disk(folder, plan["total"])
    t0 = time.perf_counter()
    write_synthetic_checkpoint(folder, config, seed=seed, dtype=t, experts=False, device=resolve_device(device))
    if after_non_experts is not None:
        after_non_experts(folder)
    non_expert_s = time.perf_counter() - t0
    info = write_synthetic_bundles(folder, config, seed, t, bundles, device, progress, log)
    if not all((folder / n / INDEX_NAME).is_file() for n in info["bundles"]):
        raise RuntimeError(f"{folder}: a bundle index is missing after the write")
    return folder, info | {"disk": disk, "planned_bytes": plan, "non_expert_seconds": non_expert_s,
                           "non_expert_bytes": plan["non_expert"]}
