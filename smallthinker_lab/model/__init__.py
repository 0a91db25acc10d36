"""The SmallThinker model: config, modules, KV cache, checkpoints, tokenizer, generation."""

from .config import ConfigError, SmallThinkerConfig
from .generate import GenerationStats, SamplingConfig, generate, stream_generate
from .hooks import HookRegistry
from .kv_cache import KVCache, kv_cache_bytes
from .model import SmallThinkerForCausalLM

__all__ = [
    "ConfigError", "GenerationStats", "HookRegistry", "KVCache", "SamplingConfig", "SmallThinkerConfig",
    "SmallThinkerForCausalLM", "generate", "kv_cache_bytes", "stream_generate",
]
