"""Checkpoints: the HF layout, load/save round trips, synthetic weights, and a clear error for each bad input."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smallthinker_lab import (
    CheckpointError,
    ConfigError,
    SmallThinkerConfig,
    SmallThinkerForCausalLM,
    load_model,
    save_pretrained,
)
from smallthinker_lab.model import checkpoint as ckpt
from smallthinker_lab.model import checkpoint_files, expected_tensors, write_synthetic_checkpoint

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 127, 40, 8, 8, 31, 77, 0, 12, 90, 6, 55, 101, 23, 19]])
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model: SmallThinkerForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def config(name: str = "smallthinker-test", **overrides) -> SmallThinkerConfig:
    return SmallThinkerConfig.from_name(name, **overrides)


@pytest.fixture
def single(tmp_path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "single", config(), dtype=torch.float32)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "sharded", config(), dtype=torch.float32, max_shard_size="100KB")


def rewrite(folder: Path, mutate, file: str = ckpt.SINGLE_FILE) -> Path:
    """Load one weight file, let ``mutate`` edit the dict of tensors, write it back (with safetensors itself)."""
    path = folder / file
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def edit_json(path: Path, mutate) -> None:
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))


# ------------------------------------------------------------------ layout
def test_expected_tensors_are_the_models_state_dict_names_and_shapes():
    for name in ("smallthinker-test", "smallthinker-test-tied"):
        cfg = config(name)
        state = {k: tuple(v.shape) for k, v in SmallThinkerForCausalLM(cfg).state_dict().items()}
        if cfg.tie_word_embeddings:
            del state["lm_head.weight"]
        assert expected_tensors(cfg) == state
        assert list(expected_tensors(cfg))[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                                   "model.layers.0.self_attn.q_proj.weight"]


def test_expected_tensors_of_the_released_models_count_their_parameters():
    shapes = expected_tensors(config("smallthinker-4b-a0.6b"))
    assert "lm_head.weight" not in shapes  # tied
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 4_035_085_824
    untied = expected_tensors(config("smallthinker-4b-a0.6b", tie_word_embeddings=False))
    assert sum(torch.Size(s).numel() for s in untied.values()) == 4_268_459_520
    assert shapes["model.layers.31.block_sparse_moe.experts.31.down.weight"] == (1536, 768)


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("preset", ["smallthinker-test", "smallthinker-test-tied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_synthetic_checkpoint_reloads_identically_single_and_sharded(tmp_path, preset, dtype):
    cfg = config(preset)
    a = write_synthetic_checkpoint(tmp_path / "a", cfg, seed=3, dtype=dtype)
    b = write_synthetic_checkpoint(tmp_path / "b", cfg, seed=3, dtype=dtype, max_shard_size=60_000)
    shards = sorted(p.name for p in b.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((b / ckpt.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(expected_tensors(cfg))
    single_file = a / ckpt.SINGLE_FILE
    assert index["metadata"]["total_size"] == single_file.stat().st_size - _header_bytes(single_file)
    with safe_open(str(b / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    ma, mb = load_model(a), load_model(b)
    assert ma.dtype == mb.dtype == dtype and not ma.training
    assert json.loads((a / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    la = logits(ma)
    assert torch.equal(la, logits(mb))
    assert la.float().std() > 0.05  # not degenerate


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_synthetic_weights_depend_only_on_seed_and_name(tmp_path):
    cfg = config()
    a = write_synthetic_checkpoint(tmp_path / "a", cfg, seed=1)
    b = write_synthetic_checkpoint(tmp_path / "b", cfg, seed=1)
    c = write_synthetic_checkpoint(tmp_path / "c", cfg, seed=2)
    f32 = write_synthetic_checkpoint(tmp_path / "f32", cfg, seed=1, dtype=torch.float32)
    assert (a / ckpt.SINGLE_FILE).read_bytes() == (b / ckpt.SINGLE_FILE).read_bytes()
    assert (a / ckpt.SINGLE_FILE).read_bytes() != (c / ckpt.SINGLE_FILE).read_bytes()
    # the bf16 file is the fp32 one rounded: loading fp32 as bf16 gives the same model
    assert torch.equal(logits(load_model(a)), logits(load_model(f32, dtype="bfloat16")))
    w = load_file(f32 / ckpt.SINGLE_FILE)
    assert w["model.norm.weight"].eq(1).all()
    assert abs(w[Q_PROJ].std().item() - cfg.initializer_range) < 0.003


def test_save_pretrained_round_trip_keeps_logits_and_config_json(tmp_path):
    model = random_model()
    model.config.extra["custom_key"] = {"kept": [1, 2]}
    save_pretrained(model, tmp_path / "a")
    loaded = load_model(tmp_path / "a")
    assert torch.equal(logits(model), logits(loaded))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["custom_key"] == {"kept": [1, 2]}
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", "model.safetensors"]


def test_save_pretrained_sharded_and_in_another_dtype(tmp_path):
    model = random_model("smallthinker-test-tied")
    out = save_pretrained(model, tmp_path / "m", max_shard_size="150KB", dtype=torch.bfloat16)
    index = json.loads((out / ckpt.INDEX_FILE).read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: the head is not written
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(out)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(random_model("smallthinker-test-tied").to(torch.bfloat16)))
    assert torch.equal(logits(load_model(out, dtype=torch.float32)),
                       logits(random_model("smallthinker-test-tied").to(torch.bfloat16).float()))


def test_tied_checkpoint_with_a_stored_lm_head_loads(tmp_path, caplog):
    cfg = config("smallthinker-test-tied")
    plain = write_synthetic_checkpoint(tmp_path / "plain", cfg)
    stored = write_synthetic_checkpoint(tmp_path / "stored", cfg, store_tied_lm_head=True)
    with safe_open(str(stored / ckpt.SINGLE_FILE), "pt") as f:
        assert "lm_head.weight" in f.keys()  # as in the released 4B
    with caplog.at_level(logging.DEBUG, logger="smallthinker_lab.model.checkpoint"):
        model = load_model(stored)
    assert "ignoring the stored lm_head.weight" in caplog.text
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == load_model(plain).num_parameters()
    assert torch.equal(logits(model), logits(load_model(plain)))


def test_overwriting_the_folder_a_model_was_loaded_from(tmp_path, single):
    model = load_model(single)  # memory-mapped from single/model.safetensors
    before = logits(model)
    model.save_pretrained(single, max_shard_size="100KB")  # replaces the file the model maps
    assert not (single / ckpt.SINGLE_FILE).exists()
    assert torch.equal(logits(model), before)
    assert torch.equal(logits(load_model(single)), before)
    model.save_pretrained(single)  # and back to a single file: the stale shards and index go
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]


def test_a_crash_while_writing_leaves_no_half_written_checkpoint(tmp_path, single, monkeypatch):
    real, calls = ckpt.synthetic_tensor_chunks, []

    def failing(name, *args):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt("simulated crash")
        return real(name, *args)

    monkeypatch.setattr(ckpt, "synthetic_tensor_chunks", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(tmp_path / "new", config())
    assert list((tmp_path / "new").iterdir()) == []
    before = (single / ckpt.SINGLE_FILE).read_bytes()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(single, config(), seed=5, max_shard_size="100KB")
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    assert (single / ckpt.SINGLE_FILE).read_bytes() == before


def test_parse_size():
    assert ckpt.parse_size("5GB") == 5 * 10**9
    assert ckpt.parse_size("500MiB") == 500 * 2**20
    assert ckpt.parse_size(1234) == ckpt.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        ckpt.parse_size("five gigs")


# ------------------------------------------------------------- bad inputs
def test_missing_tensor(single):
    rewrite(single, lambda t: t.pop(Q_PROJ))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*missing.*{Q_PROJ}"):
        load_model(single)


def test_unexpected_tensor(single):
    rewrite(single, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected.*model\.layers\.0\.self_attn\.q_norm"):
        load_model(single)


def test_wrong_shape(single):
    rewrite(single, lambda t: t.update({Q_PROJ: torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q_PROJ} has shape \[64, 32\].*\[64, 64\]"):
        load_model(single)


def test_integer_dtype(single):
    rewrite(single, lambda t: t.update({Q_PROJ: torch.zeros(64, 64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q_PROJ} has dtype I32"):
        load_model(single)


def test_truncated_file(single):
    path = single / ckpt.SINGLE_FILE
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*tensor lm_head\.weight ends"):
        load_model(single)


def test_header_length_beyond_end_of_file(single):
    path = single / ckpt.SINGLE_FILE
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*header claims"):
        load_model(single)


def test_corrupt_header(single):
    path = single / ckpt.SINGLE_FILE
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*cannot parse its JSON header"):
        load_model(single)


def test_index_names_a_missing_shard(sharded):
    (sharded / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json names shard model-00003-of-00012\.safetensors"):
        load_model(sharded)


def test_index_names_a_tensor_not_in_its_shard(sharded):
    def move(d):
        d["weight_map"][Q_PROJ] = "model-00012-of-00012.safetensors"

    edit_json(sharded / ckpt.INDEX_FILE, move)
    with pytest.raises(CheckpointError, match=rf"maps tensor {Q_PROJ} to model-00012-of-00012\.safetensors"):
        load_model(sharded)


def test_unknown_model_type(single):
    edit_json(single / "config.json", lambda d: d.update(model_type="qwen3_moe"))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown model_type 'qwen3_moe'"):
        load_model(single)


def test_config_with_fewer_layers_than_the_weights(single):
    def fewer(d):
        d.update(num_hidden_layers=2, rope_layout=d["rope_layout"][:2],
                 sliding_window_layout=d["sliding_window_layout"][:2])

    edit_json(single / "config.json", fewer)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*tensors for 4 layers.*num_hidden_layers=2.*"
                                              r"model\.layers\.2\."):
        load_model(single)


def test_config_vocab_contradicts_the_embedding(single):
    edit_json(single / "config.json", lambda d: d.update(vocab_size=100))
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight has shape \[128, 64\].*\[100, 64\]"):
        load_model(single)


def test_missing_config_json(single):
    (single / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no config\.json in checkpoint folder {single}"):
        load_model(single)


def test_folder_without_weights(tmp_path):
    config().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_model(tmp_path)


def test_both_single_file_and_index(single, sharded):
    (sharded / ckpt.SINGLE_FILE).write_bytes((single / ckpt.SINGLE_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        load_model(sharded)


def test_default_path_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "DEFAULT_MODEL_DIR", tmp_path / "smallthinker-tiny")
    with pytest.raises(FileNotFoundError, match="default model .*smallthinker-tiny has no weights yet"):
        load_model()
    write_synthetic_checkpoint(tmp_path / "smallthinker-tiny", config())
    assert load_model("default").config.num_hidden_layers == 4


def test_non_strict_loading_initialises_missing_and_skips_unexpected(single, caplog):
    rewrite(single, lambda t: (t.pop(Q_PROJ), t.update({"extra.weight": torch.ones(3)})))
    with caplog.at_level(logging.WARNING):
        model = load_model(single, strict=False)
    assert "missing" in caplog.text and "extra.weight" in caplog.text
    w = model.get_parameter(Q_PROJ)
    assert not w.is_meta and 0.01 < w.std().item() < 0.03


# ---------------------------------------------------------------- memory
PEAK_RSS = textwrap.dedent("""
    import json, sys
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    import torch
    from smallthinker_lab import SmallThinkerConfig, SmallThinkerForCausalLM, load_model
    from smallthinker_lab.model import write_synthetic_checkpoint
    torch.set_num_threads(1)
    with torch.device("meta"):  # warm up: the first meta-device model imports ~70 MB of torch internals
        SmallThinkerForCausalLM(SmallThinkerConfig.from_name("smallthinker-test"))
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    base = status("VmHWM")
    kind, path, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if kind == "load":
        model = load_model(path)
        total = sum(float(p.detach().double().sum()) for p in model.parameters())  # touch every weight
    else:
        write_synthetic_checkpoint(path, SmallThinkerConfig.from_name("smallthinker-test", **cfg),
                                   dtype=torch.float64)
    print(status("VmHWM") - base)
