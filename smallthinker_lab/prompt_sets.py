"""The one registry of the shipped prompt sets: each set's name, domain, file and loader.

``REGISTRY`` maps a set's name ("gsm8k", "humaneval", "wiki-en", "zh-news") to a :class:`PromptSource`: the domain
of training text it is held out from ("math", "code", "en", "zh"), its file ``{name}.jsonl`` (one JSON object per
line, with ``id`` and ``text``) and the functions that read it. It lives at the package root beside resources.py
(which locates the files), below every layer, because the lowest layer that loads a set by name is instruments
(``profile(prompts="wiki-en")``), and data/, quality/ and interventions/ use it too; ``smallthinker_lab.analysis
.prompts`` re-exports it. It imports nothing from the package but resources.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .resources import prompts_dir

__all__ = ["DOMAINS", "PROMPT_SETS", "REGISTRY", "SET_DOMAIN", "PromptSet", "PromptSource", "domain_of",
           "load_prompt_set", "load_prompt_sets", "prompt_source", "read_prompts"]


@dataclass(frozen=True)
class PromptSource:
    """A shipped prompt set: its ``name``, the ``domain`` of training text it is held out from, and what it holds."""

    name: str
    domain: str
    description: str

    def path(self, folder: str | Path | None = None) -> Path:
        """Its file: ``{name}.jsonl`` in ``folder`` (default: the shipped prompts, resources.prompts_dir())."""
        return Path(prompts_dir() if folder is None else folder) / f"{self.name}.jsonl"

    def records(self, limit: int | None = None, folder: str | Path | None = None) -> list[dict]:
        """Its records (dicts with ``id`` and ``text``), the first ``limit``."""
        return read_prompts(self.path(folder), limit)

    def load(self, max_prompts: int | None = None, field: str = "text", folder: str | Path | None = None) -> PromptSet:
        """The ``field`` of each record, as a :class:`PromptSet` named after the set."""
        return load_prompt_set(self.path(folder), max_prompts, field)


REGISTRY: dict[str, PromptSource] = {s.name: s for s in (
    PromptSource("gsm8k", "math", "GSM8K test problems (Question: ... Answer:)"),
    PromptSource("humaneval", "code", "HumanEval problems (a Python function's signature and docstring)"),
    PromptSource("wiki-en", "en", "English Wikipedia paragraphs from held-out articles"),
    PromptSource("zh-news", "zh", "People's Daily paragraphs, January 1998 (Chinese)"),
)}
PROMPT_SETS: tuple[str, ...] = tuple(REGISTRY)  # the shipped sets, in their usual order
SET_DOMAIN: dict[str, str] = {name: s.domain for name, s in REGISTRY.items()}  # set -> training-text domain
DOMAINS = ("math", "code", "en", "zh")  # the training text's domains, in the corpus's order (data/, quality/)
assert set(SET_DOMAIN.values()) <= set(DOMAINS), SET_DOMAIN


def prompt_source(name: str) -> PromptSource:
    """The registry's entry for ``name``; an unknown name is a KeyError naming the known sets."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(f"no shipped prompt set {name!r}; known sets: {', '.join(PROMPT_SETS)}") from None


def domain_of(name: str) -> str | None:
    """The domain of a shipped set ("math", "code", "en", "zh"), or None for a set the registry does not know."""
    source = REGISTRY.get(name)
    return None if source is None else source.domain


class PromptSet(list):
    """The prompts of one set (a list of strings) with the set's ``name``, which :func:`~smallthinker_lab.profile`
    uses as the label of what it records."""

    def __init__(self, prompts, name: str) -> None:
        super().__init__(prompts)
        self.name = name


def _lines(path: Path):
    """(line number, record) of each non-blank line of a JSONL file; a line that is not a JSON object is a
    ValueError naming the file and line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n}: not a JSON object")
            yield n, record


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """The records of a prompt-set JSONL file (blank lines skipped), the first ``limit``."""
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    for _, record in _lines(Path(path)):
        out.append(record)
        if limit is not None and len(out) >= limit:
            break
    return out


def _resolve(name: str | Path) -> Path:
    """A shipped set's name to its file; a name with a suffix is a path."""
    path = Path(name)
    if not path.suffix:
        path = prompts_dir() / f"{name}.jsonl"
    if not path.is_file():
        folder = prompts_dir()
        known = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        raise FileNotFoundError(f"no prompt set {str(name)!r} at {path}; known sets: {', '.join(known) or 'none'}")
    return path


def load_prompt_set(name: str | Path, max_prompts: int | None = None, field: str = "text") -> PromptSet:
    """The ``field`` of each line of a JSONL prompt set: a shipped set's name (``"gsm8k"``) or a file path."""
    path = _resolve(name)
    prompts: list = []
    if max_prompts is not None and max_prompts <= 0:
        return PromptSet(prompts, path.stem)
    for n, record in _lines(path):
        if field not in record:
            raise ValueError(f"{path} line {n}: not a JSON object with a {field!r} field")
        prompts.append(record[field])
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
