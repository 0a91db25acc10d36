"""Naive offloading baselines: the usual way people offload a model in PyTorch, with accelerate's hooks on the same
in-memory model (``load_model``) that the engine is checked against.

* ``accelerate_disk_offload`` (CPU): ``accelerate.disk_offload(model, offload_dir, execution_device="cpu")``. It
  writes every weight to its own ``.dat`` file and keeps NOTHING resident but buffers (rotary frequencies) and
  the KV cache: each module's weights are read from their file when the module runs (the whole embedding table
  for one row, every expert matrix the router selects, the attention and the LM head), every token. The OS page
  cache would turn those reads into memory copies, so the files read during a token are dropped from it
  (``posix_fadvise(DONTNEED)``) before the next one; the time that takes is measured and taken out of the token
  times (it favours the baseline).
* ``accelerate_device_map`` (CPU): the same memory limit as the engine row it is compared with:
  ``infer_auto_device_map(model, max_memory={"cpu": limit - KV cache})`` keeps the first modules in model order
  resident and ``dispatch_model(..., offload_dir=...)`` offloads the rest to disk (read per use, page cache dropped
  as above). No expert cache: what is resident is decided once, by position in the model.
* ``accelerate_cpu_offload`` (CUDA): ``accelerate.cpu_offload(model, execution_device="cuda")``: every weight stays
  in host memory and is copied to the GPU when its module runs, every token; nothing but buffers and the KV cache
  is resident on the GPU.

Every row counts the bytes the hooks load per token (parameters of the offloaded modules that ran) as its link
bytes: from storage (disk offload) or host-to-GPU (cpu offload).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import torch

from smallthinker_lab.model.checkpoint import load_model
from smallthinker_lab.model.generate import GenerationStats, stream_tokens
from smallthinker_lab.model.kv_cache import KVCache, kv_cache_bytes

MODES = ("accelerate_disk_offload", "accelerate_device_map", "accelerate_cpu_offload")


def open_baseline(mode: str, info, device: str, scratch: Path, limit: int | None, threads: int | None = None):
    if mode not in MODES:
        raise ValueError(f"unknown baseline {mode!r}; known: {', '.join(MODES)}")
    return AccelerateRunner(mode, info, device, Path(scratch), limit, threads)


class AccelerateRunner:
    kind = "baseline"

    def __init__(self, mode: str, info, device: str, scratch: Path, limit: int | None, threads: int | None) -> None:
        import accelerate

        self.mode, self.info, self.device, self.threads = mode, info, torch.device(device), threads
        model = load_model(info.ckpt)  # CPU, memory-mapped; accelerate moves / offloads from here
        cfg = info.config
        self.offload_dir = None
        self.files_touched: set[str] = set()
        self._fds: dict[str, int] = {}
        expert_params = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if ".experts." in n)
        if mode == "accelerate_cpu_offload":
            accelerate.cpu_offload(model, execution_device=self.device)
            self.link = "h2d" if self.device.type == "cuda" else "memory"
            self.resident = ("on the GPU nothing but buffers and the KV cache: every weight stays in host memory "
                             "(the memory-mapped checkpoint) and is copied to the GPU when its module runs "
                             "(accelerate.cpu_offload)")
            self.expert_share = 0.0
            self.offloaded = {name: _own_bytes(m) for name, m in model.named_modules() if _own_bytes(m)}
        else:
            self.offload_dir = scratch / f"accelerate_{mode.split('_', 1)[1]}_{info.key}"
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            t0 = time.perf_counter()
            if mode == "accelerate_disk_offload":
                sizes = {name: _own_bytes(m) for name, m in model.named_modules() if _own_bytes(m)}
                accelerate.disk_offload(model, self.offload_dir, execution_device=self.device)
                self.offloaded = sizes
                self.resident = ("nothing but buffers (rotary) and the KV cache: every weight is read from its "
                                 "offload file when its module runs (accelerate.disk_offload)")
                self.expert_share = 0.0
            else:
                if limit is None:
                    raise ValueError("accelerate_device_map needs a memory limit")
                kv = kv_cache_bytes(cfg, min(2048, cfg.max_position_embeddings), info.dtype)
                budget = max(0, limit - kv)
                device_map = accelerate.infer_auto_device_map(model, max_memory={"cpu": budget})
                on_disk = [k for k, v in device_map.items() if v == "disk"]
                self.offloaded = {}
                for name, m in model.named_modules():
                    b = _own_bytes(m)
                    if b and any(name == k or name.startswith(k + ".") for k in on_disk):
                        self.offloaded[name] = b
                kept = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if not any(n.startswith(k + ".") for k in on_disk))
                kept_experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                   if ".experts." in n and not any(n.startswith(k + ".") for k in on_disk))
                self.expert_share = kept_experts / expert_params if expert_params else 0.0
                model = accelerate.dispatch_model(model, device_map, main_device=self.device,
                                                  offload_dir=str(self.offload_dir))
                self.resident = (f"the first modules in model order up to max_memory={{'cpu': {budget}}} "
                                 f"({kept / 2**20:.0f} MiB of weights, {self.expert_share:.0%} of the expert "
                                 f"bytes), the rest read from offload files per use "
                                 f"(accelerate.infer_auto_device_map + dispatch_model)")
            self.offload_seconds = time.perf_counter() - t0
            self.link = "storage"
        self.model = model
        self.config = cfg
        self.link_bytes = 0
        self._hooks = []
        for name, m in model.named_modules():
            if name in self.offloaded:
                self._hooks.append(m.register_forward_pre_hook(self._counter(name)))

    def _counter(self, name: str):
        nbytes = self.offloaded[name]

        def hook(module, args):
            self.link_bytes += nbytes
            if self.offload_dir is not None:
                self.files_touched.add(name)

        return hook

    def _drop_page_cache(self) -> float:
        """posix_fadvise(DONTNEED) on the offload files read since the last call; returns the seconds taken."""
        if self.offload_dir is None or not self.files_touched:
            return 0.0
        t0 = time.perf_counter()
        for name in self.files_touched:
            for f in _module_files(self.offload_dir, name):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        self.files_touched.clear()
        return time.perf_counter() - t0

    def _drop_all(self) -> None:
        if self.offload_dir is None:
            return
        for f in self.offload_dir.glob("*.dat"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def generate(self, ids: list[int], n: int) -> dict:
        cfg, dev = self.config, self.device
        cache = KVCache(cfg, 1, self.info.dtype, dev)
        drops: list[float] = []
        link: list[int] = []
        model = self.model

        def step(x):
            drops.append(self._drop_page_cache())
            before = self.link_bytes
            out = model(x, cache=cache).logits
            link.append(self.link_bytes - before)
            return out

        self._drop_all()
        stats = GenerationStats()
        saved = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                tokens = list(stream_tokens(step, torch.tensor([ids], device=dev), n, None, [], stats))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
        finally:
            torch.set_num_threads(saved)
        # the page-cache drops are the benchmark's doing, not the baseline's: out of the timings
        stats.prefill_seconds -= drops[0]
        for i in range(len(stats.decode_token_seconds)):
            stats.decode_token_seconds[i] -= drops[i + 1]
        stats.decode_seconds = sum(stats.decode_token_seconds)
        return {"tokens": tokens, "stats": stats, "link_bytes_decode": sum(link[1:]),
                "drop_seconds": sum(drops)}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.model = None
        gc.collect()
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)


def _own_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def _module_files(folder: Path, module: str) -> list[Path]:
    """The offload files of a module's own parameters (accelerate names them ``{param}.dat``)."""
    return [p for p in (folder / f"{module}.weight.dat", folder / f"{module}.bias.dat") if p.exists()]
