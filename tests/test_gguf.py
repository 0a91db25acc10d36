"""GGUF in and out: export then load keeps the logits, converter-style files load, bad files name the tensor, and
the engine over a GGUF generates what load_model of it does."""

import warnings

import numpy as np
import pytest
import torch
from conftest import random_model
from gguf import GGUFReader, GGUFWriter, SpecialVocab, TokenType, quants
from gguf.constants import ExpertGatingFuncType, GGMLQuantizationType

from smallthinker_lab.cli import main
from smallthinker_lab.engine import Engine
from smallthinker_lab.engine.bundle import open_bundle
from smallthinker_lab.engine.gguf import materialise
from smallthinker_lab.engine.quant import FORMATS
from smallthinker_lab.model import load_model, save_pretrained
from smallthinker_lab.model.config import hybrid_layouts
from smallthinker_lab.model.generate import generate
from smallthinker_lab.model.gguf import GGUFError, load_gguf_tokenizer, read_gguf
from smallthinker_lab.model.gguf_export import GGUFExportWarning, export_gguf
from smallthinker_lab.model.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
T = GGMLQuantizationType
IDS = torch.tensor([[3, 17, 99, 42, 7, 120, 5, 64, 11, 30, 2, 77]])  # longer than the test preset's window of 8


def logits(model, ids=IDS):
    out = model(ids)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, tuple) else out


def checkpoint(tmp_path, dtype=torch.float32, **overrides):
    folder = tmp_path / "ckpt"
    save_pretrained(random_model(**overrides), folder, dtype=dtype)
    return folder


def dequantised(model, kind: str):
    """The model with every matrix but the routers replaced by its ggml round trip (the project's bit-exact codecs)."""
    fmt = FORMATS["q4_0" if kind == "q4_0" else "ggml_q8_0"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "primary_router" not in name:
                p.copy_(fmt.decode(fmt.encode(p), p.shape))
    return model


@pytest.mark.parametrize("kind,dtype", [("bf16", torch.bfloat16), ("f32", torch.float32)])
def test_export_then_load_gives_the_checkpoints_logits_exactly(tmp_path, kind, dtype):
    folder = checkpoint(tmp_path, dtype)
    with pytest.warns(GGUFExportWarning):  # the test preset's window of 8 and 4-layer NoPE layout
        path = export_gguf(folder, tmp_path / "m.gguf", kind, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path)
    ref = load_model(folder)
    assert model.config.sliding_window_size == 8 and model.config.rope_layout == ref.config.rope_layout
    assert next(model.parameters()).dtype == dtype
    assert torch.equal(logits(model), logits(ref))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantised_export_loads_as_the_dequantised_weights(tmp_path, kind):
    folder = checkpoint(tmp_path, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / "m.gguf", kind, progress=False)
        model = load_model(path)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == T[kind.upper()] and types["blk.0.ffn_gate_inp.weight"] == T.F32
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert torch.equal(logits(model), logits(dequantised(load_model(folder), kind)))


def converter_style_gguf(path, model, arch="smallthinker", expert_type=T.Q4_0, skip=(), shapes=None, types=None,
                         tokenizer=True):
    """A GGUF laid out as llama.cpp's convert_hf_to_gguf.py writes a SmallThinker (keys, names, stacked experts,
    F32 norms and routers), built with gguf's own writer; ``skip`` / ``shapes`` / ``types`` damage it on purpose."""
    c, sd = model.config, model.state_dict()
    w = GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    w.add_expert_feed_forward_length(c.moe_ffn_hidden_size)
    w.add_feed_forward_length(c.moe_ffn_hidden_size)
    w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX if c.moe_primary_router_apply_softmax
                             else ExpertGatingFuncType.SIGMOID)
    if any(c.sliding_window_layout):
        w.add_sliding_window(c.sliding_window_size)
    if tokenizer:
        tok = load_tokenizer(DEFAULT_TOKENIZER_DIR)
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = tok.get_added_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list([reverse[i] for i in range(c.vocab_size)])
        w.add_token_types([TokenType.CONTROL if reverse[i] in added else TokenType.NORMAL for i in range(c.vocab_size)])
        SpecialVocab(DEFAULT_TOKENIZER_DIR, load_merges=True, n_vocab=c.vocab_size).add_to_gguf(w, quiet=True)
    per_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "block_sparse_moe.primary_router"}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        for g, h in per_layer.items():
            tensors[f"blk.{i}.{g}.weight"] = sd[f"model.layers.{i}.{h}.weight"]
        for m in ("gate", "up", "down"):
            tensors[f"blk.{i}.ffn_{m}_exps.weight"] = torch.stack(
                [sd[f"model.layers.{i}.block_sparse_moe.experts.{e}.{m}.weight"] for e in range(c.num_experts)])
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for name, t in tensors.items():
        if name in skip:
            continue
        x = t.float().numpy()
        if shapes and name in shapes:
            x = np.zeros(shapes[name], np.float32)
        kind = (types or {}).get(name, expert_type if "_exps" in name else T.F32)
        if kind == T.I32:
            w.add_tensor(name, x.astype(np.int32))
        elif kind == T.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_shaped_model(**overrides):
    """The test preset with 8 layers, a window of 4096 and the default tokenizer's vocabulary: a layout llama.cpp
    runs exactly as the model does."""
    rope, swa = hybrid_layouts(8)
    return random_model(vocab_size=8192, num_hidden_layers=8, rope_layout=rope, sliding_window_layout=swa,
                        sliding_window_size=4096, **overrides)


