"""smallthinker_lab: a workbench for understanding SmallThinker, an on-device Mixture-of-Experts LM.

The analysis modules (``plots``, ``tables``, ``widgets``, ``report``, ``quality``) load on first use:
``import smallthinker_lab as sl; sl.plots.plot_expert_heatmap(...)``.
"""

import importlib

from .engine import Engine, EngineBusy, EngineOptions, MemoryLimitError, convert
from .instruments import (
    Recording,
    cold_expert_share,
    expert_frequency,
    expert_usage_divergence,
    hit_rate_curves,
    hit_rates,
    hot_expert_share,
    io_wait_share,
    kv_footprint,
    lru_hit_curve,
    neuron_sparsity_by_expert,
    neuron_sparsity_by_layer,
    policy_hit_curve,
    profile,
    record,
    throughput,
    time_breakdown,
    trace_from_recording,
)
from .model import (
    CausalLMOutput,
    CheckpointError,
    ConfigError,
    DenseConfig,
    DenseForCausalLM,
    DenseModelError,
    GenerationResult,
    GenerationStats,
    KVCache,
    SamplingConfig,
    SmallThinkerConfig,
    SmallThinkerForCausalLM,
    SpeculativeStats,
    expected_tensors,
    generate,
    kv_cache_bytes,
    load_model,
    save_pretrained,
    stream_generate,
    write_synthetic_checkpoint,
)
from .model.tokenizer import apply_chat_template, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CausalLMOutput", "CheckpointError", "ConfigError", "DenseConfig", "DenseForCausalLM", "DenseModelError",
    "GenerationResult", "GenerationStats", "KVCache",
    "SamplingConfig", "SmallThinkerConfig", "SmallThinkerForCausalLM", "SpeculativeStats", "expected_tensors",
    "generate",
    "kv_cache_bytes", "load_model", "save_pretrained", "stream_generate", "write_synthetic_checkpoint",
]
__all__ += [
    "Recording", "cold_expert_share", "expert_frequency", "expert_usage_divergence", "hit_rate_curves", "hit_rates",
    "hot_expert_share", "io_wait_share", "kv_footprint", "lru_hit_curve", "neuron_sparsity_by_expert",
    "neuron_sparsity_by_layer", "policy_hit_curve", "profile", "record", "throughput", "time_breakdown",
    "trace_from_recording",
]
__all__ += ["Engine", "EngineBusy", "EngineOptions", "MemoryLimitError", "convert"]
__all__ += ["apply_chat_template", "load_tokenizer"]

# analysis modules: imported when first named (they pull in matplotlib, ipywidgets and the report's dependencies)
_SUBMODULES = ("plots", "tables", "widgets", "report", "quality")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
