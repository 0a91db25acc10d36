"""The engine's errors about its expert bundle: a bundle that is missing, corrupt or of another format, and a failed
read of one expert record."""

from __future__ import annotations

# 3: the kernel formats and "packing" (2: per-expert "checksum" with the algorithm named in the index; 1: crc32 only)


class BundleError(RuntimeError):
    """An expert bundle that is missing, incomplete, corrupt or does not match its checkpoint."""


class ExpertReadError(BundleError):
    """Reading one expert failed (I/O error, short read or checksum mismatch); names the layer and expert."""

    def __init__(self, message: str, layer: int | None = None, expert: int | None = None) -> None:
        super().__init__(message)
        self.layer, self.expert = layer, expert
