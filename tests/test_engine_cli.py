"""``smallthinker-lab generate``: the engine and the in-memory model print the same text; stats go to stderr."""

import string

import pytest
from conftest import random_model

from smallthinker_lab.cli import main
from smallthinker_lab.engine import Engine
from smallthinker_lab.model.checkpoint import load_model, save_pretrained
from smallthinker_lab.model.tokenizer import apply_chat_template, load_tokenizer

PROMPT = "def add(a, b):"


def _char_tokenizer(folder):
    """A character-level tokenizer small enough for the test model's 128-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, "<pad>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(string.printable[:95])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    save_pretrained(random_model(seed=5), folder)
    _char_tokenizer(folder)
    return folder


def test_generate_engine_and_in_memory_print_the_same_text(ckpt, capsys):
    tok = load_tokenizer(ckpt)
    ref = load_model(ckpt).generate(tok(PROMPT)["input_ids"], 10)
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False) as e:
        minimum = e.plan.minimum_bytes
    assert main(["generate", "--model", str(ckpt), PROMPT, "--max-new-tokens", "10",
                 "--memory-limit", str(minimum), "--policy", "lfu", "--lookahead"]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + tok.decode(ref) + "\n"  # the prompt, then its continuation
    assert "hit rate" in err and "tok/s" in err and "2 experts cached" in err
    assert main(["generate", "--model", str(ckpt), PROMPT, "--max-new-tokens", "10"]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "in memory" in err2


def test_generate_chat_and_sampling(ckpt, capsys):
    tok = load_tokenizer(ckpt)
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    ref = load_model(ckpt).generate(ids, 5, temperature=0.8, top_k=20, seed=1)
    assert main(["generate", "--model", str(ckpt), "hi", "--chat", "--max-new-tokens", "5", "--temperature", "0.8",
                 "--top-k", "20", "--seed", "1", "--memory-limit", "unlimited", "--no-prefetch"]) == 0
    assert capsys.readouterr().out == "hi\n" + tok.decode(ref) + "\n"  # the user's turn, then the reply


def test_generate_errors_are_reported(ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(ckpt), "x", "--memory-limit", "1KiB"]) == 2
    assert "below the minimum working set" in capsys.readouterr().err
    bare = tmp_path / "bare"
    save_pretrained(random_model(), bare)
    assert main(["generate", "--model", str(bare), "x", "--memory-limit", "unlimited"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
