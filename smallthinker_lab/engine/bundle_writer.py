"""Writing an expert bundle record by record: what ``convert`` (engine/bundle.py) and the synthetic writer
(engine/synthetic.py) both write through, so a bundle has one byte layout whatever made its weights.

:class:`BundleWriter` takes the records in file order (layer-major, expert by expert), each as its three matrices
in the model's orientation (gate, up [F, H], down [H, F]) on any device, encodes them in the bundle's format,
checksums each record's payload and appends it to ``.experts.bin.tmp-PID-TOKEN`` (created exclusively, never through
a symbolic link); :meth:`BundleWriter.finish` writes the index to its own temporary, removes any previous index and
renames data and index into place, so an interrupted write leaves no index (and a bundle without an index is not a
bundle). One record is in memory at a time.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from .bundle import (
    CHECKSUMS,
    DATA_NAME,
    INDEX_NAME,
    MATRICES,
    PAGE,
    BundleError,
    _header_bytes,
    _index_dict,
    default_checksum,
    down_transposed_for,
    packing,
    record_layout,
)
from .files import _LIVE_LOCK, _LIVE_TEMPS, _create_exclusive, _fsync_dir, remove_stale_temporaries
from .quant import get_format


class BundleWriter:
    """One bundle being written into ``out`` (a folder, created if needed). Use as a context manager: leaving it
    with an exception removes the temporaries; :meth:`finish` (inside the block) publishes the bundle."""

    def __init__(self, out: str | os.PathLike, num_layers: int, num_experts: int, hidden: int, ffn: int, fmt: str,
                 down_transposed: bool = True, progress: bool = False, desc: str | None = None,
                 codec=None) -> None:
        self.out = Path(out)
        self.L, self.E, self.H, self.F = num_layers, num_experts, hidden, ffn
        self.fmt = fmt
        self.codec = codec if codec is not None else get_format(fmt)  # the format's encoder (:mod:`.quant`)
        self.down_transposed = down_transposed_for(fmt, down_transposed)
        self.specs, self.payload, self.stride = record_layout(hidden, ffn, fmt, self.down_transposed)
        self.header = {"format": fmt, "num_layers": num_layers, "num_experts": num_experts, "hidden_size": hidden,
                       "ffn_size": ffn, "stride": self.stride, "payload_nbytes": self.payload,
                       "down_transposed": bool(self.down_transposed), "packing": packing(fmt)}
        self.bundle_id = uuid.uuid4().hex
        self.algo = default_checksum()
        self._digest = CHECKSUMS[self.algo]()
        self.offsets = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.sums = np.zeros((num_layers, num_experts), dtype=np.uint64)
        self._next = 0  # records written
        self._pos = PAGE
        self._progress, self._desc = progress, desc or f"writing experts ({fmt})"
        self._bar = self._file = None
        self._created: list[Path] = []
        tag = f".tmp-{os.getpid()}-{self.bundle_id[:8]}"
        self.tmp_data, self.tmp_index = self.out / f".{DATA_NAME}{tag}", self.out / f".{INDEX_NAME}{tag}"

    @property
    def file_size(self) -> int:
        """Bytes of the finished data file (header page + every record)."""
        return PAGE + self.L * self.E * self.stride

    def __enter__(self) -> BundleWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)  # a killed write's (as large as the bundle)
        with _LIVE_LOCK:
            _LIVE_TEMPS.update((str(self.tmp_data), str(self.tmp_index)))
        try:
            self._file = _create_exclusive(self.tmp_data, self._created)
            self._file.write(_header_bytes(self.bundle_id, self.header))
        except BaseException:
            self._cleanup()
            raise
        if self._progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.L * self.E, desc=self._desc, unit="expert", leave=False)
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None and not self._file.closed:
            self._file.close()
        for tmp in self._created:
            tmp.unlink(missing_ok=True)  # after finish's renames: nothing there
        with _LIVE_LOCK:
            _LIVE_TEMPS.difference_update((str(self.tmp_data), str(self.tmp_index)))

    def encode(self, layer: int, expert: int, matrices: dict[str, torch.Tensor], where: str = "") -> np.ndarray:
        """One whole record (``stride`` bytes, zero padded) of the three matrices (down transposed here when the
        bundle stores it [F, H]); each tensor's shape is checked. Assembled on the tensors' device, then copied to
        host memory in one piece."""
        dev = matrices[MATRICES[0]].device
        record = torch.zeros(self.stride, dtype=torch.uint8, device=dev)  # gaps between matrices stay zero
        for m in MATRICES:
            w = matrices[m]
            if m == "down" and self.down_transposed:
                w = w.t()  # [H, F] -> [F, H]
            s = self.specs[m]
            if tuple(w.shape) != s.shape:
                want = [self.F, self.H] if m != "down" else [self.H, self.F]
                raise BundleError(f"{where or f'layer {layer} expert {expert}'}: {m} has shape "
                                  f"{list(matrices[m].shape)}, expected {want}")
            enc = self.codec.encode(w.contiguous()).reshape(-1).view(torch.uint8)  # flat uint8 (every format's)
            if enc.numel() != s.nbytes:
                raise BundleError(f"layer {layer} expert {expert} {m}: encoded to {enc.numel()} bytes, expected "
                                  f"{s.nbytes}")
            record[s.offset:s.offset + s.nbytes] = enc.to(dev)
        return record.cpu().numpy()

    def add(self, layer: int, expert: int, matrices: dict[str, torch.Tensor], where: str = "") -> None:
        """Append record (layer, expert): the next one in file order."""
        self.add_encoded(layer, expert, self.encode(layer, expert, matrices, where))

    def add_encoded(self, layer: int, expert: int, record: np.ndarray) -> None:
        """Append a record made by :meth:`encode` (checksummed here; the checksum and the write release the GIL,
        so writer threads run beside the thread that encodes)."""
        if self._file is None:
            raise RuntimeError("BundleWriter.add outside its with block")
        if (layer, expert) != divmod(self._next, self.E) or self._next >= self.L * self.E:
            raise BundleError(f"record ({layer}, {expert}) out of order: the next is "
                              f"{divmod(self._next, self.E)} of {self.L} x {self.E}")
        if record.dtype != np.uint8 or record.nbytes != self.stride or not record.flags.c_contiguous:
            raise BundleError(f"record ({layer}, {expert}): {record.nbytes} bytes of {record.dtype}, expected "
                              f"{self.stride} contiguous uint8")
        view = memoryview(record).cast("B")
        self.sums[layer, expert] = self._digest(view[:self.payload])
        self.offsets[layer, expert] = self._pos
        self._file.write(view)
        self._pos += self.stride
        self._next += 1
        if self._bar is not None:
            self._bar.update(1)

    def finish(self, source: dict) -> Path:
        """Publish the bundle (every record written): data fsynced, index written, both renamed into place."""
        if self._next != self.L * self.E:
            raise BundleError(f"{self.out}: {self._next} of {self.L * self.E} records written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = _index_dict(self.bundle_id, self.header, self.specs, self.offsets, self.sums, self.algo, self._pos,
                            source)
        with _create_exclusive(self.tmp_index, self._created, "w") as f:
            f.write(json.dumps(index, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        (self.out / INDEX_NAME).unlink(missing_ok=True)  # from here until the last rename there is no valid bundle
        os.replace(self.tmp_data, self.out / DATA_NAME)  # rename replaces a link of that name, never writes through it
        os.replace(self.tmp_index, self.out / INDEX_NAME)
        _fsync_dir(self.out)
        return self.out
