"""GGUF out: a checkpoint folder written as llama.cpp's converter writes it (architecture ``smallthinker``).

Names, shapes and metadata follow convert_hf_to_gguf.py's SmallThinker class: experts stacked per layer, norms and
routers kept F32, every other matrix in the chosen type (``q4_0`` as ``llama-quantize --pure`` makes it), the
tokenizer as ``tokenizer.ggml.*`` (byte-level BPE with Qwen2's pre-tokenizer) through ``gguf.SpecialVocab``.
Quantisation is ``gguf.quants`` (bit-equal to ggml's reference quantisers). Three keys beyond the converter's
keep what its keys cannot say: ``attention.sliding_window_pattern`` (which llama.cpp reads) when the sliding
layers are not its default 1-global-in-4, and ``smallthinker_lab.rope_layout`` / ``smallthinker_lab.eos_token_ids``
(ignored by llama.cpp), so the file reads back as exactly this model. What llama.cpp will run differently is
warned about (:func:`llama_cpp_differences`).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, QuantError, SpecialVocab, TokenType, quants
from gguf.constants import ExpertGatingFuncType, GGMLQuantizationType

from .checkpoint import CONFIG_FILE, load_model, resolve_path
from .config import SmallThinkerConfig
from .gguf import (
    ARCH,
    EOS_IDS_KEY,
    LLAMA_CPP_WINDOW,
    QWEN2_PATTERN,
    ROPE_LAYOUT_KEY,
    gguf_tensor_shapes,
    hf_names,
    llama_cpp_layouts,
    read_gguf,
)

T = GGMLQuantizationType
EXPORT_TYPES = {"f32": (T.F32, LlamaFileType.ALL_F32), "f16": (T.F16, LlamaFileType.MOSTLY_F16),
                "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
                "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0)}


class GGUFExportWarning(UserWarning):
    """llama.cpp will run the exported file differently from this workbench (the message says how)."""


def llama_cpp_differences(config: SmallThinkerConfig) -> list[str]:
    """How llama.cpp runs a GGUF of this model differently from the model itself (empty: identically)."""
    out = []
    sliding = any(config.sliding_window_layout)
    rope, _ = llama_cpp_layouts(config.num_hidden_layers, sliding, config.sliding_window_layout)
    if sliding and config.sliding_window_size != LLAMA_CPP_WINDOW:
        w = config.sliding_window_size
        out.append(f"sliding_window_size is {w}, but llama.cpp runs every sliding layer with a window of "
                   f"{LLAMA_CPP_WINDOW} tokens: its logits equal the workbench's only while the context is at most "
                   f"{w} tokens")
    if rope != config.rope_layout:
        where = [i for i, (a, b) in enumerate(zip(rope, config.rope_layout)) if a != b]
        out.append(f"llama.cpp puts RoPE on {'all layers' if all(rope) else 'all but layers ' + str(_zeros(rope))} "
                   f"(it derives NoPE layers from the sliding window: every 4th from layer 0, none without a "
                   f"window), but this model's rope_layout differs at layers {where}: llama.cpp's logits will differ "
                   f"from the first token on")
    return out


def _zeros(layout: list[int]) -> list[int]:
    return [i for i, v in enumerate(layout) if not v]


def _tensor_type(name: str, ndim: int, wanted: T) -> T:
    """As the converter: norms, 1-D tensors and the routers (ffn_gate_inp) F32, everything else ``wanted``."""
    if ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return T.F32
    return wanted


def _encode(name: str, t: torch.Tensor, kind: T) -> tuple[np.ndarray, T]:
    """The tensor's bytes in ``kind`` (falls back to F16 where the block size does not divide the rows, as the
    converter does), and the type actually written."""
    if kind == T.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8), kind
    x = t.to(torch.float32).contiguous().numpy()
    if kind == T.F32:
        return x, kind
    if kind == T.F16:
        return x.astype(np.float16), kind
    try:
        return quants.quantize(x, kind), kind
    except QuantError as e:
        warnings.warn(f"{name}: {e}; writing it as F16", GGUFExportWarning, stacklevel=3)
        return x.astype(np.float16), T.F16


def _tokenizer_metadata(writer: GGUFWriter, folder: Path, vocab_size: int) -> bool:
    """tokenizer.ggml.* from the checkpoint's tokenizer files, as the converter's _set_vocab_gpt2 writes them.
    False (nothing written) when the folder has no tokenizer."""
    from .tokenizer import load_tokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return False
    tok = load_tokenizer(folder)
    if not _qwen2_pre_tokenizer(tok):
        raise ValueError(f"{folder}: the tokenizer's pre-tokenizer is not Qwen2's byte-level split, the only one this "
                         f"exporter writes (llama.cpp's 'qwen2')")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{folder}: the tokenizer has token id {max(vocab.values())}, beyond the model's vocab_size "
                         f"{vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            special = decoder[i].special or (t.startswith("<|") and t.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(t)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    for typ, added_at in (("bos", full[:1] != plain[:1]), ("eos", full[-1:] != plain[-1:])):  # what encode adds
        special.add_special_token.setdefault(typ, bool(added_at))
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template  # the ChatML template load_tokenizer sets
    special.add_to_gguf(writer, quiet=True)
    return True


def _qwen2_pre_tokenizer(tok) -> bool:
    """Whether the tokenizer splits as Qwen2's does (its regex, then byte-level), what llama.cpp calls 'qwen2'."""
    if type(tok).__name__.startswith("Qwen2Tokenizer"):
        return True
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    return any(s.get("type") == "Split" and s.get("pattern", {}).get("Regex") == QWEN2_PATTERN for s in steps) \
        and any(s.get("type") == "ByteLevel" for s in steps)


