"""Where the shipped data lives: the default model and the prompt sets, in a checkout or an installed package.

An installed package (a wheel, or a plain ``pip install .``) carries them as package data under
``smallthinker_lab/_data`` (``models/smallthinker-tiny``, its draft ``models/smallthinker-tiny-draft``,
``prompts/*.jsonl``), read through importlib.resources;
a checkout (or an editable install) reads the repository's ``data/`` folder, where ``smallthinker-lab data
prepare`` and training write them. This module imports nothing from the package, so every layer may use it.
The prompt sets' names, domains and loaders: prompt_sets.py (the registry).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "smallthinker-tiny"
DEFAULT_DRAFT_NAME = "smallthinker-tiny-draft"  # a small dense draft of the default model's tokenizer
SHIPPED_MODELS = (DEFAULT_MODEL_NAME, DEFAULT_DRAFT_NAME)  # load_model(name) finds these offline
PACKAGE_DATA = "_data"


def data_dir() -> Path:
    """The installed package data if this is an installed package, else the checkout's ``data/`` folder."""
    installed = resources.files("smallthinker_lab") / PACKAGE_DATA
    if installed.is_dir():
        return Path(str(installed))  # a wheel installs plain files, so the traversable is a real folder
    return Path(__file__).resolve().parents[1] / "data"


def default_model_dir() -> Path:
    """The folder of the default model (it may be absent in a checkout that has not trained it)."""
    return data_dir() / "models" / DEFAULT_MODEL_NAME


def default_draft_dir() -> Path:
    """The folder of the default model's speculative-decoding draft (a dense Qwen2-shaped model)."""
    return data_dir() / "models" / DEFAULT_DRAFT_NAME


def shipped_model_dir(name: str) -> Path | None:
    """The folder of a model shipped with the package (:data:`SHIPPED_MODELS`), or None for another name."""
    return data_dir() / "models" / name if name in SHIPPED_MODELS else None


def prompts_dir() -> Path:
    """The folder of the shipped prompt sets (``gsm8k.jsonl``, ``humaneval.jsonl``, ...)."""
    return data_dir() / "prompts"
