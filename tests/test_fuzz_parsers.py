"""Fuzzing the parsers of untrusted files: the safetensors header (read_header), the checkpoint's index
(model.safetensors.index.json) and the expert bundle's index (experts.json).

Every random mutation (bytes flipped, digits changed, the file truncated, JSON values replaced by values of random
types, keys removed) gives the parser's own error type (CheckpointError, BundleError) or loads; never another
exception, a hang (each example has a deadline) or a crash. A safetensors header read_header accepts must also be one
the safetensors library opens, with the same tensors: read_header is the gate that keeps raw SafetensorErrors from
the user. Bounded to a few seconds (max_examples) for CI."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from smallthinker_lab import CheckpointError, SmallThinkerConfig
from smallthinker_lab.engine import BundleError, convert
from smallthinker_lab.engine import bundle as bundle_mod
from smallthinker_lab.engine.bundle import INDEX_NAME, open_bundle
from smallthinker_lab.model import checkpoint as ckpt
from smallthinker_lab.model import write_synthetic_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# FUZZ_EXAMPLES=5000 for a deeper run than CI's
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every type, nested a little; floats include NaN and infinities (json.dumps writes NaN, Infinity)
LEAVES = (st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | st.floats()
          | st.text(max_size=12) | st.sampled_from([0, 1, -1, 2**63, 2**64, 2**70, "F32", "BF16", "I32", "", "0",
                                                    "x" * 5000, "../x", "/etc/passwd", ".", "..", "a/b", "\0",
                                                    "model-00001-of-00012.safetensors", "fp32", "q4_0", "crc32"]))
VALUES = st.recursive(LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def mutate_json(data, obj):
    """Replace one value at a random path of ``obj`` (in place, or the whole document), or remove a key."""
    node, path = obj, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append((node, key))
        node = node[key]
    if not path:
        return data.draw(VALUES)
    parent, key = path[-1]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = data.draw(VALUES)
    return obj


def mutate_bytes(data, raw: bytes, start: int = 0) -> bytes:
    """Flip bytes, change digits (valid JSON with other numbers) or truncate; positions from ``start`` on mostly."""
    raw = bytearray(raw)
    kind = data.draw(st.sampled_from(["flip", "digits", "truncate"]))
    if kind == "truncate":
        return bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    if kind == "digits":
        digits = [i for i in range(start, len(raw)) if 48 <= raw[i] <= 57]
        for i in data.draw(st.lists(st.sampled_from(digits), min_size=1, max_size=4)):
            raw[i] = data.draw(st.sampled_from(b"0123456789"))
        return bytes(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1) if data.draw(st.booleans()) else st.integers(start, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    return bytes(raw)


# ---------------------------------------------------------------- safetensors headers
@pytest.fixture(scope="module")
def st_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    save_file({"a.weight": torch.randn(3, 5), "b.bias": torch.zeros(7, dtype=torch.bfloat16),
               "c.empty": torch.zeros(0, 4), "d.scalar": torch.tensor(1.5),
               "e.ids": torch.arange(6, dtype=torch.int32)}, path, metadata={"format": "pt"})
    return path.read_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def check_header(path: Path) -> None:
    """read_header raises CheckpointError or accepts; what it accepts, safe_open reads with the same tensors."""
    try:
        infos = ckpt.read_header(path)
    except CheckpointError:
        return
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(infos)
        for name, info in infos.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape


@FUZZ
@given(data=st.data())
def test_safetensors_header_bytes(st_file, tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutate_bytes(data, st_file, start=8))
    check_header(path)


@FUZZ
@given(data=st.data())
def test_safetensors_header_json_values(st_file, tmp_path, data):
    header, body = _split(st_file)
    header = mutate_json(data, header)
    blob = json.dumps(header).encode()  # NaN / Infinity may appear: JSON to Python, not to safetensors
    n = len(blob) if data.draw(st.integers(0, 9)) else data.draw(st.integers(0, 2**64 - 1))  # or a lying length
    if data.draw(st.booleans()):
        body = body[:data.draw(st.integers(0, len(body)))] if data.draw(st.booleans()) else body + bytes(8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", n) + blob + body)
    check_header(path)


# ---------------------------------------------------------------- the checkpoint's index
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    cfg = SmallThinkerConfig.from_name("smallthinker-test")
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("fuzz") / "sharded", cfg, dtype=torch.float32,
                                      max_shard_size="100KB")


@FUZZ
@given(data=st.data())
def test_checkpoint_index(sharded, data):
    index = sharded / ckpt.INDEX_FILE
    original = index.read_bytes()
    try:
        if data.draw(st.booleans()):
            text = json.dumps(mutate_json(data, json.loads(original))).encode()
        else:
            text = mutate_bytes(data, original)
        index.write_bytes(text)
        try:
            checked = ckpt.read_checkpoint(sharded)
        except CheckpointError:
            return
        assert all(info.file.parent == sharded for info in checked.stored.values())
    finally:
        index.write_bytes(original)


# ---------------------------------------------------------------- the bundle's index
@pytest.fixture(scope="module")
def bundle_dir(sharded, tmp_path_factory) -> Path:
    out = convert(sharded, tmp_path_factory.mktemp("fuzz") / "bundle", progress=False)
    return out


@FUZZ
@given(data=st.data())
def test_bundle_index(bundle_dir, data):
    index = bundle_dir / INDEX_NAME
    original = index.read_bytes()
    try:
        if data.draw(st.booleans()):
            text = json.dumps(mutate_json(data, json.loads(original))).encode()
        else:
            text = mutate_bytes(data, original)
        index.write_bytes(text)
        summary = bundle_mod._index_summary(bundle_dir)  # what ensure_bundle reads to decide on a conversion
        assert summary is None or isinstance(summary, dict)
        try:
            b = open_bundle(bundle_dir)
        except BundleError:
            return
        # what loads is consistent: every record inside the file, on a page boundary
        assert b.offsets.min() >= bundle_mod.PAGE and b.offsets.max() + b.stride <= b.file_size
        assert not (b.offsets % bundle_mod.PAGE).any() and b.data_path.stat().st_size == b.file_size
    finally:
        index.write_bytes(original)


def test_the_fuzzed_files_are_intact_afterwards(sharded, bundle_dir, tmp_path):
    """The fuzz tests restore what they mutate: the checkpoint and its bundle still load (also a check that the
    unmutated files are accepted, so the fuzz tests do not pass by refusing everything)."""
    ckpt.read_checkpoint(sharded)
    open_bundle(bundle_dir, SmallThinkerConfig.from_name("smallthinker-test"))
    shutil.copytree(bundle_dir, tmp_path / "copy")
    open_bundle(tmp_path / "copy")
