"""smallthinker_lab.quality: unigram baseline, sliding-window perplexity, and the model card written from a tiny run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smallthinker_lab import quality as q
from smallthinker_lab.model import load_model, save_pretrained
from smallthinker_lab.quality import card as quality_card
from tests.conftest import random_model


def test_unigram_baseline_equals_direct_computation(tmp_path):
    V = 16
    train = np.array([0, 3, 3, 5, 0, 7, 3, 3, 1, 0], dtype=np.uint16)
    (tmp_path / "d.bin").write_bytes(train.tobytes())
    val = np.array([0, 3, 9, 5, 3, 0], dtype=np.uint16)
    counts = q.unigram_counts(np.memmap(tmp_path / "d.bin", dtype=np.uint16, mode="r"), V)
    got = q.unigram_perplexity(counts, val)
    # direct: p(t) = (count(t) + 1) / (N + V) over the targets val[1:]
    n = len(train)
    logs = [math.log(((train == t).sum() + 1) / (n + V)) for t in val[1:]]
    assert got["tokens"] == len(val) - 1
    assert got["ppl"] == pytest.approx(math.exp(-sum(logs) / len(logs)), rel=1e-12)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        q.unigram_counts(np.array([V]), V)


@pytest.mark.parametrize("n,window,stride", [(2, 4, 2), (10, 4, 4), (10, 4, 1), (37, 8, 3), (100, 512, 256),
                                             (1000, 64, 64), (1001, 64, 48)])
def test_window_plan_scores_every_target_once(n, window, stride):
    W, plan = q.window_plan(n, window, stride)
    scored = []
    for begin, done in plan:
        assert 0 <= begin and begin + W <= n - 1  # inputs [begin, begin + W), targets up to begin + W
        assert done >= begin  # a scored target always has its context inside the window
        scored += list(range(done + 1, begin + W + 1))
    assert scored == list(range(1, n))


def test_perplexity_equals_exp_mean_ce():
    torch.manual_seed(0)
    model = random_model(std=0.1)
    tokens = torch.randint(0, model.config.vocab_size, (193,))  # 192 targets = 3 windows of 64
    with torch.no_grad():
        ce_whole = F.cross_entropy(model(tokens[None, :-1]).logits[0], tokens[1:]).item()
        chunks = [F.cross_entropy(model(tokens[None, i: i + 64]).logits[0], tokens[i + 1: i + 65],
                                  reduction="sum").item() for i in range(0, 192, 64)]
    whole = q.perplexity(model, tokens.numpy(), window=512, stride=256, batch_size=2)
    assert whole["tokens"] == 192 and whole["windows"] == 1
    assert whole["ppl"] == pytest.approx(math.exp(ce_whole), rel=1e-5)
    tiled = q.perplexity(model, tokens.numpy(), window=64, stride=64, batch_size=2)
    assert tiled["tokens"] == 192 and tiled["windows"] == 3
    assert tiled["ppl"] == pytest.approx(math.exp(sum(chunks) / 192), rel=1e-5)
    sliding = q.perplexity(model, tokens.numpy(), window=64, stride=16, batch_size=3)
    assert sliding["tokens"] == 192 and sliding["ppl"] != pytest.approx(tiled["ppl"], rel=1e-9)


def test_prompt_prefix():
    assert q.prompt_prefix("def f():\n    pass\n", "humaneval") == "def f():\n    pass\n"
    en = "Short one. " + "This is a much longer sentence that goes on for a while. And more text follows here."
    assert q.prompt_prefix(en, "wiki-en") == en[: en.index("while.") + 6]
    zh = "今天。这是一个比较长的句子，超过二十个汉字的长度了吧。后面还有。"
    assert q.prompt_prefix(zh, "zh-news") == zh[: zh.index("吧。") + 2]


# ------------------------------------------------------------------ a tiny end-to-end run and its card
def _char_tokenizer(folder):
    """A character-level tokenizer.json with ids below the test preset's vocabulary of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))


