"""SmallThinkerConfig: the exact config.json keys of the released SmallThinker models.

The field names are the Hugging Face ``config.json`` keys, so a config read from a
checkpoint folder and written back is the same file (unknown keys are kept in
``extra`` and written back verbatim).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a SmallThinker model."""


# the keys that are sizes: each a positive integer
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "moe_num_primary_experts", "moe_num_active_primary_experts", "moe_ffn_hidden_size", "sliding_window_size",
    "max_position_embeddings",
)


@dataclass
class SmallThinkerConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    num_hidden_layers: int = 32
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1.5e6
    rope_scaling: dict | None = None
    # per layer: 1 = RoPE, 0 = NoPE
    rope_layout: list[int] | None = None
    # per layer: 1 = sliding window of sliding_window_size, 0 = global causal attention
    sliding_window_layout: list[int] | None = None
    sliding_window_size: int = 4096
    moe_num_primary_experts: int = 32
    moe_num_active_primary_experts: int = 4
    moe_ffn_hidden_size: int = 768
    # False (the released default): sigmoid of the top-k logits, renormalised; True: softmax over the top-k
    moe_primary_router_apply_softmax: bool = False
    norm_topk_prob: bool = True  # present in the released files, never read by the reference code
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151643, 151645])
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "smallthinker"
    architectures: list[str] = field(default_factory=lambda: ["SmallThinkerForCausalLM"])
    use_cache: bool = True
    # keys of config.json this class does not know; written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()  # before anything is built from the values (the layouts below)
        if self.rope_layout is None:
            self.rope_layout = [1] * self.num_hidden_layers
        if self.sliding_window_layout is None:
            self.sliding_window_layout = [0] * self.num_hidden_layers
        self.rope_layout = [int(v) for v in self.rope_layout]
        self.sliding_window_layout = [int(v) for v in self.sliding_window_layout]
        self.validate()

    # ------------------------------------------------------------------ checks
    def _check_types(self) -> None:
        """Every key of the right JSON type and range: a string, a bool, a negative, NaN or infinite number where
        a size, a rate or a flag belongs raises ConfigError naming the key and the value."""

        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"invalid SmallThinker config: {name} must be {want}, got {getattr(self, name)!r}"
                               f" ({type(getattr(self, name)).__name__})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.model_type, str):
            raise bad("model_type", "a string")
        for name in _POSITIVE_INTS:
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            if not (is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a positive finite number")
        if not (is_number(self.attention_dropout) and 0 <= self.attention_dropout < 1):
            raise bad("attention_dropout", "a number in [0, 1)")
        if not (is_number(self.initializer_range) and self.initializer_range >= 0):
            raise bad("initializer_range", "a finite number >= 0")
        for name in ("moe_primary_router_apply_softmax", "norm_topk_prob", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 0):
                raise bad(name, "a token id (an integer >= 0) or null")
        eos = self.eos_token_id
        if eos is not None and not (is_int(eos) and eos >= 0) and not (
                isinstance(eos, list) and all(is_int(t) and t >= 0 for t in eos)):
            raise bad("eos_token_id", "a token id, a list of token ids or null")
        if not isinstance(self.torch_dtype, str):
            raise bad("torch_dtype", "a dtype name such as \"bfloat16\"")
        for name in ("rope_layout", "sliding_window_layout"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, list) and all(is_int(x) or isinstance(x, bool) for x in v)):
                raise bad(name, "a list of 0/1 integers (one per layer) or null")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise bad("rope_scaling", "an object or null")
        if not (isinstance(self.architectures, list) and all(isinstance(a, str) for a in self.architectures)):
            raise bad("architectures", "a list of strings")

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid SmallThinker config: {msg}")

        self._check_types()
        if self.model_type != "smallthinker":
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: smallthinker_lab loads model_type 'smallthinker' "
                f"(MoE) and 'qwen2' (dense, DenseConfig)"
            )
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        L = self.num_hidden_layers
        need(len(self.rope_layout) == L,
             f"rope_layout has {len(self.rope_layout)} entries but num_hidden_layers is {L}")
        need(len(self.sliding_window_layout) == L,
             f"sliding_window_layout has {len(self.sliding_window_layout)} entries but num_hidden_layers is {L}")
        need(set(self.rope_layout) <= {0, 1},
             f"rope_layout entries must be 0 or 1, got {sorted(set(self.rope_layout))}")
        need(set(self.sliding_window_layout) <= {0, 1},
             f"sliding_window_layout entries must be 0 or 1, got {sorted(set(self.sliding_window_layout))}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.moe_num_active_primary_experts <= self.moe_num_primary_experts,
             f"moe_num_active_primary_experts ({self.moe_num_active_primary_experts}) is larger than "
             f"moe_num_primary_experts ({self.moe_num_primary_experts})")
        need(self.head_dim % 2 == 0 or not any(self.rope_layout),
             f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                 f"{name} must be a positive finite number, got {v!r}")
        if self.rope_scaling not in (None, {}):
            raise ConfigError(f"rope_scaling {self.rope_scaling!r} is not supported (the released models use none)")

    # ------------------------------------------------------------ derived sizes
    @property
    def num_experts(self) -> int:
        return self.moe_num_primary_experts

    @property
    def top_k(self) -> int:
        return self.moe_num_active_primary_experts

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window_layout[layer])

    def uses_rope(self, layer: int) -> bool:
        return bool(self.rope_layout[layer])

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def layer_table(self):
        """One row per layer: attention kind, window, position encoding, experts (a pandas DataFrame)."""
        import pandas as pd

        rows = []
        for i in range(self.num_hidden_layers):
            rows.append({
                "layer": i,
                "attention": "sliding" if self.is_sliding(i) else "global",
                "window": self.sliding_window_size if self.is_sliding(i) else None,
                "positions": "RoPE" if self.uses_rope(i) else "NoPE",
                "experts": self.num_experts,
                "top_k": self.top_k,
                "expert_ffn": self.moe_ffn_hidden_size,
            })
        return pd.DataFrame(rows).set_index("layer")

    # ---------------------------------------------------------------- json i/o
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmallThinkerConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if "model_type" not in d:
            raise ConfigError("config.json has no model_type: is this a SmallThinker checkpoint?")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SmallThinkerConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}): not a config.json"
                              ) from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, got a JSON {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        d = self.to_dict()
        path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        return path

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SmallThinkerConfig:
        key = name.lower()
        if key not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        kwargs = dict(PRESETS[key]())
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> SmallThinkerConfig:
        d = asdict(self)
        d.update(changes)
        return SmallThinkerConfig(**d)


def hybrid_layouts(num_layers: int, period: int = 4) -> tuple[list[int], list[int]]:
    """SmallThinker's 1 NoPE-global : 3 RoPE-sliding pattern: (rope_layout, sliding_window_layout)."""
    rope = [0 if i % period == 0 else 1 for i in range(num_layers)]
    return rope, list(rope)


def _preset_4b() -> dict:
    return dict(
        vocab_size=151936, hidden_size=1536, num_hidden_layers=32, num_attention_heads=12, num_key_value_heads=2,
        head_dim=128, max_position_embeddings=32768, rope_theta=1.5e6, sliding_window_size=4096,
        rope_layout=[1] * 32, sliding_window_layout=[0] * 32, moe_num_primary_experts=32,
        moe_num_active_primary_experts=4, moe_ffn_hidden_size=768, tie_word_embeddings=True,
        extra={"model_name": "smallthinker_4b_instruct", "tokenizer_class": "Qwen2Tokenizer"},
    )


def _preset_21b() -> dict:
    rope, swa = hybrid_layouts(52)
    return dict(
        vocab_size=151936, hidden_size=2560, num_hidden_layers=52, num_attention_heads=28, num_key_value_heads=4,
        head_dim=128, max_position_embeddings=16384, rope_theta=1.5e6, sliding_window_size=4096,
        rope_layout=rope, sliding_window_layout=swa, moe_num_primary_experts=64,
        moe_num_active_primary_experts=6, moe_ffn_hidden_size=768, tie_word_embeddings=False,
        extra={"model_name": "smallthinker_21b_instruct", "tokenizer_class": "Qwen2Tokenizer"},
    )


def _preset_tiny() -> dict:
    # the shipped default model (data/models/smallthinker-tiny): SmallThinker's shape at small scale
    rope, swa = hybrid_layouts(8)
    return dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=2048, rope_theta=10000.0, sliding_window_size=128,
        rope_layout=rope, sliding_window_layout=swa, moe_num_primary_experts=32,
        moe_num_active_primary_experts=4, moe_ffn_hidden_size=64, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0, torch_dtype="bfloat16",
    )


