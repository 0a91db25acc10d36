"""The SmallThinker model: config, modules, KV cache, checkpoints, tokenizer, generation."""

from .checkpoint import CheckpointError, expected_tensors, load_model, save_pretrained, write_synthetic_checkpoint
from .config import ConfigError, SmallThinkerConfig
from .generate import GenerationStats, SamplingConfig, generate, stream_generate
from .hooks import HookRegistry
from .kv_cache import KVCache, kv_cache_bytes
from .model import SmallThinkerForCausalLM

__all__ = [
    "CheckpointError", "ConfigError", "GenerationStats", "HookRegistry", "KVCache", "SamplingConfig",
    "SmallThinkerConfig", "SmallThinkerForCausalLM", "expected_tensors", "generate", "kv_cache_bytes", "load_model",
    "save_pretrained", "stream_generate", "write_synthetic_checkpoint",
]