def _tiny_setup(tmp_path):
    main, cmp_ = tmp_path / "main", tmp_path / "cmp"
    for folder, seed in ((main, 0), (cmp_, 1)):
        save_pretrained(random_model(seed=seed, std=0.1), folder)
        _char_tokenizer(folder)
    (main / "TRAINING.md").write_text(
        "# Training\n\n## Recipe\n\n| | |\n|---|---|\n| steps | 1,234 |\n| tokens seen | 5,678,901 (2 passes) |\n"
        "| hardware | a test GPU |\n\n| domain | CE | ppl |\n|---|---|---|\n| math | 0.5 | 1.6 |\n\n"
        "- wall time: 98.7 s\n\n## Hardware and time\n\nTwo runs side by side\non one test GPU.\n", encoding="utf-8")
    toks = tmp_path / "tokens"
    toks.mkdir()
    rng = np.random.default_rng(0)
    for d in q.DOMAINS:
        (toks / f"{d}.bin").write_bytes(rng.integers(0, 100, 3000).astype(np.uint16).tobytes())
        (toks / f"{d}.val.bin").write_bytes(rng.integers(0, 100, 200).astype(np.uint16).tobytes())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = {"math": ["Question: Tom has 17 apples and buys 5 more. How many?\nAnswer: 22"],
            "en": ["Unrelated English text about something else entirely, long enough for n-grams."]}
    for d, texts in docs.items():
        (corpus / f"{d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    texts = {"gsm8k": "Question: Tom has {i} apples and buys 3 more. How many?\nAnswer:",
             "humaneval": "def add_{i}(a, b):\n    \"\"\"Add a and b. ```x```\"\"\"\n",
             "wiki-en": "Paris {i} is the capital of France. It lies on the Seine river and is very large indeed.",
             "zh-news": "北京{i}日电。今天的新闻很多，这是一个足够长的中文句子用于测试。后面还有内容。"}
    for s in q.PROMPT_SETS:
        with open(prompts / f"{s}.jsonl", "w", encoding="utf-8") as f:
            for i in range(4):
                f.write(json.dumps({"id": f"{s}-{i}", "text": texts[s].format(i=i)}, ensure_ascii=False) + "\n")
    return main, cmp_, toks, prompts, corpus


def test_prompt_overlap_masks_digits(tmp_path):
    _, _, _, prompts, corpus = _tiny_setup(tmp_path)
    ov = q.prompt_overlap(prompts, corpus).set_index("set")
    assert list(ov.index) == ["gsm8k", "wiki-en"]  # no code or zh corpus here
    # "Question: Tom has {i} apples and buys 3 more. How many?\nAnswer:" vs the corpus's 17 / 5 / 22: all 8-grams match
    assert ov.loc["gsm8k", "mean_overlap"] == 1.0 and ov.loc["gsm8k", "over_half"] == 1.0
    assert ov.loc["wiki-en", "mean_overlap"] == 0.0 and ov.loc["wiki-en", "ngram"] == "word 8-grams"


