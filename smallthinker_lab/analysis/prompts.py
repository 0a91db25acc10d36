"""The shipped prompt sets for the notebooks, widgets and report: names, domains, files and loaders.

The registry itself is smallthinker_lab/prompt_sets.py, at the package root below every layer, because the
instruments load a set by name too (``profile(prompts="wiki-en")``); this module re-exports it for analysis code.
"""

from __future__ import annotations

from ..prompt_sets import (
    DOMAINS,
    PROMPT_SETS,
    REGISTRY,
    SET_DOMAIN,
    PromptSet,
    PromptSource,
    domain_of,
    load_prompt_set,
    load_prompt_sets,
    prompt_source,
    read_prompts,
)

__all__ = ["DOMAINS", "PROMPT_SETS", "REGISTRY", "SET_DOMAIN", "PromptSet", "PromptSource", "domain_of",
           "load_prompt_set", "load_prompt_sets", "prompt_source", "read_prompts"]
