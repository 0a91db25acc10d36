"""The dense Qwen2 model (SmallThinker-3B-Preview): transformers parity, the preset, the loader's checks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import smallthinker_lab as sl
from smallthinker_lab import CheckpointError, ConfigError, DenseConfig, DenseForCausalLM, load_model
from smallthinker_lab.model.dense import dense_expected_tensors

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 17, 90, 5, 64, 2, 95, 40, 8, 8, 31, 77, 0, 12, 88, 6, 55, 11, 23, 19]])


def hf_model(tie: bool, sliding: bool = False, seed: int = 0):
    """transformers' own Qwen2ForCausalLM, random weights large enough that attention is far from uniform."""
    extra = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1) if sliding else {}
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=5000.0, tie_word_embeddings=tie, attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.1))
    return model


def write_hf(tmp_path: Path, tie: bool, bias: bool, sliding: bool = False):
    model = hf_model(tie, sliding)
    folder = tmp_path / f"qwen2-tie{tie}-bias{bias}-sw{sliding}"
    if not bias:  # a Qwen2 without q/k/v biases is one whose biases are zero: store none, say so in config.json
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
    model.save_pretrained(folder)
    if not bias:
        tensors = {n: t for n, t in load_file(folder / "model.safetensors").items() if not n.endswith(".bias")}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        edit_config(folder, lambda d: d.update(attention_bias=False))
    return model, folder


def edit_config(folder: Path, fn) -> None:
    path = folder / "config.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def edit_weights(folder: Path, fn) -> None:
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_logits_equal_transformers(tmp_path, tie, bias):
    hf, folder = write_hf(tmp_path, tie, bias)
    ours = load_model(folder, dtype=torch.float32)
    assert isinstance(ours, DenseForCausalLM)
    assert ours.config.tie_word_embeddings is tie and ours.config.attention_bias is bias
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tie
    with torch.no_grad():
        want = hf(IDS).logits
        got = ours(IDS).logits
    assert (got - want).abs().max().item() < 1e-4
    biases = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.bias"))
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) - (0 if bias else biases)


def test_sliding_layers_equal_transformers(tmp_path):
    """layer_types with sliding_attention (use_sliding_window) go through the project's ring-buffer KV cache."""
    hf, folder = write_hf(tmp_path, tie=False, bias=True, sliding=True)
    ours = load_model(folder, dtype=torch.float32)
    assert [ours.config.is_sliding(i) for i in range(2)] == [False, True]
    with torch.no_grad():
        want = hf(IDS).logits
        assert (ours(IDS).logits - want).abs().max().item() < 1e-4
        cache = ours.new_cache()  # prefill 5, then one token at a time past the window of 6
        steps = [ours(IDS[:, :5], cache=cache).logits]
        steps += [ours(IDS[:, t:t + 1], cache=cache).logits for t in range(5, IDS.shape[1])]
    assert (torch.cat(steps, dim=1) - want).abs().max().item() < 1e-4


def test_cached_decode_equals_full_forward_and_generate_runs(tmp_path):
    _, folder = write_hf(tmp_path, tie=True, bias=True)
    model = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.new_cache()
        parts = [model(IDS[:, :7], cache=cache).logits, model(IDS[:, 7:], cache=cache).logits]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    out = sl.generate(model, IDS[0, :6], max_new_tokens=8, stop_tokens=[])
    assert len(out) == 8
    greedy = []
    ids = IDS[0, :6].tolist()
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(model(torch.tensor([ids + greedy])).logits[0, -1].argmax()))
    assert list(out) == greedy