def test_card_holds_every_section_and_number(tmp_path):
    main, cmp_, toks, prompts, corpus = _tiny_setup(tmp_path)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    rc = q.main(["--model", str(main), "--compare", str(cmp_), "--out", str(out), "--tokens", str(toks),
                 "--prompts", str(prompts), "--corpus", str(corpus), "--window", "64", "--stride", "32",
                 "--max-tokens", "150", "--new-tokens", "3", "--continuation-tokens", "6", "--no-progress"])
    assert rc == 0 and torch.get_num_threads() == threads  # the CLI's thread setting does not leak
    card = (out / "README.md").read_text(encoding="utf-8")
    for section in q.CARD_SECTIONS:
        assert f"\n{section}\n" in card, section
    for png in ("quality_experts_global.png", "quality_experts_micro-batch.png", "quality_expert_frequency_ecdf.png",
                "quality_sparsity.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in card

    res = q.QualityResult.load(out)
    assert [m.label for m in res.models] == ["global (DP-group)", "micro-batch"]
    for value in ("| steps | 1,234 |", "5,678,901 (2 passes)", "a test GPU", "98.7 s",  # TRAINING.md facts
                  "> Two runs side by side\n> on one test GPU.", "trained on 5,678,901 tokens"):
        assert value in card
    assert "| math | 0.5 | 1.6 |" not in card  # only two-column tables are facts
    model = load_model(main)
    assert q.fmt_int(model.num_parameters()) in card
    for m in res.models:
        p = m.perplexity
        assert list(p["domain"]) == list(q.DOMAINS) and (p["tokens"] == 149).all()
        for r in p.itertuples():
            assert q.fmt_ppl(r.ppl) in card and q.fmt_ppl(r.unigram_ppl) in card
        js, pair, per_layer, floor = quality_card._js_summary(m)
        assert len(pair) == 6 and len(per_layer) == model.config.num_hidden_layers
        for v in [js, floor, *pair, *per_layer]:
            assert q.fmt_js(v) in card
        assert list(m.skew["dataset"]) == list(q.PROMPT_SETS)
        for r in m.skew.itertuples():
            assert q.fmt_share(r.cold_share) in card and q.fmt_share(r.hot_share) in card
            assert f"{r.entropy:.3f}" in card
        sa = quality_card._sparsity_all(m)
        assert len(sa) == model.config.num_hidden_layers
        for r in sa.itertuples():
            assert q.fmt_sparsity(r.median) in card
            assert f"{q.fmt_sparsity(r.min)}-{q.fmt_sparsity(r.max)}" in card
    # frequencies: per (set, layer) they sum to top_k
    f = res.models[0].frequency
    sums = f.groupby(["dataset", "layer"])["frequency"].sum()
    assert np.allclose(sums, model.config.top_k)
    conts = res.models[0].continuations
    assert [(c["set"], c["id"]) for c in conts] == [(s, f"{s}-{i}") for s, i in q.CONTINUATION_PROMPTS]
    for c in conts:
        assert c["prompt"] in card and c["continuation"] in card and 1 <= c["new_tokens"] <= 6
    assert "````" in card  # the HumanEval-like prompt holds ``` so its fence is longer
    for s in q.findings(res):
        assert s in card
    assert "The gsm8k prompts are NOT independent of the training data: 100.0%" in card
    assert res.overlap is not None and list(res.overlap["set"]) == ["gsm8k", "wiki-en"]

    # the three sparsity definitions and the random-init baseline (chance), per layer, in the card
    assert res.baseline is not None and res.settings["baseline"] == {"label": "random init (seed 0)", "seed": 0}
    for m in res.models:
        d = m.sparsity_definitions
        assert set(d["definition"]) == {"pair", "expert", "neuron"} and set(d["dataset"]) == {"all", *q.PROMPT_SETS}
    d = res.models[0].sparsity_definitions
    d = d[d["dataset"] == "all"]
    base = res.baseline[res.baseline["dataset"] == "all"]
    for frame in (d, base[base["definition"].isin(["pair", "neuron"])]):
        for r in frame.itertuples():
            assert q.fmt_sparsity(r.median) in card
    assert "random init (seed 0) per neuron" in card and "dead neurons" in card
    # the chance model is the trainer's start: init_weights(0) of the same config, not the trained weights
    pairs = d[d["definition"] == "pair"].set_index("layer")["median"]
    assert not np.allclose(pairs, base[base["definition"] == "pair"].set_index("layer")["median"])
    # frequency normalisations and the hot-share cap k / (0.4 E)
    cfg = model.config
    cap = q.fmt_share(min(1.0, cfg.top_k / (0.4 * cfg.num_experts)))
    assert f"at most k / (0.4 E) = {cap}" in card and "23.4%" in card
    fs = res.models[0].frequency_shares
    assert set(fs["normalisation"]) == {"per_token", "per_slot", "max_normalised", "per_sequence"}
    per_token = fs[fs["normalisation"] == "per_token"].set_index("dataset")["hot_share"]
    np.testing.assert_allclose(per_token.loc[list(q.PROMPT_SETS)], res.models[0].skew.set_index("dataset")
                               .loc[list(q.PROMPT_SETS), "hot_share"])

    # --card-only rewrites the same card and the same figures from the saved tables
    pngs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "README.md").unlink()
    for p in out.glob("*.png"):
        p.unlink()
    assert q.main(["--model", str(main), "--out", str(out), "--card-only", "--corpus", str(tmp_path / "none")]) == 0
    assert (out / "README.md").read_text(encoding="utf-8") == card
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == pngs

    # --phenomena-only measures the prompt sets again: the same tables (deterministic), perplexity kept
    tables = {p.name: p.read_bytes() for p in out.glob("quality_*.csv")}
    assert q.main(["--model", str(main), "--compare", str(cmp_), "--out", str(out), "--prompts", str(prompts),
                   "--corpus", str(tmp_path / "none"), "--new-tokens", "3", "--phenomena-only", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("quality_*.csv")} == tables
    assert (out / "README.md").read_text(encoding="utf-8") == card