def _architecture(config: SmallThinkerConfig) -> dict:
    """What a GGUF stores of a config (floats as the float32 it holds them in)."""
    d = {k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rope_layout", "sliding_window_layout", "moe_num_primary_experts",
        "moe_num_active_primary_experts", "moe_ffn_hidden_size", "moe_primary_router_apply_softmax",
        "tie_word_embeddings")}
    d |= {"rms_norm_eps": float(np.float32(config.rms_norm_eps)), "rope_theta": float(np.float32(config.rope_theta)),
          "eos": config.eos_ids(), "window": config.sliding_window_size if any(config.sliding_window_layout) else None}
    return d


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, type: str = "bf16",
                progress: bool = True) -> Path:
    """Write ``checkpoint`` (a folder in the HF layout, or "default") as a SmallThinker GGUF at ``out``.

    ``type``: "bf16", "q8_0", "q4_0" (every matrix but the routers; llama-quantize --pure), "f16" or "f32".
    Warns (:class:`GGUFExportWarning`) where llama.cpp will run the file differently from the model, and when the
    folder has no tokenizer (llama.cpp needs one to run a file). Written under a temporary name, read back and
    checked, then renamed. Returns the path."""
    if type not in EXPORT_TYPES:
        raise ValueError(f"type must be one of {', '.join(EXPORT_TYPES)}, got {type!r}")
    wanted, file_type = EXPORT_TYPES[type]
    folder = resolve_path(checkpoint)
    config = SmallThinkerConfig.from_json(folder / CONFIG_FILE)
    model = load_model(folder)  # validated; its tensors are views of the mapped files
    state = model.state_dict()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, ARCH)
    _model_metadata(writer, config, folder.name, file_type)
    if not _tokenizer_metadata(writer, folder, config.vocab_size):
        warnings.warn(f"{folder} has no tokenizer files: the GGUF has no vocabulary, so llama.cpp cannot run it "
                      f"(this workbench can)", GGUFExportWarning, stacklevel=2)
    for note in llama_cpp_differences(config):
        warnings.warn(f"{folder}: {note}", GGUFExportWarning, stacklevel=2)

    shapes = gguf_tensor_shapes(config)

    def tensor(name: str) -> torch.Tensor:
        names = hf_names(name, config.num_experts)
        return torch.stack([state[n] for n in names]) if len(names) > 1 else state[names[0]]

    # tensor infos first (they precede the data in the file), then the data tensor by tensor: one layer's stacked
    # experts are in memory at a time
    kinds = {n: _tensor_type(n, len(s), wanted) for n, s in shapes.items()}
    for name, shape in shapes.items():
        kind = kinds[name]
        if kind in (T.Q4_0, T.Q8_0) and shape[-1] % quants.GGML_QUANT_SIZES[kind][0]:
            kinds[name] = kind = T.F16  # as _encode falls back
        block, nbytes = quants.GGML_QUANT_SIZES[kind]
        byte_shape = (*shape[:-1], shape[-1] // block * nbytes)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shapes), desc=f"writing {out.name} ({type})", unit="tensor", leave=False)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in shapes:
            data, kind = _encode(name, tensor(name), kinds[name])
            writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
            if bar is not None:
                bar.update(1)
        writer.close()
        with warnings.catch_warnings():  # its layout notes were just given
            warnings.simplefilter("ignore")
            back = read_gguf(tmp)
        if _architecture(back.config) != _architecture(config):
            raise RuntimeError(f"{tmp}: the written GGUF does not read back as {folder}'s config")
        os.replace(tmp, out)
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)
    return out


def _model_metadata(writer: GGUFWriter, config: SmallThinkerConfig, name: str, file_type: LlamaFileType) -> None:
    """The converter's keys (TextModel.set_gguf_parameters + SmallThinkerModel's), in its order."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.top_k)
    writer.add_expert_feed_forward_length(config.moe_ffn_hidden_size)
    writer.add_feed_forward_length(config.moe_ffn_hidden_size)
    writer.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX if config.moe_primary_router_apply_softmax
                                  else ExpertGatingFuncType.SIGMOID)
    if any(config.sliding_window_layout):
        writer.add_sliding_window(config.sliding_window_size)
        _, default = llama_cpp_layouts(config.num_hidden_layers, True)
        if config.sliding_window_layout != default:  # llama.cpp reads this array instead of its 1-in-4 default
            writer.add_sliding_window_pattern([bool(v) for v in config.sliding_window_layout])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_array(ROPE_LAYOUT_KEY, [int(v) for v in config.rope_layout])
    writer.add_array(EOS_IDS_KEY, config.eos_ids())


# ---------------------------------------------------------------- command line
def register(sub) -> None:
    p = sub.add_parser("export-gguf", help="write a checkpoint as a GGUF file that llama.cpp runs",
                       description="Write a checkpoint folder as a SmallThinker GGUF: the names, shapes, metadata "
                                   "and tokenizer llama.cpp's converter writes. Warns where llama.cpp will run "
                                   "the file differently from the model (e.g. a sliding window other than 4096).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder in the Hugging Face layout, or 'default'")
    p.add_argument("--type", choices=list(EXPORT_TYPES), default="bf16",
                   help="weight type of the matrices (norms and routers stay F32); q4_0 as llama-quantize --pure")
    p.add_argument("-o", "--output", default=None,
                   help="GGUF file to write (default: <checkpoint name>-<TYPE>.gguf in the current folder)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    folder = resolve_path(args.checkpoint)
    out = Path(args.output or f"{folder.name}-{args.type.upper()}.gguf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GGUFExportWarning)
        export_gguf(folder, out, args.type)
    for w in caught:
        print(f"warning: {w.message}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0
