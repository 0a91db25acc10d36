"""Where the shipped data lives: the default model and the prompt sets, in a checkout or an installed package.

An installed package (a wheel, or a plain ``pip install .``) carries them as package data under
``smallthinker_lab/_data`` (``models/smallthinker-tiny``, ``prompts/*.jsonl``), read through importlib.resources;
a checkout (or an editable install) reads the repository's ``data/`` folder, where ``smallthinker-lab data
prepare`` and training write them. This module imports nothing from the package, so every layer may use it.
The prompt sets' names, domains and loaders: prompt_sets.py (the registry).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "smallthinker-tiny"
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


def prompts_dir() -> Path:
    """The folder of the shipped prompt sets (``gsm8k.jsonl``, ``humaneval.jsonl``, ...)."""
    return data_dir() / "prompts"
