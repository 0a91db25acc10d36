"""A synthetic model written straight into the engine's form (engine/synthetic.py): the same bytes as writing the
full synthetic checkpoint and converting it, an engine that opens it, and the errors for what is missing."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from smallthinker_lab.engine import Engine
from smallthinker_lab.engine.bundle import BUNDLE_ONLY_FILE, DATA_NAME, INDEX_NAME, BundleError
from smallthinker_lab.engine.conversion import convert
from smallthinker_lab.engine.synthetic import (
    DiskSpaceError,
    bundle_name,
    check_disk,
    planned_bytes,
    write_synthetic_engine_folder,
)
from smallthinker_lab.model.checkpoint import load_model, write_synthetic_checkpoint
from smallthinker_lab.model.config import SmallThinkerConfig

SEED = 7
# the checkpoint precision with down in both layouts, and both quantised formats (q4_0 in the decode kernels' layout)
BUNDLES = ((None, True), (None, False), ("q4_0", False), ("int8", True))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cfg = SmallThinkerConfig.from_name("smallthinker-test")
    full = write_synthetic_checkpoint(root / "full", cfg, seed=SEED)
    converted = {b: convert(full, root / "converted" / bundle_name(*b), b[0], progress=False, down_transposed=b[1])
                 for b in BUNDLES}
    direct, info = write_synthetic_engine_folder(root / "direct", cfg, seed=SEED, bundles=BUNDLES, device="cpu",
                                                 progress=False)
    return cfg, full, converted, direct, info


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def test_non_expert_tensors_equal_the_full_checkpoints(folders):
    cfg, full, _, direct, _ = folders
    mine, theirs = _tensors(direct / "model.safetensors"), _tensors(full / "model.safetensors")
    assert not any(".experts." in n for n in mine)
    assert set(mine) == {n for n in theirs if ".experts." not in n}
    for n, t in mine.items():
        assert t.dtype == theirs[n].dtype and torch.equal(t.view(torch.uint8), theirs[n].view(torch.uint8)), n
    assert json.loads((direct / "config.json").read_text()) == json.loads((full / "config.json").read_text())


@pytest.mark.parametrize("spec", BUNDLES, ids=lambda b: bundle_name(*b))
def test_bundle_bytes_equal_convert(folders, spec):
    """Every byte of the data file but the 16-byte bundle id, and the index but the id and the source files'
    fingerprint, equal what convert writes from the full checkpoint."""
    _, _, converted, direct, _ = folders
    mine, theirs = direct / bundle_name(*spec), converted[spec]
    a, b = (mine / DATA_NAME).read_bytes(), (theirs / DATA_NAME).read_bytes()
    assert len(a) == len(b) and a[:12] == b[:12] and a[28:] == b[28:]
    ia, ib = (json.loads((d / INDEX_NAME).read_text()) for d in (mine, theirs))
    assert ia["bundle_id"] != ib["bundle_id"]
    for d in (ia, ib):
        d.pop("bundle_id"), d.pop("source")
    assert ia == ib


def test_engine_opens_the_folder_and_gives_the_full_models_tokens(folders):
    cfg, full, _, direct, _ = folders
    prompt = [5, 17, 99, 3, 42]
    want = list(load_model(full).generate(prompt, 8, stop_tokens=[]).tokens)
    got = {}
    for limit in (None, "30%"):
        with Engine.from_pretrained(direct, memory_limit=limit, device="cpu", progress=False, exact=True) as e:
            assert e.bundle_dir == direct / bundle_name(None, False)  # exact reads down in the model's layout
            got[limit] = list(e.stream(prompt, 8, stop_tokens=[]))
    with Engine.from_pretrained(full, memory_limit=None, device="cpu", progress=False, exact=True) as e:
        ref = list(e.stream(prompt, 8, stop_tokens=[]))
    assert got[None] == got["30%"] == ref == want
    with Engine.from_pretrained(direct, memory_limit=None, device="cpu", quantization="q4_0", progress=False) as e:
        assert e.bundle.format == "q4_0" and len(list(e.stream(prompt, 4, stop_tokens=[]))) == 4


def test_marker_names_the_bundles_and_where_values_were_drawn(folders):
    cfg, _, _, direct, info = folders
    marker = json.loads((direct / BUNDLE_ONLY_FILE).read_text())
    assert set(marker["bundles"]) == {bundle_name(*b) for b in BUNDLES} and marker["drawn_on"] == "cpu"
    assert info["bytes"] == sum((direct / n / DATA_NAME).stat().st_size for n in marker["bundles"])
    plan = planned_bytes(cfg, torch.bfloat16, BUNDLES)
    assert all(plan["bundles"][n] >= (direct / n / DATA_NAME).stat().st_size for n in marker["bundles"])


def test_missing_format_and_missing_experts_are_clear_errors(folders, tmp_path):
    cfg, _, _, direct, _ = folders
    with pytest.raises(BundleError, match=r"only in its bundles .*none is fp16"):
        Engine.from_pretrained(direct, memory_limit=None, device="cpu", quantization="fp16", progress=False)
    bare = write_synthetic_checkpoint(tmp_path / "bare", cfg, seed=SEED, experts=False)
    with pytest.raises(BundleError, match="stores no expert tensors and has no expert bundle"):
        Engine.from_pretrained(bare, memory_limit=None, device="cpu", progress=False)


def test_changed_non_expert_files_are_refused(folders, tmp_path):
    cfg = folders[0]
    d, _ = write_synthetic_engine_folder(tmp_path / "m", cfg, seed=1, device="cpu", progress=False)
    st = os.stat(d / "model.safetensors")
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(BundleError, match="written for other non-expert files"):
        Engine.from_pretrained(d, memory_limit=None, device="cpu", progress=False)


def test_preflight_disk_check_names_needed_and_free(tmp_path):
    with pytest.raises(DiskSpaceError, match=r"needs \d+ bytes .* has \d+ bytes .* free"):
        check_disk(tmp_path / "not" / "yet", 1 << 62)
    assert check_disk(tmp_path, 1)["free"] > 0
    cfg = SmallThinkerConfig.from_name("smallthinker-test")
    with pytest.raises(DiskSpaceError):  # before anything is written
        write_synthetic_engine_folder(tmp_path / "huge", cfg.replace(moe_ffn_hidden_size=1 << 32),
                                      device="cpu", progress=False)
    assert not (tmp_path / "huge").exists()


@pytest.mark.gpu
def test_values_drawn_on_cuda_equal_the_cuda_checkpoint_and_its_conversion(tmp_path):
    """On a GPU the direct writer draws with CUDA generators: the same values as the full checkpoint drawn there,
    and every format (q4_0 / int8 quantised on the GPU) the same bytes as convert's CPU encoding of them."""
    cfg = SmallThinkerConfig.from_name("smallthinker-test")
    full = write_synthetic_checkpoint(tmp_path / "full", cfg, seed=SEED, device="cuda")
    direct, info = write_synthetic_engine_folder(tmp_path / "direct", cfg, seed=SEED, bundles=BUNDLES, device="cuda",
                                                 progress=False)
    assert info["device"] == "cuda"
    theirs = _tensors(full / "model.safetensors")
    for n, t in _tensors(direct / "model.safetensors").items():
        assert torch.equal(t.view(torch.uint8), theirs[n].view(torch.uint8)), n
    for b in BUNDLES:
        conv = convert(full, tmp_path / "conv" / bundle_name(*b), b[0], progress=False, down_transposed=b[1])
        a, c = (direct / bundle_name(*b) / DATA_NAME).read_bytes(), (conv / DATA_NAME).read_bytes()
        assert a[:12] == c[:12] and a[28:] == c[28:], b