def _preset_tiny_wide() -> dict:
    # closer to SmallThinker's proportions: experts half the hidden size wide (the paper's 768 of 1536), 2 of 16
    # active (1/8, as 4 of 32 in the 4B model), a window of 64 tokens (shorter than most prompts: 46-280 tokens)
    d = _preset_tiny()
    d.update(moe_num_primary_experts=16, moe_num_active_primary_experts=2, moe_ffn_hidden_size=128,
             sliding_window_size=64)
    return d


def _preset_test() -> dict:
    # a few-kB model for unit tests: hybrid layers, a window shorter than the test sequences
    rope, swa = hybrid_layouts(4)
    return dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, rope_theta=10000.0, sliding_window_size=8,
        rope_layout=rope, sliding_window_layout=swa, moe_num_primary_experts=8,
        moe_num_active_primary_experts=2, moe_ffn_hidden_size=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=[1], pad_token_id=0, torch_dtype="float32",
    )


def _preset_test_tied() -> dict:
    d = _preset_test()
    d.update(tie_word_embeddings=True, moe_primary_router_apply_softmax=True)
    return d


PRESETS = {
    "smallthinker-4b-a0.6b": _preset_4b,
    "smallthinker-21b-a3b": _preset_21b,
    "smallthinker-tiny": _preset_tiny,
    "smallthinker-tiny-wide": _preset_tiny_wide,
    "smallthinker-test": _preset_test,
    "smallthinker-test-tied": _preset_test_tied,
}