def test_preset_3b_preview_shape_and_parameter_count():
    cfg = DenseConfig.from_name("smallthinker-3b-preview")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (2048, 36, 16, 2, 11008, 151936, 128)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6
    with torch.device("meta"):  # the shapes, never 3 B parameters of memory
        model = DenseForCausalLM(cfg)
    n = model.num_parameters()
    assert n == cfg.parameter_count() == 3_085_938_688
    assert abs(n - 3.09e9) / 3.09e9 < 0.005  # the released model's 3.09 B
    assert cfg.parameter_count(include_embeddings=False) == n - 151936 * 2048  # 2.77 B non-embedding
    shapes = dense_expected_tensors(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == n
    assert "lm_head.weight" not in shapes and len(shapes) == 1 + 36 * 12 + 1
    assert {n: tuple(p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight"} == shapes


def test_synthetic_checkpoint_and_save_pretrained_round_trip(tmp_path):
    cfg = DenseConfig.from_name("dense-test")
    folder = sl.model.write_synthetic_checkpoint(tmp_path / "syn", cfg, dtype=torch.float32)
    model = load_model(folder)
    assert isinstance(model, DenseForCausalLM) and model.config.model_type == "qwen2"
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias.std() > 0  # biases are random, not the norms' ones
    again = load_model(sl.save_pretrained(model, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(model(IDS % 128).logits, again(IDS % 128).logits)
    assert DenseConfig.from_json(tmp_path / "saved").to_dict() == model.config.to_dict()


def test_engine_refuses_a_dense_model_with_a_clear_error(tmp_path):
    folder = sl.model.write_synthetic_checkpoint(tmp_path / "syn", DenseConfig.from_name("dense-test"),
                                                 dtype=torch.float32)
    with pytest.raises(sl.DenseModelError, match=r"dense Qwen2 model.*no experts to offload.*load_model"):
        sl.Engine.from_pretrained(folder, memory_limit=None)
    with pytest.raises(sl.DenseModelError, match="no experts to offload"):
        sl.convert(folder)


def test_smallthinker_config_keeps_refusing_other_model_types():
    with pytest.raises(ConfigError, match="unknown model_type 'qwen2'"):
        sl.SmallThinkerConfig(model_type="qwen2")
    with pytest.raises(ConfigError, match="unknown model_type 'smallthinker'"):
        DenseConfig(model_type="smallthinker")


# ------------------------------------------------------------------ bad input: the SmallThinker loader's checks
@pytest.fixture
def folder(tmp_path) -> Path:
    return write_hf(tmp_path, tie=False, bias=True)[1]


Q = "model.layers.1.self_attn.q_proj"


def test_wrong_shape_names_file_and_tensor(folder):
    edit_weights(folder, lambda t: t.update({Q + ".bias": torch.zeros(63)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {Q}\.bias has shape \[63\] but .*"
                                              rf"config\.json expects \[64\]"):
        load_model(folder)


def test_missing_tensor_is_named_and_strict_false_initialises_zero_bias(folder):
    edit_weights(folder, lambda t: t.pop(Q + ".bias"))
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) missing .*{Q}\.bias"):
        load_model(folder)
    model = load_model(folder, strict=False)
    assert torch.count_nonzero(model.model.layers[1].self_attn.q_proj.bias) == 0


def test_unexpected_tensor_is_named(folder):
    edit_weights(folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) that a Qwen2 \(dense\) model .*mlp\.extra"):
        load_model(folder)


def test_integer_dtype_is_refused(folder):
    edit_weights(folder, lambda t: t.update({Q + ".weight": torch.zeros(64, 64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {Q}\.weight has dtype I32"):
        load_model(folder)


def test_unknown_model_type(folder):
    edit_config(folder, lambda d: d.update(model_type="llama"))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown model_type 'llama'"):
        load_model(folder)


def test_more_layers_than_stored_is_refused_before_building(folder):
    edit_config(folder, lambda d: d.update(num_hidden_layers=10**9, layer_types=None))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers is 1000000000, but the weights .* only 2 layers"):
        load_model(folder)


@pytest.mark.parametrize("key,value,msg", [
    ("hidden_act", "gelu", "hidden_act must be 'silu'"),
    ("num_key_value_heads", 3, "not divisible by num_key_value_heads"),
    ("hidden_size", "64", "hidden_size must be a positive integer"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling .* is not supported"),
])
def test_bad_config_values_are_named(folder, key, value, msg):
    edit_config(folder, lambda d: d.update({key: value}))
    with pytest.raises(ConfigError, match=msg):
        load_model(folder)


def test_shard_outside_the_folder_is_refused(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = load_file(folder / "model-00001-of-00001.safetensors").keys()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../model-00001-of-00001.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(folder)


# ------------------------------------------------------------------ dense against MoE
def test_size_table_counts_match_the_released_models():
    from smallthinker_lab.instruments.dense_moe import size_table

    df = size_table({"3b": DenseConfig.from_name("smallthinker-3b-preview"),
                     "4b": sl.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
                     "21b": sl.SmallThinkerConfig.from_name("smallthinker-21b-a3b")}).set_index("model")
    assert df.loc["3b", "params_total"] == 3_085_938_688
    assert df.loc["3b", "params_active"] == 3_085_938_688 - 151936 * 2048  # dense: everything but the embedding
    for name, total, active in (("4b", 4.0e9, 0.6e9), ("21b", 21.5e9, 3e9)):  # the names' "4B-A0.6B", "21B-A3B"
        assert abs(df.loc[name, "params_total"] / total - 1) < 0.02
        assert abs(df.loc[name, "params_active"] / active - 1) < 0.1
    assert df.loc["3b", "ffn_share_active"] == 1.0 and df.loc["4b", "ffn_share_active"] == 4 / 32
    assert df.loc["3b", "ffn_MiB_per_token_bf16"] == 36 * 3 * 2048 * 11008 * 2 / 2**20
    assert df.loc["3b", "ffn_MiB_per_token_bf16"] > 5 * df.loc["4b", "ffn_MiB_per_token_bf16"]
    # all 36 layers global: 2 (K, V) x 2 heads x 128 x 2 bytes per token and layer
    assert df.loc["3b", "kv_MiB_32K"] == 36 * 2 * 2 * 128 * 2 * 32768 / 2**20 == 1152
    assert df.loc["21b", "kv_MiB_32K"] < df.loc["21b", "layers"] * 2 * 4 * 128 * 2 * 32768 / 2**20  # sliding layers


def test_silu_has_no_exact_zeros_where_reglu_has_many(tmp_path):
    from smallthinker_lab.instruments.dense_moe import ffn_activation_sparsity

    prompts = [IDS[0].tolist(), (IDS[0] * 3 % 96).tolist()]
    hf, folder = write_hf(tmp_path, tie=True, bias=True)
    dense_model = load_model(folder, dtype=torch.float32)
    d = ffn_activation_sparsity(dense_model, prompts, thresholds=(0.0, 0.05, 0.5))
    assert (d[d.threshold == 0.0].share == 0).all()  # SiLU is zero only at 0
    gates = []  # the same share computed from transformers' own MLP inputs
    hook = hf.model.layers[1].mlp.gate_proj.register_forward_hook(lambda m, i, o: gates.append(o))
    with torch.no_grad():
        for p in prompts:
            hf(torch.tensor([p]))
    hook.remove()
    act = torch.nn.functional.silu(torch.cat([g.reshape(-1) for g in gates]))
    got = d[(d.layer == 1) & (d.threshold == 0.5)].share.item()
    assert abs(got - (act.abs() <= 0.5).double().mean().item()) < 1e-6
    moe = sl.load_model("default", dtype=torch.float32)
    m = ffn_activation_sparsity(moe, prompts, thresholds=(0.0, 0.05))
    assert (m[m.threshold == 0.0].share > 0.3).all()  # ReGLU: every negative gate is an exact zero
    for df in (d, m):
        wide = df.pivot(index="layer", columns="threshold", values="share")
        assert (wide.diff(axis=1).iloc[:, 1:] >= 0).all().all()  # more values fall under a larger threshold


def test_record_on_a_dense_model_keeps_the_kinds_that_apply():
    model = DenseForCausalLM(DenseConfig.from_name("dense-test")).init_weights(0).eval()
    with sl.record(model) as rec:  # default kinds: the dense model's kv and timing
        sl.generate(model, [1, 2, 3, 4], max_new_tokens=5, stop_tokens=[])
    kv = rec.to_dataframe("kv")
    assert set(kv.layer) == {0, 1, 2} and (kv.attention == "global").all()
    last = kv[kv.step == kv.step.max()]
    per_layer = sl.kv_cache_bytes(model.config, 8, dtype=torch.float32) // 3  # 4 prompt + 4 decoded positions
    assert (last.context == 8).all() and (last["bytes"] == per_layer).all()
    assert len(rec.to_dataframe("timing")) == 5
    for kinds in (["experts"], ["neurons", "kv"], ["cache"]):
        with pytest.raises(ValueError, match=r"a dense model has no experts.*ffn_activation_sparsity"):
            sl.record(model, kinds=kinds)


def test_readme_dense_example_runs(tmp_path):
    import os
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- dense-example -->\n```python\n(.+?)\n```", readme, re.S).group(1)
    script = tmp_path / "dense_example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    env = {**os.environ, "PYTHONPATH": str(repo)}  # this checkout's package, whichever one the venv installed
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3085938688" in res.stdout


def test_cli_generates_with_a_dense_model_in_memory_and_with_a_draft(tmp_path, capsys):
    from smallthinker_lab.cli import main
    from smallthinker_lab.resources import default_model_dir

    cfg = DenseConfig.from_name("dense-test", vocab_size=8192, eos_token_id=[0, 2])  # the default tokenizer's ids
    folder = sl.model.write_synthetic_checkpoint(tmp_path / "dense", cfg, dtype=torch.float32,
                                                 tokenizer=default_model_dir())
    assert main(["generate", "--model", str(folder), "def f(x):", "--max-new-tokens", "6", "--no-echo"]) == 0
    plain = capsys.readouterr()
    assert "in memory (cpu)" in plain.err  # not the engine: a dense model has no experts to offload
    assert main(["generate", "--model", str(folder), "def f(x):", "--max-new-tokens", "6", "--no-echo",
                 "--draft", "1", "--draft-tokens", "3"]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == plain.out and "of draft tokens kept" in drafted.err
    assert main(["generate", "--model", str(folder), "x", "--draft", "1", "--memory-limit", "1GiB"]) == 2
    assert "--draft runs the model in memory" in capsys.readouterr().err


def test_from_pretrained_loads_dense_and_refuses_smallthinker(tmp_path):
    folder = write_hf(tmp_path, tie=True, bias=True)[1]
    assert isinstance(DenseForCausalLM.from_pretrained(folder), DenseForCausalLM)
    with pytest.raises(ValueError, match=r"holds a SmallThinkerForCausalLM .*not a dense Qwen2 model"):
        DenseForCausalLM.from_pretrained("default")
