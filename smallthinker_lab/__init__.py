"""smallthinker_lab: a workbench for understanding SmallThinker, an on-device Mixture-of-Experts LM.

The root holds what a user needs (load_model, generate, Engine, record, profile, ...); the derived metrics are
``sl.metrics`` and the analysis modules (``plots``, ``tables``, ``widgets``, ``report``, ``quality``) load on first
use: ``import smallthinker_lab as sl; sl.plots.plot_expert_heatmap(sl.metrics.expert_frequency(df))``.
"""

import importlib

from .engine import Engine, EngineBusy, EngineOptions, MemoryLimitError, convert
from .instruments import Recording, profile, record
from .interventions import (
    RoutingTrace,
    causal_specialisation,
    hook_points_table,
    hooks,
    intervene,
    logit_lens,
    record_routing,
    replay,
)
from .model import (
    CheckpointError,
    ConfigError,
    DenseConfig,
    DenseForCausalLM,
    DenseModelError,
    GenerationResult,
    SmallThinkerConfig,
    SmallThinkerForCausalLM,
    generate,
    kv_cache_bytes,
    load_model,
    save_pretrained,
    stream_generate,
)
from .model.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DenseConfig", "DenseForCausalLM", "DenseModelError", "Engine",
    "EngineBusy", "EngineOptions", "GenerationResult", "MemoryLimitError", "Recording", "SmallThinkerConfig",
    "SmallThinkerForCausalLM", "convert", "generate", "kv_cache_bytes", "load_model", "load_tokenizer", "profile",
    "record", "save_pretrained", "stream_generate",
]
__all__ += ["RoutingTrace", "causal_specialisation", "hook_points_table", "hooks", "intervene", "logit_lens",
            "record_routing", "replay"]

# analysis modules: imported when first named (they pull in matplotlib, ipywidgets and the report's dependencies)
_SUBMODULES = {"plots": ".analysis.plots", "tables": ".analysis.tables", "widgets": ".analysis.widgets",
               "report": ".analysis.report", "quality": ".quality", "metrics": ".instruments.metrics",
               "analysis": ".analysis"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
