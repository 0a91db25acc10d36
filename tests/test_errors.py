"""Bad inputs get clear errors: each test asserts the error type and that the message names the file, key or value
(issue 14, "Unclear errors to make clear")."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from smallthinker_lab.model.config import ConfigError, SmallThinkerConfig
from smallthinker_lab.model.tokenizer import DEFAULT_TOKENIZER_DIR, TokenizerError, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ tokenizer files
def tokenizer_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEFAULT_TOKENIZER_DIR / name).is_file():
            shutil.copy(DEFAULT_TOKENIZER_DIR / name, folder / name)
    return folder


DAMAGE = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "not utf-8": lambda b: b"\xff\xfe\x00" + b[3:],
    "a list": lambda b: b"[1, 2, 3]",
    "whitespace": lambda b: b"  \n",
}


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_tokenizer_file_names_the_file(tmp_path, name, damage):
    folder = tokenizer_copy(tmp_path)
    path = folder / name
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(folder)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_tokenizer_json_of_the_wrong_shape(tmp_path):
    folder = tokenizer_copy(tmp_path)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json has no \"model\""):
        load_tokenizer(folder)


def test_the_intact_copy_still_loads(tmp_path):
    tok = load_tokenizer(tokenizer_copy(tmp_path))
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


# ------------------------------------------------------------------ config.json value types
BAD_VALUES = {
    "rms_norm_eps": ["1e-6", True, -1e-6, 0.0, math.nan, math.inf],
    "rope_theta": ["10000", -1.0, math.inf, math.nan, False],
    "hidden_size": ["64", 64.0, True, -64, 0],
    "num_hidden_layers": ["4", 4.0, -4, None],
    "vocab_size": [128.5, "128"],
    "moe_num_primary_experts": ["8", False],
    "sliding_window_size": [-8, math.inf],
    "max_position_embeddings": [math.nan, "512"],
    "attention_dropout": ["0", 1.0, -0.1, math.nan],
    "initializer_range": [math.nan, -0.02, "0.02"],
    "tie_word_embeddings": ["false", 0],
    "moe_primary_router_apply_softmax": ["true", 1],
    "eos_token_id": ["1", [1, "2"], -1, 1.0],
    "bos_token_id": [0.0, "0", -1],
    "rope_layout": ["0101", [0, "1", 0, 1], 3],
    "torch_dtype": [16, None],
}


def write_config(folder: Path, key: str, value) -> Path:
    d = SmallThinkerConfig.from_name("smallthinker-test").to_dict()
    d[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(d))  # json writes NaN / Infinity, which Python's json reads back
    return path


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD_VALUES.items() for v in vs])
def test_config_value_of_the_wrong_type_names_file_and_key(tmp_path, key, value):
    path = write_config(tmp_path / "m", key, value)
    with pytest.raises(ConfigError) as e:
        SmallThinkerConfig.from_json(path.parent)
    msg = str(e.value)
    assert str(path) in msg and key in msg and repr(value) in msg


@pytest.mark.parametrize("text", [b"", b"[1, 2]", b"\xff\xfe{}", b'{"model_type": "smallthinker",'])
def test_config_json_that_is_not_an_object(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        SmallThinkerConfig.from_json(path)
    assert str(path) in str(e.value)


def test_valid_configs_still_load():
    for name in ("smallthinker-test", "smallthinker-tiny", "smallthinker-21b-a3b", "smallthinker-4b-a0.6b"):
        cfg = SmallThinkerConfig.from_name(name)
        assert SmallThinkerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
