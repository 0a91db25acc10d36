"""The expert bundle: layout and contents, conversion that never leaves a half-written bundle, validation errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import xxhash
from conftest import random_model

from smallthinker_lab.cli import main as cli_main
from smallthinker_lab.engine import bundle as bundle_mod
from smallthinker_lab.engine import conversion as conversion_mod
from smallthinker_lab.engine.bundle import (
    DATA_NAME,
    INDEX_NAME,
    PAGE,
    BundleError,
    ExpertReadError,
    open_bundle,
)
from smallthinker_lab.engine.conversion import convert, ensure_bundle
from smallthinker_lab.engine.quant import get_format
from smallthinker_lab.model.checkpoint import save_pretrained
from smallthinker_lab.model.config import SmallThinkerConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle") / "model"
    model = random_model()
    save_pretrained(model, folder)
    return folder, model


def _expert_weights(model, layer, expert):
    ex = model.model.layers[layer].block_sparse_moe.experts[expert]
    return {"gate": ex.gate.weight, "up": ex.up.weight, "down": ex.down.weight.t()}


def _read_matrix(b, layer, expert, name):
    spec = b.matrices[name]
    with open(b.data_path, "rb") as f:
        f.seek(b.offset(layer, expert) + spec.offset)
        return f.read(spec.nbytes)


def test_convert_layout_and_contents(ckpt, tmp_path):
    folder, model = ckpt
    out = convert(folder, tmp_path / "b", progress=False)
    b = open_bundle(out, model.config)
    cfg = model.config
    assert (b.num_layers, b.num_experts, b.format) == (cfg.num_hidden_layers, cfg.num_experts, "fp32")
    assert b.stride % PAGE == 0 and b.offsets.min() == PAGE and np.all(b.offsets % PAGE == 0)
    assert b.file_size == os.path.getsize(b.data_path) == PAGE + cfg.num_hidden_layers * cfg.num_experts * b.stride
    assert b.matrices["down"].shape == (cfg.moe_ffn_hidden_size, cfg.hidden_size)  # stored transposed
    idx = json.loads((out / INDEX_NAME).read_text())
    assert idx["matrices"]["down"]["transposed"] is True and idx["checksum"] == "xxh3_64"  # xxhash is a dependency
    fmt = get_format("fp32")
    for layer, expert in [(0, 0), (1, 5), (cfg.num_hidden_layers - 1, cfg.num_experts - 1)]:
        rec = idx["experts"][layer][expert]
        for name, w in _expert_weights(model, layer, expert).items():
            raw = _read_matrix(b, layer, expert, name)
            assert torch.equal(fmt.decode(raw, w.shape, torch.float32), w.detach())
            assert rec[name] == b.offset(layer, expert) + b.matrices[name].offset
        with open(b.data_path, "rb") as f:
            f.seek(b.offset(layer, expert))
            payload = f.read(b.payload_nbytes)
            assert xxhash.xxh3_64_intdigest(payload) == rec["checksum"] == int(b.checksums[layer, expert])
    assert sorted(p.name for p in out.iterdir()) == [DATA_NAME, INDEX_NAME]  # no temporary files left


def test_convert_keeps_down_in_the_model_layout_when_asked(ckpt, tmp_path):
    """down_transposed=False: down stored [H, F] as the model holds it (what exact=True reads without a transpose);
    the index and the opened bundle say so; quantised formats refuse it."""
    folder, model = ckpt
    b = open_bundle(convert(folder, tmp_path / "hf", progress=False, down_transposed=False), model.config)
    idx = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())
    assert b.down_transposed is False and idx["down_transposed"] is False
    assert idx["matrices"]["down"]["transposed"] is False
    H, F = model.config.hidden_size, model.config.moe_ffn_hidden_size
    assert b.matrices["down"].shape == (H, F) and b.matrices["gate"].shape == (F, H)
    fmt = get_format("fp32")
    ex = model.model.layers[1].block_sparse_moe.experts[4]
    for name, w in {"gate": ex.gate.weight, "up": ex.up.weight, "down": ex.down.weight}.items():  # down [H, F]
        assert torch.equal(fmt.decode(_read_matrix(b, 1, 4, name), w.shape, torch.float32), w.detach())
    assert open_bundle(convert(folder, tmp_path / "fh", progress=False), model.config).down_transposed is True
    for quantization in ("int8", "q4_0"):  # the GPU decode kernels' layout: down [H, F], quantized along F
        q = open_bundle(convert(folder, tmp_path / quantization, quantization, progress=False, down_transposed=False),
                        model.config)
        assert q.down_transposed is False and q.matrices["down"].shape == (H, F)
        assert _read_matrix(q, 1, 4, "down") == get_format(quantization).encode(ex.down.weight).numpy().tobytes()


@pytest.mark.parametrize("quantization", ["int8", "q4_0"])
def test_convert_quantised_matches_the_format(ckpt, tmp_path, quantization):
    folder, model = ckpt
    b = open_bundle(convert(folder, tmp_path / quantization, quantization, progress=False))
    fmt = get_format(quantization)
    assert b.format == quantization
    for name, w in _expert_weights(model, 2, 3).items():
        raw = _read_matrix(b, 2, 3, name)
        assert raw == bytes(fmt.encode(w.contiguous()).numpy())
    F, H = b.matrices["gate"].shape
    assert b.matrices["gate"].nbytes == (F * H * 18 // 32 if quantization == "q4_0" else F * 4 + F * H)


def test_interrupted_conversion_leaves_nothing_valid(ckpt, tmp_path, monkeypatch):
    folder, _ = ckpt
    out = tmp_path / "b"
    real = bundle_mod.get_format("fp32")
    calls = {"n": 0}

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, w):
            calls["n"] += 1
            if calls["n"] == 20:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way
            return real.encode(w)

    monkeypatch.setattr(conversion_mod, "get_format", lambda name: Failing() if name == "fp32" else real)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out, progress=False)
    assert list(out.iterdir()) == []  # no index, no data, no temporary file
    with pytest.raises(BundleError, match="experts.json is missing"):
        open_bundle(out)

    # over an existing bundle: the old one stays whole and valid
    monkeypatch.undo()
    old = open_bundle(convert(folder, out, progress=False))
    monkeypatch.setattr(conversion_mod, "get_format", lambda name: Failing() if name == "fp32" else real)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out, progress=False)
    assert open_bundle(out).bundle_id == old.bundle_id
    assert sorted(p.name for p in out.iterdir()) == [DATA_NAME, INDEX_NAME]


def test_open_rejects_bad_bundles(ckpt, tmp_path):
    folder, model = ckpt
    out = convert(folder, tmp_path / "b", progress=False)
    other = convert(folder, tmp_path / "c", progress=False)
    data = out / DATA_NAME
    # a config with another shape
    with pytest.raises(BundleError, match="the config needs"):
        open_bundle(out, model.config.replace(moe_num_primary_experts=16))
    # the data file of another conversion under this index
    swap = tmp_path / "swap"
    swap.mkdir()
    shutil.copyfile(out / INDEX_NAME, swap / INDEX_NAME)
    shutil.copyfile(other / DATA_NAME, swap / DATA_NAME)
    with pytest.raises(BundleError, match="does not belong"):
        open_bundle(swap)
    # another version
    idx = json.loads((out / INDEX_NAME).read_text())
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / INDEX_NAME).write_text(json.dumps({**idx, "version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        open_bundle(tmp_path / "v")
    # truncated, then missing data
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(BundleError, match=rf"truncated: {size - 1000} bytes, the index says {size}"):
        open_bundle(out)
    data.unlink()
    with pytest.raises(BundleError, match="data file .* is missing"):
        open_bundle(out)


def test_crc32_bundles_verify_and_a_missing_xxhash_is_named(ckpt, tmp_path, monkeypatch):
    """Without xxhash a conversion falls back to crc32 checksums, which read and catch corruption as XXH3 does; a
    bundle with XXH3 checksums opened without xxhash fails with an error that names the package."""
    from smallthinker_lab.engine.io import ExpertReader

    folder, model = ckpt
    fast = convert(folder, tmp_path / "x", progress=False)

    def no_xxhash():
        raise ImportError("No module named 'xxhash'")

    monkeypatch.setitem(bundle_mod.CHECKSUMS, "xxh3_64", no_xxhash)
    out = convert(folder, tmp_path / "b", progress=False)
    assert json.loads((out / INDEX_NAME).read_text())["checksum"] == "crc32"
    with pytest.raises(BundleError, match="needs the xxhash package"):
        open_bundle(fast)
    b = open_bundle(out, model.config)
    buf = bytearray(b.stride)
    reader = ExpertReader(b, threads=1)
    try:
        reader.read_into(1, 2, memoryview(buf))  # verifies
        with open(b.data_path, "r+b") as f:
            f.seek(b.offset(1, 2) + 10)
            byte = f.read(1)
            f.seek(b.offset(1, 2) + 10)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ExpertReadError, match="checksum mismatch in layer 1 expert 2 .*crc32"):
            reader.read_into(1, 2, memoryview(buf))
    finally:
        reader.close()


def test_ensure_bundle_converts_when_missing_or_stale(ckpt, tmp_path):
    folder, _ = ckpt
    out = tmp_path / "b"
    first = open_bundle(ensure_bundle(folder, out, None, progress=False)).bundle_id
    assert open_bundle(ensure_bundle(folder, out, None, progress=False)).bundle_id == first  # current: kept
    cfg_file = folder / "config.json"
    st = cfg_file.stat()
    os.utime(cfg_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed
    try:
        assert open_bundle(ensure_bundle(folder, out, None, progress=False)).bundle_id != first
    finally:
        os.utime(cfg_file, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cli_convert(ckpt, tmp_path, capsys):
    folder, _ = ckpt
    assert cli_main(["convert", str(folder), "--out", str(tmp_path / "q"), "--quantization", "q4_0",
                     "--no-progress"]) == 0
    assert "format q4_0" in capsys.readouterr().out
    assert open_bundle(tmp_path / "q", SmallThinkerConfig.from_json(folder)).format == "q4_0"
    assert cli_main(["convert", str(folder), "--out", str(tmp_path / "hf"), "--down-layout", "model",
                     "--no-progress"]) == 0
    assert open_bundle(tmp_path / "hf").down_transposed is False
