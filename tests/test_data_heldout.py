"""The prompt sets are held out of the training text: the committed n-gram index, the measurement behind it, the
GSM8K generator map and the validation split by source."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from smallthinker_lab.data import overlap
from smallthinker_lab.data.gsm import PROMPT_GENERATORS, TRAIN_GENERATORS, VAL_GENERATORS
from smallthinker_lab.data.prepare import assign_split, read_jsonl
from smallthinker_lab.prompt_sets import PROMPT_SETS

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"
MAX_OVERLAP = 0.05


def test_every_shipped_prompt_set_is_held_out_by_the_committed_index():
    """At most 5% of every shipped prompt set's n-grams occur in its domain's training text (the index was built
    by `data prepare` for exactly these prompt files: a changed file fails until the index is rebuilt)."""
    ov = overlap.overlap_from_index(PROMPTS, PROMPTS / overlap.INDEX_FILE, PROMPT_SETS).set_index("set")
    assert list(ov.index) == list(PROMPT_SETS)
    for s, r in ov.iterrows():
        assert r["prompts"] == len(read_jsonl(PROMPTS / f"{s}.jsonl"))
        assert r["mean_overlap"] <= MAX_OVERLAP, (s, r["mean_overlap"])
    table = {r["set"]: float(r["mean_overlap"]) for r in csv.DictReader(open(PROMPTS / "overlap.csv"))}
    assert table == pytest.approx(ov["mean_overlap"].to_dict(), rel=1e-5)  # the committed table is this measurement


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def tiny(tmp_path):
    prompts, corpus = tmp_path / "prompts", tmp_path / "corpus"
    prompts.mkdir()
    corpus.mkdir()
    q1 = "Question: Tom has 3 apples and buys 5 more apples at the shop. How many apples does Tom have now?\nAnswer:"
    q2 = "Question: A train leaves the station at 9 and travels 60 miles an hour for two hours. How far?\nAnswer:"
    _write(prompts / "gsm8k.jsonl", [{"id": "a", "text": q1}, {"id": "b", "text": q2}])
    _write(prompts / "zh-news.jsonl", [{"id": "z", "text": "北京１日电。今天的新闻很多，这是一个足够长的中文句子用于测试。"}])
    _write(corpus / "math.jsonl", [
        # q1 with other numbers and in capitals: every n-gram of q1 counts as found
        {"text": "QUESTION: TOM HAS 17 APPLES AND BUYS 2 MORE APPLES AT THE SHOP. HOW MANY APPLES DOES TOM HAVE "
                 "NOW?\nANSWER: 19", "split": "train"},
        # q2 only in a validation document: validation text is not training text
        {"text": q2 + " 120 miles", "split": "val"},
    ])
    _write(corpus / "zh.jsonl", [{"text": "今天的新闻很多，这是一个足够长的中文句子", "split": "train"}])
    return prompts, corpus


def test_overlap_masks_digits_ignores_case_and_skips_validation_text(tiny):
    prompts, corpus = tiny
    ov = overlap.prompt_overlap(prompts, corpus, ["gsm8k", "zh-news"]).set_index("set")
    assert ov.loc["gsm8k", "mean_overlap"] == pytest.approx(0.5)  # q1 fully, q2 not at all
    assert ov.loc["gsm8k", "over_half"] == pytest.approx(0.5)
    zh = "".join("北京0日电。今天的新闻很多，这是一个足够长的中文句子用于测试。".split())
    grams = {zh[i:i + 12] for i in range(len(zh) - 11)}
    inside = "今天的新闻很多，这是一个足够长的中文句子"
    want = sum(g in inside for g in grams) / len(grams)
    assert ov.loc["zh-news", "mean_overlap"] == pytest.approx(want) and 0 < want < 1
    assert ov.loc["zh-news", "ngram"] == "12-character grams"


def test_index_gives_the_same_numbers_and_refuses_another_prompt_file(tiny, tmp_path):
    prompts, corpus = tiny
    direct = overlap.prompt_overlap(prompts, corpus, ["gsm8k", "zh-news"])
    index = overlap.build_index(prompts, corpus, ["gsm8k", "zh-news"], out=tmp_path / "index.json")
    assert (tmp_path / "index.json").stat().st_size < 10_000
    from_index = overlap.overlap_from_index(prompts, tmp_path / "index.json")
    assert from_index.equals(direct)
    _write(prompts / "gsm8k.jsonl", [{"id": "c", "text": "Question: something else entirely, with more words\nAnswer:"}])
    with pytest.raises(ValueError, match="not the prompt set the index was built for"):
        overlap.overlap_from_index(prompts, index)
    with pytest.raises(KeyError, match="humaneval"):
        overlap.overlap_from_index(prompts, index, ["humaneval"])


def test_gsm8k_prompts_are_the_problems_of_the_generators_never_trained_on():
    rows = list(csv.DictReader(open(PROMPTS / "gsm8k_generators.csv")))
    assert [int(r["generator"]) for r in rows] == list(range(100))
    assert len({r["file"] for r in rows}) == 100  # one-to-one: every generator is the template of one problem
    # the measured match is clear: the best problem shares far more 3-grams than the runner-up
    assert all(float(r["share"]) > float(r["runner_up"]) for r in rows)
    prompt_files = {r["file"] for r in rows if int(r["generator"]) in PROMPT_GENERATORS}
    recs = read_jsonl(PROMPTS / "gsm8k.jsonl")
    assert len(recs) == 50 and {r["id"].removeprefix("gsm8k-") + ".toml" for r in recs} == prompt_files
    assert set(TRAIN_GENERATORS) | set(VAL_GENERATORS) == set(range(50)) and not set(VAL_GENERATORS) & set(
        TRAIN_GENERATORS)
    for r in recs:
        assert int(r["template_generator"].rsplit("_", 1)[1]) in PROMPT_GENERATORS


def test_assign_split_keeps_groups_whole_and_marked_validation():
    docs = [{"text": f"doc {i} " + "x" * (10 + i), "_group": f"g{i // 5}"} for i in range(400)]
    out = assign_split([dict(d) for d in docs], val_fraction=0.05)
    assert len(out) == 400 and all("_group" not in d for d in out)
    val = [d for d in out if d["split"] == "val"]
    assert out[-len(val):] == val  # validation written last
    assert 0.05 * 400 <= len(val) <= 0.2 * 400
    side = {}
    for d in docs:
        s = next(o["split"] for o in out if o["text"] == d["text"])
        assert side.setdefault(d["_group"], s) == s  # a group is all training or all validation
    marked = [{"text": "a", "split": "val"}, {"text": "b"}, {"text": "c"}]
    assert [d["split"] for d in assign_split(marked)] == ["train", "train", "val"]


def test_tokenize_uses_the_marked_validation_documents(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from smallthinker_lab.data.tokenize import tokenize_corpus

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in ("math", "code", "en", "zh"):
        _write(corpus / f"{d}.jsonl", [{"text": "a a", "split": "train"}, {"text": "b", "split": "val"},
                                       {"text": "c c c", "split": "train"}])
    man = tokenize_corpus(corpus, tok_dir)
    for d in ("math", "code", "en", "zh"):
        assert man["domains"][d]["train_docs"] == 2 and man["domains"][d]["val_docs"] == 1
        val = np.fromfile(corpus / "tokens" / f"{d}.val.bin", dtype=np.uint16)
        assert val.tolist() == [3, 0]
