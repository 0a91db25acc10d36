"""Where the shipped data lives: the default model and the prompt sets, in a checkout or an installed package.

An installed package (a wheel, or a plain ``pip install .``) carries them as package data under
``smallthinker_lab/_data`` (``models/smallthinker-tiny``, its draft ``models/smallthinker-tiny-draft``,
``prompts/*.jsonl``), read through importlib.resources;
a checkout (or an editable install) reads the repository's ``data/`` folder, where ``smallthinker-lab data
prepare`` and training write them. This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "smallthinker-tiny"
DEFAULT_DRAFT_NAME = "smallthinker-tiny-draft"  # a small dense draft of the default model's tokenizer
SHIPPED_MODELS = (DEFAULT_MODEL_NAME, DEFAULT_DRAFT_NAME)  # load_model(name) finds these offline
PACKAGE_DATA = "_data"
PROMPT_SETS = ("gsm8k", "humaneval", "wiki-en", "zh-news")  # the shipped prompt sets


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


class PromptSet(list):
    """The prompts of one set (a list of strings) with the set's ``name``, which :func:`~smallthinker_lab.profile`
    uses as the label of what it records."""

    def __init__(self, prompts, name: str) -> None:
        super().__init__(prompts)
        self.name = name


def load_prompt_set(name: str | Path, max_prompts: int | None = None, field: str = "text") -> PromptSet:
    """The ``field`` of each line of a JSONL prompt set: a shipped set's name (``"gsm8k"``) or a file path."""
    path = Path(name)
    if not path.suffix:
        path = prompts_dir() / f"{name}.jsonl"
    if not path.is_file():
        folder = prompts_dir()
        known = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        raise FileNotFoundError(f"no prompt set {str(name)!r} at {path}; known sets: {', '.join(known) or 'none'}")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: not a JSON object with a {field!r} field ({e})") from None
            if max_prompts is not None and len(prompts) >= max_prompts:
                break
    return PromptSet(prompts, path.stem)


def load_prompt_sets(names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                     max_prompts: int | None = None) -> dict[str, list[str]]:
    """{name: prompts}: names resolved through :func:`load_prompt_set`; a mapping passes through (cut to
    ``max_prompts``); None means the four shipped sets."""
    if isinstance(names, Mapping):
        return {str(k): PromptSet(list(v)[:max_prompts], str(k)) for k, v in names.items()}
    names = PROMPT_SETS if names is None else names
    return {Path(n).stem if Path(n).suffix else str(n): load_prompt_set(n, max_prompts) for n in names}