def test_a_gguf_laid_out_as_llama_cpps_converter_writes_it_loads(tmp_path):
    model = llama_cpp_shaped_model()
    path = converter_style_gguf(tmp_path / "conv.gguf", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its layout is llama.cpp's: nothing to warn about
        loaded = load_model(path)
    assert loaded.config.rope_layout == model.config.rope_layout
    assert loaded.config.sliding_window_layout == model.config.sliding_window_layout
    ref = model
    with torch.no_grad():  # the experts as Q4_0 round trips, everything else as stored (F32)
        for name, p in ref.named_parameters():
            if ".experts." in name:
                p.copy_(FORMATS["q4_0"].decode(FORMATS["q4_0"].encode(p), p.shape))
    assert torch.equal(logits(loaded), logits(ref))
    tok, want = load_gguf_tokenizer(path), load_tokenizer("default")
    text = "def f(x):\n    return x ** 2  # 12345 <|im_start|>user\nHi<|im_end|> ünïcode"
    assert tok.encode(text) == want.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_token == want.eos_token


@pytest.mark.parametrize("damage,message", [
    ("truncated", r"truncated: tensor output\.weight ends at byte"),
    ("architecture", r"architecture 'llama' is not 'smallthinker'"),
    ("missing", r"tensor blk\.1\.attn_k\.weight is missing"),
    ("shape", r"tensor blk\.0\.attn_q\.weight has shape \[32, 64\] but the metadata needs \[64, 64\]"),
    ("type", r"tensor blk\.0\.ffn_norm\.weight has type I32"),
])
def test_each_bad_gguf_gets_an_error_naming_the_tensor(tmp_path, damage, message):
    model = random_model()
    path = tmp_path / "bad.gguf"
    kwargs = {"architecture": {"arch": "llama"}, "missing": {"skip": ("blk.1.attn_k.weight",)},
              "shape": {"shapes": {"blk.0.attn_q.weight": (32, 64)}},
              "type": {"types": {"blk.0.ffn_norm.weight": T.I32}}}.get(damage, {})
    converter_style_gguf(path, model, tokenizer=False, **kwargs)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 100])  # into the last tensor (output.weight: the preset is untied)
    with pytest.raises(GGUFError, match=message):
        load_model(path)


def test_engine_over_a_q4_0_gguf_uses_its_bytes_and_generates_what_load_model_does(tmp_path):
    folder = checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / "m.gguf", "q4_0", progress=False)
        model = load_model(path)
        engine_dir = materialise(path, progress=False)
    bundle = open_bundle(engine_dir / "expert_bundle")
    assert bundle.format == "ggml_q4_0"
    reader = GGUFReader(path)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    record = np.fromfile(bundle.data_path, np.uint8, count=bundle.stride, offset=bundle.offset(1, 3))
    for m in ("gate", "down"):  # the GGUF's blocks, byte for byte, after the format's 64-byte prefix
        s = bundle.matrices[m]
        gguf_bytes = stored[f"blk.1.ffn_{m}_exps.weight"][3].ravel()
        assert np.array_equal(record[s.offset + 64:s.offset + s.nbytes], gguf_bytes)
    ids = IDS[:, :6]
    want = generate(model, ids, 10)
    with Engine.from_pretrained(engine_dir, memory_limit="unlimited", progress=False) as engine:
        assert engine.generate(ids, max_new_tokens=10).tokens == want
        small = engine.plan.minimum_bytes + 4 * engine.plan.expert_slot_bytes
    # a cache of 6 of the 32 experts: they are read back from the bundle again and again; the tokens do not change
    with Engine.from_pretrained(engine_dir, memory_limit=small, progress=False) as engine:
        assert engine.generate(ids, max_new_tokens=10).tokens == want
        assert engine.stats()["misses"] > engine.plan.capacity_experts
    assert materialise(path, progress=False) == engine_dir  # reused while the file is unchanged
    # the engine opens the .gguf file itself (through the same folder)
    with Engine.from_pretrained(path, memory_limit="unlimited", progress=False) as engine:
        assert engine.checkpoint_dir == engine_dir and engine.generate(ids, max_new_tokens=10).tokens == want


def test_default_model_exports_with_its_tokenizer_and_a_warning_about_llama_cpps_window(tmp_path):
    window = load_model("default").config.sliding_window_size  # the default model's window (64), not llama.cpp's
    with pytest.warns(GGUFExportWarning, match="window of 4096 tokens: its logits equal the workbench's only while "
                                               f"the context is at most {window} tokens"):
        path = export_gguf("default", tmp_path / "tiny.gguf", "bf16", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path)
        as_llama_cpp = read_gguf(path, layout="llama.cpp").config
    assert torch.equal(logits(model, IDS * 50), logits(load_model("default"), IDS * 50))
    assert as_llama_cpp.sliding_window_size == 4096 and model.config.sliding_window_size == window
    tok = load_gguf_tokenizer(path)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == \
        load_tokenizer("default").apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)


def test_cli_export_gguf(tmp_path, capsys):
    folder = checkpoint(tmp_path)
    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(folder), "--type", "q8_0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "warning: " in printed and "no tokenizer files" in printed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(logits(load_model(out)), logits(dequantised(load_model(folder), "q8_0")))
