"""Opening an engine's parts: the dtype it computes in, the non-expert weights (a model built on the meta device,
only those tensors materialised), the tokenizer and the sparse LM head's predictor."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import FLOAT_DTYPES, expected_tensors, resolve_path
from ..model.config import SmallThinkerConfig
from ..model.layers import RotaryEmbedding
from ..model.model import SmallThinkerForCausalLM
from .bundle import checkpoint_tensors, is_expert_tensor


@contextmanager
def _skip_init():
    """Build modules without running their random init (on the meta device it only costs: torch routes
    ``normal_`` through its reference implementations, whose first use imports torch._dynamo, seconds)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved

def _probe_dtype(checkpoint_dir, dtype) -> torch.dtype:
    """The dtype an engine over this checkpoint computes in (for the backend choice, before it opens)."""
    folder = resolve_path(checkpoint_dir)
    config, stored = checkpoint_tensors(folder)  # checked before anything grows with config.json
    kinds = {stored[n][1] for n in expected_tensors(config) if not is_expert_tensor(n) and n in stored}
    return _resolve_dtype(dtype, kinds, config)

def _resolve_dtype(dtype, stored_kinds: set[str], config: SmallThinkerConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        value = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
        return value
    if len(stored_kinds) == 1 and next(iter(stored_kinds)) in FLOAT_DTYPES:
        return FLOAT_DTYPES[next(iter(stored_kinds))]
    return getattr(torch, config.torch_dtype)

def _load_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    from ..model.tokenizer import load_tokenizer

    return load_tokenizer(folder)

def _load_predictor(predictor, config: SmallThinkerConfig, device: torch.device):
    """An LMHeadPredictor, or one read from a file (safetensors / .pt flat tensor), on the engine's device."""
    if predictor is None:
        return None
    if isinstance(predictor, (str, os.PathLike)):
        from .lm_head import load_predictor

        predictor = load_predictor(predictor, config.hidden_size, config.vocab_size)
    if (predictor.hidden, predictor.vocab) != (config.hidden_size, config.vocab_size):
        raise ValueError(f"the LM-head predictor is for hidden {predictor.hidden} / vocab {predictor.vocab}, the model "
                         f"has {config.hidden_size} / {config.vocab_size}")
    return predictor.to(device).eval()


def load_non_experts(config: SmallThinkerConfig, stored: dict, names: list[str], dtype: torch.dtype,
                     device: torch.device) -> SmallThinkerForCausalLM:
    """The model with only its non-expert tensors, read from the checkpoint's files (``stored``: name -> (file,
    kind)); experts live in the bundle, never here."""
    from safetensors import safe_open

    with _skip_init(), torch.device("meta"):
        model = SmallThinkerForCausalLM(config)
    for layer in model.model.layers:
        layer.block_sparse_moe.experts = nn.ModuleList()  # experts live in the bundle, never here
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(stored[n][0], []).append(n)
    state = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for n in file_names:
                t = f.get_tensor(n)
                if t.dtype != dtype or t.device != device:
                    t = t.to(device=device, dtype=dtype)
                state[n] = t
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(f"non-expert weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"non-expert tensors left on the meta device: {left[:3]}")
    return model.eval().requires_grad_(False)
