"""The SmallThinker model: config, modules, KV cache, checkpoints, tokenizer, generation."""

from .checkpoint import CheckpointError, expected_tensors, load_model, save_pretrained, write_synthetic_checkpoint
from .config import ConfigError, SmallThinkerConfig
from .dense import DenseForCausalLM, DenseModelError
from .dense_config import DenseConfig
from .generate import GenerationResult, GenerationStats, SamplingConfig, generate, stream_generate
from .hooks import HookRegistry
from .kv_cache import KVCache, kv_cache_bytes
from .model import CausalLMOutput, SmallThinkerForCausalLM
from .speculative import SpeculativeStats

__all__ = [
    "CausalLMOutput", "CheckpointError", "ConfigError", "DenseConfig", "DenseForCausalLM", "DenseModelError",
    "GenerationResult", "GenerationStats", "HookRegistry",
    "KVCache", "SamplingConfig", "SmallThinkerConfig", "SmallThinkerForCausalLM", "SpeculativeStats",
    "expected_tensors", "generate",
    "kv_cache_bytes", "load_model", "save_pretrained", "stream_generate", "write_synthetic_checkpoint",
]
