"""DenseConfig: the config.json keys of Qwen2-architecture checkpoints (model_type "qwen2").

SmallThinker-3B-Preview, the dense member of the SmallThinker family, is a fine-tune of Qwen2.5-3B-Instruct, so its
files are Qwen2ForCausalLM's. The field names are transformers' Qwen2Config keys (both the 4.x spelling
``rope_theta``/``torch_dtype`` and the 5.x ``rope_parameters``/``dtype`` are read); unknown keys are kept in
``extra`` and written back. The class answers the questions the project's attention and KV cache ask of a config
(``head_dim``, ``uses_rope``, ``is_sliding``, ``sliding_window_size``), so both are reused unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ConfigError

MODEL_TYPE = "qwen2"

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")


@dataclass
class DenseConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen2's rule)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # None: from rope_parameters, else 10000 (transformers' default)
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers 5.x: {"rope_type": "default", "rope_theta": ...}
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer
    attention_bias: bool = True  # not a Qwen2 key (Qwen2 always has q/k/v biases); False: a checkpoint without them
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_theta is None:
            self.rope_theta = float((self.rope_parameters or {}).get("rope_theta", 10000.0))
        if self.layer_types is None:
            window = self.sliding_window if self.use_sliding_window else None
            self.layer_types = ["sliding_attention" if window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        self.validate()

    def _check_types(self) -> None:
        def bad(name: str, want: str) -> ConfigError:
            v = getattr(self, name)
            return ConfigError(f"invalid Qwen2 config: {name} must be {want}, got {v!r} ({type(v).__name__})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in _POSITIVE_INTS:
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a positive integer")
        for name in ("head_dim", "sliding_window"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v > 0):
                raise bad(name, "a positive integer or null")
        if not (is_int(self.max_window_layers) and self.max_window_layers >= 0):
            raise bad("max_window_layers", "an integer >= 0")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if v is not None and not (is_number(v) and v > 0):
                raise bad(name, "a positive finite number")
        for name in ("use_sliding_window", "attention_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if not (is_number(self.attention_dropout) and 0 <= self.attention_dropout < 1):
            raise bad("attention_dropout", "a number in [0, 1)")
        if not (is_number(self.initializer_range) and self.initializer_range >= 0):
            raise bad("initializer_range", "a finite number >= 0")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 0):
                raise bad(name, "a token id (an integer >= 0) or null")
        eos = self.eos_token_id
        if eos is not None and not (is_int(eos) and eos >= 0) and not (
                isinstance(eos, list) and all(is_int(t) and t >= 0 for t in eos)):
            raise bad("eos_token_id", "a token id, a list of token ids or null")
        for name in ("hidden_act", "torch_dtype", "model_type"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in ("rope_scaling", "rope_parameters"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise bad(name, "an object or null")
        lt = self.layer_types
        if lt is not None and not (isinstance(lt, list) and all(isinstance(t, str) for t in lt)):
            raise bad("layer_types", "a list of strings (one per layer) or null")

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid Qwen2 config: {msg}")

        if self.model_type != MODEL_TYPE:
            raise ConfigError(f"unknown model_type {self.model_type!r}: DenseConfig describes model_type "
                              f"{MODEL_TYPE!r} (Qwen2ForCausalLM)")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (Qwen2's SiLU-gated MLP), got {self.hidden_act!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) is not divisible by num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        kinds = set(self.layer_types) - {"full_attention", "sliding_attention"}
        need(not kinds, f"layer_types entries must be 'full_attention' or 'sliding_attention', got {sorted(kinds)}")
        need("sliding_attention" not in self.layer_types or self.sliding_window is not None,
             "layer_types has sliding_attention layers but sliding_window is null")
        rp = self.rope_parameters
        if rp is not None:
            need(rp.get("rope_type", "default") == "default",
                 f"rope_parameters {rp!r} is not supported (only the default, unscaled RoPE)")
            theta = rp.get("rope_theta", self.rope_theta)
            need(theta == self.rope_theta, f"rope_theta {self.rope_theta} disagrees with rope_parameters {rp!r}")
        if self.rope_scaling not in (None, {}):
            raise ConfigError(f"rope_scaling {self.rope_scaling!r} is not supported (Qwen2.5-3B uses none)")

    # ---------------------------------------------- what attention and the KV cache ask
    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def sliding_window_size(self) -> int:
        return self.sliding_window if self.sliding_window is not None else self.max_position_embeddings

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def uses_rope(self, layer: int) -> bool:
        return True

    @property
    def rope_layout(self) -> list[int]:
        return [1] * self.num_hidden_layers

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ------------------------------------------------------------ sizes
    def parameter_count(self, include_embeddings: bool = True) -> int:
        """Parameters from the shapes alone (a tied head counts once), so a 3B model is counted without memory."""
        H, F, D = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * D, self.num_key_value_heads * D
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * H * F + 2 * H
        n = self.num_hidden_layers * layer + H
        if include_embeddings:
            n += self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return n

    def ffn_bytes_per_token(self, bytes_per_weight: float = 2.0) -> float:
        """FFN weight bytes one decode token reads: every layer's gate, up and down (a dense model reads them all)."""
        return self.num_hidden_layers * 3 * self.hidden_size * self.intermediate_size * bytes_per_weight

    # ---------------------------------------------------------------- json i/o
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if "model_type" not in d:
            raise ConfigError("config.json has no model_type: is this a Qwen2 checkpoint?")
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):  # transformers 5.x writes "dtype"
            kwargs["torch_dtype"] = d["dtype"]
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DenseConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not a JSON config ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, got a JSON {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DenseConfig:
        key = name.lower()
        if key not in DENSE_PRESETS:
            raise KeyError(f"unknown dense preset {name!r}; known presets: {', '.join(sorted(DENSE_PRESETS))}")
        kwargs = dict(DENSE_PRESETS[key]())
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> DenseConfig:
        d = asdict(self)
        d.update(changes)
        return DenseConfig(**d)


def _preset_3b_preview() -> dict:
    # SmallThinker-3B-Preview = Qwen2.5-3B-Instruct's shape: 3.09 B parameters, 2.77 B without the (tied) embedding
    return dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        sliding_window=32768, max_window_layers=70, use_sliding_window=False, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    )


def _preset_test() -> dict:
    # a few-kB dense model for unit tests, with the default model's small test vocabulary
    return dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=[1], pad_token_id=0, torch_dtype="float32",
    )


def _preset_tiny_draft() -> dict:
    # the draft shipped beside the default model (data/models/smallthinker-tiny-draft): its vocabulary, special ids,
    # hidden size (so it can start from the target's embedding) and attention shape, 2 layers with a dense
    # SiLU MLP, every layer over a sliding window of the 128 tokens it is trained on
    return dict(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
        use_sliding_window=True, sliding_window=128, max_window_layers=0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0, torch_dtype="bfloat16",
    )


DENSE_PRESETS = {
    "smallthinker-3b-preview": _preset_3b_preview,
    "smallthinker-tiny-draft": _preset_tiny_draft,
    "dense-test": _preset_test,
}
