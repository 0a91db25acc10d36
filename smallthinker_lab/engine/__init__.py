"""The offloading engine: an expert bundle on storage, one shared expert cache under a memory limit, prefetch.

Imports are lazy so that ``smallthinker_lab.engine.quant`` and friends load without the engine.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": ".engine", "EngineBusy": ".generation", "GenerationResult": ".generation",
    "MemoryLimitError": ".memory", "MemoryPlan": ".memory", "parse_memory_limit": ".memory",
    "convert": ".conversion", "open_bundle": ".bundle", "Bundle": ".bundle", "BundleError": ".bundle",
    "ExpertReadError": ".bundle",
    "EngineOptions": ".options", "BackendUnavailable": ".options", "BACKENDS": ".options", "EngineState": ".state",
    "warm_start": ".warm", "domain_hit_rates": ".warm", "switch_domains": ".warm", "materialise": ".gguf",
    "ExpertCache": ".cache", "SimResult": ".policies", "simulate": ".policies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