""")


def big_config(layers: int) -> dict:
    # 12.7 M parameters per layer: ~100 MB per layer in float64 (fewer random numbers per byte than fp32)
    return dict(hidden_size=512, moe_ffn_hidden_size=512, moe_num_primary_experts=16, num_hidden_layers=layers,
                rope_layout=[1] * layers, sliding_window_layout=[0] * layers)


def peak_rss_growth(kind: str, path: Path, cfg: dict) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, kind, str(path), json.dumps(cfg)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_loading_memory_maps_the_weights(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "m", config(**big_config(2)), dtype=torch.float64)
    size = (folder / ckpt.SINGLE_FILE).stat().st_size
    assert size > 190e6
    growth = peak_rss_growth("load", folder, {})
    assert growth < 1.3 * size, f"loading a {size / 1e6:.0f} MB checkpoint grew the peak RSS by {growth / 1e6:.0f} MB"


def test_writing_a_synthetic_checkpoint_streams(tmp_path):
    folder = tmp_path / "big"
    growth = peak_rss_growth("write", folder, big_config(6))
    size = (folder / ckpt.SINGLE_FILE).stat().st_size
    assert size > 590e6
    assert growth < 300e6, f"writing a {size / 1e6:.0f} MB checkpoint grew the peak RSS by {growth / 1e6:.0f} MB"
