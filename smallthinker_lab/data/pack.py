"""Pack the token files into xz-compressed parts of at most 20 MB, to carry the corpus to another machine.

``pack_tokens("data/corpus/tokens", "data/corpus/packed")`` writes, for every ``{name}.bin`` (flat ``uint16``)::

    {name}.bin.000.xz, {name}.bin.001.xz, ...   # consecutive runs of the tokens, each a complete .xz stream
    manifest.json                                # per file: tokens, sha256 of the uint16 bytes, the parts

Each part holds whole tokens (an even number of bytes) and decompresses on its own; concatenating the
decompressed parts in order gives the ``.bin`` file byte for byte. The trainer reads a folder of packed parts
directly (``smallthinker_lab.train.data.load_tokens``), and :func:`unpack_tokens` restores the ``.bin`` files.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["MAX_PART_BYTES", "pack_tokens", "unpack_tokens"]

MAX_PART_BYTES = 20_000_000
_CHUNK_TOKENS = 12_000_000  # 24 MB of uint16 per part before xz; a stream over 20 MB is split in halves


def _compress(data: bytes, preset: int) -> list[bytes]:
    """xz streams of ``data``, halving the run until every stream is at most :data:`MAX_PART_BYTES`."""
    out = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)
    if len(out) <= MAX_PART_BYTES or len(data) <= 2:
        return [out]
    half = (len(data) // 4) * 2  # whole tokens on both sides
    return _compress(data[:half], preset) + _compress(data[half:], preset)


def pack_tokens(token_dir: str | Path, out_dir: str | Path, preset: int = 6) -> dict[str, Any]:
    """Write the xz parts and ``manifest.json`` for every ``*.bin`` in ``token_dir``; return the manifest."""
    token_dir, out_dir = Path(token_dir), Path(out_dir)
    bins = sorted(token_dir.glob("*.bin"))
    if not bins:
        raise FileNotFoundError(f"no .bin token files in {token_dir}: run `smallthinker-lab data tokenize` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.bin.*.xz"):
        old.unlink()
    man: dict[str, Any] = {"format": "uint16 little-endian token ids; parts are xz streams, decompress and "
                                     "concatenate in order", "max_part_bytes": MAX_PART_BYTES, "files": {}}
    total = 0
    for path in tqdm(bins, desc="pack", leave=False):
        raw = path.read_bytes()
        if len(raw) % 2:
            raise ValueError(f"{path} has an odd number of bytes: not a uint16 token file")
        parts = []
        step = 2 * _CHUNK_TOKENS
        for off in range(0, len(raw), step):
            parts += _compress(raw[off: off + step], preset)
        if not raw:
            parts = [lzma.compress(b"", format=lzma.FORMAT_XZ)]
        entry = {"tokens": len(raw) // 2, "sha256": hashlib.sha256(raw).hexdigest(), "parts": []}
        for k, blob in enumerate(parts):
            name = f"{path.name}.{k:03d}.xz"
            (out_dir / name).write_bytes(blob)
            entry["parts"].append({"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
            total += len(blob)
        man["files"][path.name] = entry
    man["compressed_bytes"] = total
    man["raw_bytes"] = sum(2 * e["tokens"] for e in man["files"].values())
    (out_dir / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


def unpack_tokens(packed_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Restore the ``.bin`` files of a packed folder (checked against the manifest's sha256); return them."""
    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    man = json.loads((packed_dir / "manifest.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entry in man["files"].items():
        data = b"".join(lzma.decompress((packed_dir / p["file"]).read_bytes()) for p in entry["parts"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"the parts of {name} in {packed_dir} do not give the packed file (sha256 differs)")
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written
