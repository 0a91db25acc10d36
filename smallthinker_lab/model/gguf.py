"""GGUF in: a SmallThinker GGUF (llama.cpp's ``smallthinker`` architecture) as this project's config, weights and
tokenizer, read with ``gguf`` (the reader llama.cpp maintains).

The layout is the one llama.cpp's converter writes (conversion/smallthinker.py): ``token_embd``, ``output_norm``,
optional ``output`` (absent: tied to the embedding), per layer ``blk.N.attn_norm / attn_q / attn_k / attn_v /
attn_output / ffn_norm / ffn_gate_inp`` and the experts stacked as ``ffn_gate_exps / ffn_up_exps`` [E, F, H] and
``ffn_down_exps`` [E, H, F] (numpy order; ggml lists the dims reversed). RoPE is NeoX style, as the project's, so
q and k are stored unpermuted. Tensors of any type ``gguf.quants`` dequantises load (F32, F16, BF16, Q8_0, Q4_0,
the K-quants, ...), to float32 unless the weights are all BF16 or all F16.

How llama.cpp runs such a file (src/models/smallthinker.cpp): with a ``sliding_window`` key, every sliding layer
has a window of 4096 whatever the key says, the sliding layers are those of ``attention.sliding_window_pattern``
(default: all but every 4th, starting at layer 0) and the layers with ``il % 4 == 0`` are NoPE (unless the model has
exactly 4 layers); without the key, all layers are global with RoPE. ``layout="file"`` (default) reads the window
the file declares and the RoPE layout this project's exporter records (``smallthinker_lab.rope_layout``), warning
where llama.cpp would differ; ``layout="llama.cpp"`` reads the file exactly as llama.cpp runs it.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, Keys, quants
from gguf.constants import GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType

from .config import ConfigError, SmallThinkerConfig
from .layers import RotaryEmbedding
from .model import SmallThinkerForCausalLM

log = logging.getLogger(__name__)

ARCH = "smallthinker"
LLAMA_CPP_WINDOW = 4096  # llama.cpp's n_swa for SmallThinker, whatever the file says
LLAMA_CPP_PERIOD = 4  # one global NoPE layer in 4, from layer 0
ROPE_LAYOUT_KEY = "smallthinker_lab.rope_layout"  # written by this project's exporter; llama.cpp ignores it
EOS_IDS_KEY = "smallthinker_lab.eos_token_ids"  # config.json's eos list, which tokenizer.ggml.* holds one of
IGNORED_TENSORS = ("lm_head_profiler.weight",)  # PowerInfer's sparse LM-head predictor (engine/lm_head.py reads it)
# per layer: GGUF suffix -> HF suffix, as llama.cpp's tensor_mapping pairs them for SmallThinker
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "block_sparse_moe.primary_router",
}
EXPERT_TENSORS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
# the pre-tokenizer regex of Qwen2 (llama.cpp's "qwen2"), which SmallThinker's tokenizer uses
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")  # llama.cpp names of that regex


class GGUFError(ValueError):
    """A GGUF file that does not hold a SmallThinker model this project can read; the message names file and
    tensor or key."""


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".gguf")


# ---------------------------------------------------------------- names and shapes
def gguf_tensor_shapes(config: SmallThinkerConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape (the reverse of ggml's dims) of every tensor of a SmallThinker GGUF."""
    H, D, E, F = config.hidden_size, config.head_dim, config.num_experts, config.moe_ffn_hidden_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (config.vocab_size, H)}
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (H,), b + "attn_q.weight": (q, H), b + "attn_k.weight": (kv, H),
                b + "attn_v.weight": (kv, H), b + "attn_output.weight": (H, q), b + "ffn_norm.weight": (H,),
                b + "ffn_gate_inp.weight": (E, H), b + "ffn_gate_exps.weight": (E, F, H),
                b + "ffn_up_exps.weight": (E, F, H), b + "ffn_down_exps.weight": (E, H, F)}
    out["output_norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        out["output.weight"] = (config.vocab_size, H)
    return out


def hf_names(gguf_name: str, num_experts: int) -> list[str]:
    """The HF tensor name(s) one GGUF tensor holds (a stacked expert tensor holds one per expert)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return [fixed[gguf_name]]
    _, layer, kind, _ = gguf_name.split(".")
    if kind in EXPERT_TENSORS:
        m = EXPERT_TENSORS[kind]
        return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{m}.weight" for e in range(num_experts)]
    return [f"model.layers.{layer}.{LAYER_TENSORS[kind]}.weight"]


def llama_cpp_layouts(num_layers: int, sliding: bool, pattern=None) -> tuple[list[int], list[int]]:
    """(rope_layout, sliding_window_layout) as llama.cpp runs a SmallThinker of ``num_layers`` layers.

    ``pattern``: the file's ``attention.sliding_window_pattern`` (a per-layer list, a period, or None for 4)."""
    if not sliding:
        return [1] * num_layers, [0] * num_layers
    if isinstance(pattern, (list, tuple)):
        swa = [int(bool(v)) for v in pattern][:num_layers]
        swa += [0] * (num_layers - len(swa))
    else:
        n = LLAMA_CPP_PERIOD if pattern is None else int(pattern)
        swa = [int(n == 0 or i % n != 0) for i in range(num_layers)]
    step = LLAMA_CPP_PERIOD  # n_no_rope_layer_step; "no NoPE layer" when it equals the layer count
    rope = [int(step == num_layers or i % step != 0) for i in range(num_layers)]
    return rope, swa


# ---------------------------------------------------------------- reading
class _Reader(GGUFReader):
    """GGUFReader that names the tensor a truncated file cuts off (the stock one fails reshaping it)."""

    def __init__(self, path: Path, mode: str = "c") -> None:
        self._path = path
        super().__init__(path, mode)

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for f in fields:  # parts as the stock reader unpacks them: name length, name, n_dims, dims, type, offset
            name = bytes(f.parts[1]).decode("utf-8", "replace")
            try:
                kind = GGMLQuantizationType(int(f.parts[4][0]))
            except ValueError:
                raise GGUFError(f"{self._path}: tensor {name} has unknown ggml type id {int(f.parts[4][0])}") from None
            block, nbytes = GGML_QUANT_SIZES[kind]
            end = start_offs + int(f.parts[5][0]) + math.prod(int(d) for d in f.parts[3]) * nbytes // block
            if end > size:
                raise GGUFError(f"{self._path} is truncated: tensor {name} ends at byte {end} but the file has "
                                f"{size} bytes")
        return super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A ``gguf.GGUFReader`` over ``path`` (copy-on-write memory map), any failure as a GGUFError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return _Reader(path, "c")
    except GGUFError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ... on a damaged file
        raise GGUFError(f"{path} is truncated or not a GGUF file ({type(e).__name__}: {e})") from None


_MISSING = object()


def _meta(reader, key: str, default=_MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"{reader._path}: metadata key {key} is missing")
        return default
    value = field.contents()
    return value


@dataclass
class GGUFModel:
    """A validated SmallThinker GGUF: its config, its tensors by GGUF name, and notes on how llama.cpp differs."""

    path: Path
    config: SmallThinkerConfig
    tensors: dict  # GGUF name -> gguf ReaderTensor
    reader: object
    llama_cpp_differences: list[str]

    def tensor_types(self) -> dict[str, str]:
        return {n: t.tensor_type.name for n, t in self.tensors.items()}

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor (a uint8 view of the mapped file)."""
        t = self.tensors[name]
        return np.asarray(self.reader.data[t.data_offset:t.data_offset + t.n_bytes])

    def array(self, name: str) -> torch.Tensor:
        """One tensor in numpy shape order: F32 / F16 / BF16 / F64 as stored (views of the file), any other type
        dequantised to float32 by ``gguf.quants``."""
        T = GGMLQuantizationType
        t, shape = self.tensors[name], tuple(int(d) for d in reversed(self.tensors[name].shape))
        raw = self.raw(name)
        native = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.BF16: np.uint16}
        if t.tensor_type in native:
            out = torch.from_numpy(raw.view(native[t.tensor_type]).reshape(shape))
            return out.view(torch.bfloat16) if t.tensor_type == T.BF16 else out
        block, nbytes = GGML_QUANT_SIZES[t.tensor_type]
        data = quants.dequantize(raw.reshape(*shape[:-1], shape[-1] // block * nbytes), t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _supported(kind) -> bool:
    T = GGMLQuantizationType

    if kind in (T.F32, T.F16, T.BF16, T.F64):
        return True
    if kind not in GGML_QUANT_SIZES or kind in (T.I8, T.I16, T.I32, T.I64):
        return False
    block, nbytes = GGML_QUANT_SIZES[kind]
    try:  # gguf.quants has no registry query: ask it to dequantise one block
        quants.dequantize(np.zeros((1, nbytes), np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def read_gguf(path: str | os.PathLike, layout: str = "file", strict: bool = True) -> GGUFModel:
    """Open and validate a SmallThinker GGUF: architecture, metadata, every tensor's presence, shape and type.

    ``layout``: "file" or "llama.cpp" (module docstring). ``strict=False`` skips unexpected tensors with a warning.
    Raises GGUFError naming the file and the tensor or key."""
    if layout not in ("file", "llama.cpp"):
        raise ValueError(f"layout must be 'file' or 'llama.cpp', got {layout!r}")
    reader = open_gguf(path)
    path = reader._path
    arch = _meta(reader, "general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{path}: architecture {arch!r} is not {ARCH!r}: this workbench reads SmallThinker GGUFs only")
    tensors = {t.name: t for t in reader.tensors}
    config, differences = _config(reader, tensors, layout)
    expected = gguf_tensor_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise GGUFError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all; a SmallThinker GGUF "
                        f"of {config.num_hidden_layers} layers needs them)")
    for n in [n for n in tensors if n not in expected]:
        if n in IGNORED_TENSORS:
            log.info("%s: skipping tensor %s (not part of the model's forward)", path, n)
        elif strict:
            raise GGUFError(f"{path}: unexpected tensor {n}, which a SmallThinker GGUF of this metadata does not have")
        else:
            warnings.warn(f"{path}: skipping unexpected tensor {n}", stacklevel=2)
        del tensors[n]
    for n, shape in expected.items():
        t = tensors[n]
        got = tuple(int(d) for d in reversed(t.shape))
        if got != shape:
            raise GGUFError(f"{path}: tensor {n} has shape {list(got)} but the metadata needs {list(shape)} "
                            f"(numpy order; ggml lists dims reversed)")
        if not _supported(t.tensor_type):
            raise GGUFError(f"{path}: tensor {n} has type {t.tensor_type.name}, which gguf.quants cannot "
                            f"dequantise (weights must be floats or a ggml quantisation it implements)")
    for d in differences:
        warnings.warn(f"{path}: {d}", stacklevel=2)
    return GGUFModel(path, config, tensors, reader, differences)


def _config(reader, tensors: dict, layout: str) -> tuple[SmallThinkerConfig, list[str]]:
    path, a = reader._path, ARCH + "."
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    L = int(_meta(reader, a + "block_count"))
    H = int(_meta(reader, a + "embedding_length"))
    n_head = int(_meta(reader, a + "attention.head_count"))
    n_kv = int(_meta(reader, a + "attention.head_count_kv", n_head))
    head_dim = int(_meta(reader, a + "attention.key_length", H // max(n_head, 1)))
    if int(_meta(reader, a + "attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {a}attention.value_length differs from key_length; SmallThinker has one head_dim")
    ffn = _meta(reader, a + "expert_feed_forward_length", None)
    if ffn is None:
        ffn = _meta(reader, a + "feed_forward_length")
    scaling = _meta(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", "", None):
        raise GGUFError(f"{path}: {a}rope.scaling.type is {scaling!r}; SmallThinker uses no RoPE scaling")
    notes = []
    gating = _meta(reader, a + "expert_gating_func", None)
    if gating is None:
        notes.append(f"no {a}expert_gating_func key: routing with sigmoid, the released models' default (mainline "
                     f"llama.cpp refuses such a file, PowerInfer's fork routes with softmax)")
        softmax = False
    elif int(gating) in (ExpertGatingFuncType.SOFTMAX, ExpertGatingFuncType.SIGMOID):
        softmax = int(gating) == ExpertGatingFuncType.SOFTMAX
    else:
        raise GGUFError(f"{path}: {a}expert_gating_func {int(gating)} is neither softmax (1) nor sigmoid (2)")
    window = _meta(reader, a + "attention.sliding_window", None)
    sliding = window is not None and int(window) > 0
    pattern = _meta(reader, a + "attention.sliding_window_pattern", None)
    rope, swa = llama_cpp_layouts(L, sliding, pattern)
    size = LLAMA_CPP_WINDOW
    if layout == "file":
        stored_rope = _meta(reader, ROPE_LAYOUT_KEY, None)
        if stored_rope is not None:
            stored_rope = [int(v) for v in stored_rope]
            if stored_rope != rope:
                notes.append(f"llama.cpp applies RoPE on layers {_layers(rope, 1)} and none on {_layers(rope, 0)}; "
                             f"this model's rope_layout (key {ROPE_LAYOUT_KEY}) differs: llama.cpp's logits will "
                             f"not match")
            rope = stored_rope
        if sliding and int(window) != LLAMA_CPP_WINDOW:
            size = int(window)
            notes.append(f"the sliding layers have a window of {size} tokens; llama.cpp runs them with "
                         f"{LLAMA_CPP_WINDOW}, so its results match only while the context is at most {size} tokens")
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    eos = _meta(reader, EOS_IDS_KEY, None)
    if eos is None:
        eos = [int(v) for k in ("eos", "eot") if (v := _meta(reader, f"tokenizer.ggml.{k}_token_id", None)) is not None]
        eos = sorted(set(eos)) or None
    else:
        eos = [int(v) for v in eos]
    pad = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    vocab = int(tensors["token_embd.weight"].shape[1])
    try:
        config = SmallThinkerConfig(
            vocab_size=vocab, hidden_size=H, num_hidden_layers=L, num_attention_heads=n_head,
            num_key_value_heads=n_kv, head_dim=head_dim,
            max_position_embeddings=int(_meta(reader, a + "context_length")),
            rms_norm_eps=float(_meta(reader, Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH))),
            rope_theta=float(_meta(reader, a + "rope.freq_base", 10000.0)), rope_layout=rope,
            sliding_window_layout=swa, sliding_window_size=size,
            moe_num_primary_experts=int(_meta(reader, a + "expert_count")),
            moe_num_active_primary_experts=int(_meta(reader, a + "expert_used_count")),
            moe_ffn_hidden_size=int(ffn), moe_primary_router_apply_softmax=softmax,
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos), eos_token_id=eos,
            pad_token_id=None if pad is None else int(pad), torch_dtype="float32")
    except ConfigError as e:
        raise GGUFError(f"{path}: its metadata does not describe a SmallThinker model: {e}") from None
    return config, notes


def _layers(layout: list[int], value: int) -> str:
    ids = [str(i) for i, v in enumerate(layout) if v == value]
    return "[" + ", ".join(ids) + "]" if ids else "none"


# ---------------------------------------------------------------- weights and model
def default_dtype(model: GGUFModel) -> torch.dtype:
    """bfloat16 / float16 when every matrix but the routers (which llama.cpp keeps F32) is stored so; else float32,
    which holds every dequantised Q8_0 / Q4_0 / K-quant value exactly."""
    T = GGMLQuantizationType
    kinds = {t.tensor_type for n, t in model.tensors.items() if len(t.shape) > 1 and "ffn_gate_inp" not in n}
    return {frozenset({T.BF16}): torch.bfloat16, frozenset({T.F16}): torch.float16}.get(frozenset(kinds),
                                                                                        torch.float32)


def gguf_state_dict(model: GGUFModel, dtype: torch.dtype | None = None, experts: bool = True,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """HF name -> tensor (``experts=False``: only the non-expert weights), in ``dtype`` (default
    :func:`default_dtype`); a stacked expert tensor becomes one view per expert."""
    dtype = dtype or default_dtype(model)
    E = model.config.num_experts
    state = {}
    for name in gguf_tensor_shapes(model.config):
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if kind in EXPERT_TENSORS and not experts:
            continue
        t = model.array(name)
        if t.dtype != dtype or torch.device(device) != t.device:
            t = t.to(device=device, dtype=dtype)
        names = hf_names(name, E)
        for i, hf in enumerate(names):
            state[hf] = t[i] if len(names) > 1 else t
    return state


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
              strict: bool = True, layout: str = "file") -> SmallThinkerForCausalLM:
    """A SmallThinkerForCausalLM in eval mode from a SmallThinker GGUF (what ``load_model("x.gguf")`` calls).

    ``dtype`` None: :func:`default_dtype`. F32/F16/BF16 tensors in that dtype are views of the mapped file;
    quantised ones are dequantised with ``gguf.quants``. ``layout``: see the module docstring."""
    g = read_gguf(path, layout=layout, strict=strict)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    dtype = dtype or default_dtype(g)
    config = g.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    state = gguf_state_dict(g, dtype, device=device)
    with torch.device("meta"):
        model = SmallThinkerForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    return model.eval()


# ---------------------------------------------------------------- tokenizer
def load_gguf_tokenizer(path_or_model, chat_template: str | None = None):
    """The transformers tokenizer (PreTrainedTokenizerFast) a GGUF's ``tokenizer.ggml.*`` metadata describes:
    byte-level BPE from its tokens and merges, Qwen2's pre-tokenizer, its special tokens and chat template (ChatML
    when it has none). None when the file has no vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import CHATML_TEMPLATE

    reader = path_or_model.reader if isinstance(path_or_model, GGUFModel) else open_gguf(path_or_model)
    path = reader._path
    kind = _meta(reader, "tokenizer.ggml.model", None)
    if kind in (None, "none", "no_vocab"):
        return None
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; SmallThinker's tokenizer is byte-level BPE "
                        f"('gpt2')")
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in QWEN2_PRE:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; only Qwen2's pre-tokenizer ({', '.join(QWEN2_PRE)}) "
                        f"is supported, which SmallThinker uses")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = _meta(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # control (3) and user-defined (4) tokens are matched before BPE, as llama.cpp does
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                    for i in range(len(tokens)) if types[i] in (3, 4)])

    def token(key: str):
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id", None)
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    bos = token("bos")
    if _meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=token("eos"),
                                  pad_token=token("padding"), unk_token=token("unknown"),
                                  clean_up_tokenization_spaces=False)
    out.chat_template = chat_template or _meta(reader, "tokenizer.chat_template", None) or CHATML_TEMPLATE
    return out
