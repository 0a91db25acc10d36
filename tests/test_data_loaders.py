"""Readers of the added sources on real-shaped snippets: chinese-poetry records, FOLDOC entries, grouping."""

from __future__ import annotations

import gzip

from smallthinker_lab.data import loaders
from smallthinker_lab.data.prepare import _grouped


def test_poems_from_every_record_shape():
    ci = [{"author": "黄孝迈", "paragraphs": ["近清明。", "翠禽枝上消魂。"], "rhythmic": "湘春夜月"}]
    shi = {"title": "关雎", "chapter": "国风", "section": "周南", "content": ["关关雎鸠，在河之洲。", "窈窕淑女，君子好逑。"]}
    nested = {"title": "三字经", "content": [{"chapter": "一", "paragraphs": ["人之初，性本善。"]}]}
    got = loaders._poems([ci, shi, nested, {"title": "空", "paragraphs": []}], "x")
    assert got == [("湘春夜月 黄孝迈", "近清明。\n翠禽枝上消魂。"),
                   ("关雎 国风 周南", "关关雎鸠，在河之洲。\n窈窕淑女，君子好逑。"),
                   ("一", "人之初，性本善。")]


def test_foldoc_entries(monkeypatch):
    dict_text = ("00-database-short\n     The Free On-line Dictionary of Computing\n"
                 "ASCII\n\n   <character> American Standard Code for Information\n   Interchange.\n\n\n\n"
                 "   (1995-01-01)\n\nBase Technology\n\n   <company> The company which developed {Liana}.\n")
    monkeypatch.setattr(loaders, "read_bytes", lambda *a, **k: gzip.compress(dict_text.encode()))
    assert loaders.load_foldoc() == [
        ("ASCII", "<character> American Standard Code for Information\nInterchange.\n\n(1995-01-01)"),
        ("Base Technology", "<company> The company which developed {Liana}."),
    ]


def test_grouped_keeps_order_and_the_limit():
    texts = [f"t{i} " + "x" * 40 for i in range(10)]
    docs = _grouped(texts, 100)
    assert "\n\n".join(docs) == "\n\n".join(texts)
    assert all(len(d) <= 100 for d in docs) and len(docs) == 5
