"""smallthinker_lab: a workbench for understanding SmallThinker, an on-device Mixture-of-Experts LM."""

from .model import (
    ConfigError,
    GenerationStats,
    KVCache,
    SamplingConfig,
    SmallThinkerConfig,
    SmallThinkerForCausalLM,
    generate,
    kv_cache_bytes,
    stream_generate,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "GenerationStats", "KVCache", "SamplingConfig", "SmallThinkerConfig", "SmallThinkerForCausalLM",
    "generate", "kv_cache_bytes", "stream_generate",
]
