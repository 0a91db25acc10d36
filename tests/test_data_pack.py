"""Packed token parts: xz streams of at most 20 MB that give the .bin files back, read by the trainer as they are."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest

from smallthinker_lab.data import pack
from smallthinker_lab.train.data import WindowSampler, discover_domains, load_tokens, validation_sets


@pytest.fixture
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "tokens"
    d.mkdir()
    arrays = {}
    for name in ("math", "code"):
        # Zipf-like ids, as real text has: compressible, but not trivially
        a = np.minimum(rng.zipf(1.3, size=50_000), 8191).astype(np.uint16)
        a[::97] = 0
        arrays[f"{name}.bin"] = a
        arrays[f"{name}.val.bin"] = a[:3000].copy()
    for n, a in arrays.items():
        a.tofile(d / n)
    return d, arrays


def test_pack_roundtrip_and_the_trainer_reads_parts(tokens, tmp_path, monkeypatch):
    d, arrays = tokens
    monkeypatch.setattr(pack, "_CHUNK_TOKENS", 7_000)  # several parts per file
    out = tmp_path / "packed"
    man = pack.pack_tokens(d, out)
    assert set(man["files"]) == set(arrays)
    assert len(man["files"]["math.bin"]["parts"]) == 8  # ceil(50,000 / 7,000)
    assert 0 < man["compressed_bytes"] < man["raw_bytes"] == sum(a.nbytes for a in arrays.values())
    for name, a in arrays.items():
        got = load_tokens(out / name)  # no .bin there: the parts are decompressed
        assert got.dtype == np.uint16 and np.array_equal(got, a)
    assert discover_domains(out) == ["code", "math"]
    s_packed, s_bin = WindowSampler(out, 64, 8, seed=3), WindowSampler(d, 64, 8, seed=3)
    assert all(s_packed.batch(k).tokens.equal(s_bin.batch(k).tokens) for k in range(3))
    assert set(validation_sets(out, ["code", "math"], 64)) == {"code", "math"}
    restored = pack.unpack_tokens(out, tmp_path / "restored")
    assert all((tmp_path / "restored" / p.name).read_bytes() == (d / p.name).read_bytes() for p in restored)


def test_a_part_over_the_limit_is_split(tokens, tmp_path, monkeypatch):
    d, arrays = tokens
    monkeypatch.setattr(pack, "MAX_PART_BYTES", 20_000)
    man = pack.pack_tokens(d, tmp_path / "p")
    assert all(p["bytes"] <= 20_000 for e in man["files"].values() for p in e["parts"])
    assert np.array_equal(load_tokens(tmp_path / "p" / "math.bin"), arrays["math.bin"])


def test_damaged_parts_are_named(tokens, tmp_path):
    d, _ = tokens
    out = tmp_path / "packed"
    pack.pack_tokens(d, out)
    part = out / "math.bin.000.xz"
    part.write_bytes(part.read_bytes()[:-50])
    with pytest.raises(ValueError, match="math.bin.000.xz"):
        load_tokens(out / "math.bin")
    part.write_bytes(lzma.compress(b"abc", format=lzma.FORMAT_XZ))
    with pytest.raises(ValueError, match="odd number of bytes"):
        load_tokens(out / "math.bin")
    with pytest.raises(FileNotFoundError, match="packed parts"):
        load_tokens(out / "nothing.bin")
    man = json.loads((out / "manifest.json").read_text())
    (out / "math.bin.000.xz").write_bytes(lzma.compress(b"abcd", format=lzma.FORMAT_XZ))
    with pytest.raises(ValueError, match="sha256 differs"):
        pack.unpack_tokens(out, tmp_path / "r")
    assert man["max_part_bytes"] == pack.MAX_PART_BYTES == 20_000_000
