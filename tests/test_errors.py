"""Bad inputs get clear errors: each test asserts the error type and that the message names the file, key or value
(issue 14, "Unclear errors to make clear")."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model

import smallthinker_lab as sl
from smallthinker_lab.engine import Engine, convert
from smallthinker_lab.engine.memory import parse_memory_limit
from smallthinker_lab.model.checkpoint import CheckpointError, load_model, save_pretrained
from smallthinker_lab.model.config import ConfigError, SmallThinkerConfig
from smallthinker_lab.model.generate import stream_generate
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


# ------------------------------------------------------------------ memory limits
@pytest.mark.parametrize("limit", [math.nan, math.inf, -math.inf, "", "   ", "inf", "nan", "-5MiB", -5, 0, "0",
                                   "abc", "5 XB", "1.5.GiB", True, [1], "50%", np.float64("nan")])
def test_bad_memory_limit_names_the_value(limit):
    with pytest.raises(ValueError) as e:
        parse_memory_limit(limit)
    msg = str(e.value)
    assert "memory_limit" in msg and (repr(limit) in msg or (isinstance(limit, str) and not limit.strip()))


def test_memory_limit_forms():
    assert parse_memory_limit(None) is None and parse_memory_limit("unlimited") is None
    assert parse_memory_limit(" Unlimited ") is None and parse_memory_limit("none") is None
    assert parse_memory_limit(512) == 512 and parse_memory_limit("512MiB") == 512 * 2**20
    assert parse_memory_limit("1.5GiB") == 3 * 2**29 and parse_memory_limit("800MB") == 800 * 10**6
    assert parse_memory_limit(np.int64(4096)) == 4096 and parse_memory_limit(1.5e9) == 1_500_000_000
    # a percentage only where the caller says of what
    assert parse_memory_limit("50%", total=1000) == 500 and parse_memory_limit("100%", total=1000) == 1000
    for bad in ("150%", "0%", "x%", "-5%"):
        with pytest.raises(ValueError, match=bad):
            parse_memory_limit(bad, total=1000)


# ------------------------------------------------------------------ a checkpoint with its bundle
PROMPT = [5, 9, 2, 77, 31, 64, 8, 100]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors") / "model"
    save_pretrained(random_model(seed=4), folder)
    convert(folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def engine(ckpt):
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, io_threads=1) as e:
        yield e


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_engine_refuses_a_bad_memory_limit(ckpt):
    for limit in (math.nan, math.inf, ""):
        with pytest.raises(ValueError, match="memory_limit"):
            Engine.from_pretrained(ckpt, memory_limit=limit, progress=False)


@pytest.mark.parametrize("max_context", [0, -1, -2048, 2.5, 64.0, True, "64", 513])
def test_bad_max_context_is_refused_before_anything_is_opened(ckpt, max_context):
    Engine.from_pretrained(ckpt, memory_limit=None, progress=False, max_context=64, io_threads=1).close()
    before = open_fds()
    with pytest.raises(ValueError) as e:
        Engine.from_pretrained(ckpt, memory_limit=None, progress=False, max_context=max_context)
    assert "max_context" in str(e.value) and repr(max_context) in str(e.value)
    assert "512" in str(e.value) and str(ckpt / "config.json") in str(e.value)  # the bound and where it comes from
    assert open_fds() == before  # no descriptor left open


def test_max_context_in_range_still_works(ckpt):
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, max_context=16, io_threads=1) as e:
        assert e.max_context == 16 and len(e.generate(PROMPT, 4, stop_tokens=[]).tokens) == 4


# ------------------------------------------------------------------ token ids
NOT_INTEGER_IDS = {
    "float tensor": torch.tensor([5.0, 9.7, 2.0]),
    "half tensor": torch.tensor([5, 9, 2], dtype=torch.float16),
    "bool tensor": torch.tensor([True, False]),
    "float array": np.array([5.0, 9.0]),
    "list with a float": [5, 9.5, 2],
    "list with an integral float": [5, 9.0, 2],
    "list with a bool": [5, True, 2],
    "list with a string": [5, "9", 2],
    "a string of digits": "59",
    "nested float": [[5, 9], [2, 3.5]],
}
OUT_OF_RANGE_IDS = {"negative": ([5, -1, 2], -1), "vocab": ([5, 128, 2], 128), "huge": (torch.tensor([2**40]), 2**40)}


@pytest.mark.parametrize("kind", [k for k in NOT_INTEGER_IDS if k != "a string of digits"])
def test_engine_encode_refuses_non_integer_ids(engine, kind):
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.encode(NOT_INTEGER_IDS[kind])


@pytest.mark.parametrize("kind", list(NOT_INTEGER_IDS))
def test_model_generate_refuses_non_integer_ids(test_model, kind):
    ids = NOT_INTEGER_IDS[kind]
    if isinstance(ids, str):  # text: encoded by the model's tokenizer, and this model has none
        with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
            sl.generate(test_model, ids, max_new_tokens=2)
        return
    with pytest.raises(ValueError, match="token ids must be integers") as e:
        sl.generate(test_model, ids, max_new_tokens=2)
    if isinstance(ids, torch.Tensor):
        assert str(ids.dtype) in str(e.value)
    elif isinstance(ids, list) and kind != "nested float":
        bad = next(v for v in ids if type(v) is not int)
        assert repr(bad) in str(e.value) and f"position {ids.index(bad)}" in str(e.value)


@pytest.mark.parametrize("kind", list(OUT_OF_RANGE_IDS))
def test_out_of_vocabulary_ids_are_refused(engine, test_model, kind):
    ids, bad = OUT_OF_RANGE_IDS[kind]
    for call in (engine.encode, lambda x: sl.generate(test_model, x, max_new_tokens=2)):
        with pytest.raises(ValueError, match=f"token id {bad} at position") as e:
            call(ids)
        assert "[0, 128)" in str(e.value)


def test_integer_ids_of_every_form_give_the_same_tokens(engine, test_model):
    forms = [PROMPT, tuple(PROMPT), torch.tensor(PROMPT), torch.tensor([PROMPT], dtype=torch.int32),
             np.array(PROMPT), [np.int64(t) for t in PROMPT], [torch.tensor(t) for t in PROMPT]]
    ref = sl.generate(test_model, PROMPT, max_new_tokens=3, stop_tokens=[])
    for ids in forms:
        assert engine.encode(ids).tolist() == [PROMPT]
        assert sl.generate(test_model, ids, max_new_tokens=3, stop_tokens=[]) == ref


# ------------------------------------------------------------------ max_new_tokens
@pytest.mark.parametrize("n", [0, -1, 2.5, "3", True])
def test_max_new_tokens_below_one_raises_in_both(engine, test_model, n):
    with pytest.raises(ValueError, match="max_new_tokens") as a:
        sl.generate(test_model, PROMPT, max_new_tokens=n)
    with pytest.raises(ValueError, match="max_new_tokens") as b:
        engine.generate(PROMPT, max_new_tokens=n)
    assert repr(n) in str(a.value) or str(n) in str(a.value)
    assert repr(n) in str(b.value) or str(n) in str(b.value)


def test_stream_generate_checks_its_arguments_when_called(test_model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        stream_generate(test_model, PROMPT, 0)  # not on the first next(): as Engine.stream
    with pytest.raises(ValueError, match="the prompt is empty"):
        stream_generate(test_model, [], 2)


# ------------------------------------------------------------------ non-finite weights
@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory):
    """Layer 1 expert 3's up matrix holds a NaN, the final norm an infinity: the first in model order is the NaN."""
    model = random_model(seed=5)
    with torch.no_grad():
        model.model.layers[1].block_sparse_moe.experts[3].up.weight[2, 7] = math.nan
        model.model.norm.weight[4] = math.inf
    folder = tmp_path_factory.mktemp("nan") / "model"
    save_pretrained(model, folder)
    return folder


def nan_tensor_name(folder: Path) -> str:
    return next(n for n in sl.model.expected_tensors(SmallThinkerConfig.from_json(folder)) if ".layers.1." in n
                and ".experts.3." in n and "up" in n)


def test_check_finite_names_the_first_non_finite_tensor(nan_ckpt):
    load_model(nan_ckpt)  # opt-in: loads as before
    with pytest.raises(CheckpointError) as e:
        load_model(nan_ckpt, check_finite=True)
    msg = str(e.value)
    assert nan_tensor_name(nan_ckpt) in msg and str(nan_ckpt / "model.safetensors") in msg and "1 NaN" in msg


def test_engine_check_finite_refuses_before_converting(nan_ckpt, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(nan_ckpt, folder)
    with pytest.raises(CheckpointError) as e:
        Engine.from_pretrained(folder, memory_limit=None, progress=False, check_finite=True)
    assert nan_tensor_name(folder) in str(e.value) and str(folder) in str(e.value)
    assert not any(p.name.startswith("expert_bundle") for p in folder.iterdir())  # nothing converted


def test_check_finite_catches_an_overflow_of_the_requested_dtype(tmp_path):
    model = random_model(seed=6)
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6  # finite in fp32, infinite in fp16
    save_pretrained(model, tmp_path / "m")
    load_model(tmp_path / "m", check_finite=True)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is not finite after conversion to torch.float16"):
        load_model(tmp_path / "m", dtype="float16", check_finite=True)


def test_check_finite_on_healthy_weights(ckpt):
    model = load_model(ckpt, check_finite=True)
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, check_finite=True, io_threads=1) as e:
        assert e.generate(PROMPT, 4, stop_tokens=[]).tokens == model.generate(PROMPT, 4, stop_tokens=[])


# ------------------------------------------------------------------ the report warns on non-finite logits
def test_report_warns_when_logits_go_non_finite(tmp_path):
    from smallthinker_lab.analysis.report import write_report

    model = random_model(seed=7, vocab_size=8192)  # the default tokenizer's vocabulary
    with torch.no_grad():
        model.model.norm.weight[3] = math.inf  # finite routing, non-finite logits
    folder = tmp_path / "model"
    save_pretrained(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_TOKENIZER_DIR / name, folder / name)
    with pytest.warns(RuntimeWarning, match="logits were not finite") as w:
        files = write_report(folder, tmp_path / "report", memory_limit="50%", max_prompts=1, max_new_tokens=2,
                             bench_prompts=1, prompt_sets=["gsm8k"], max_prompt_tokens=16, progress=False)
    assert str(folder) in str(w[0].message)
    page = files[-1].read_text(encoding="utf-8")
    assert "non-finite logits" in page and "WARNING" in page


# ------------------------------------------------------------------ the command line: one line, non-zero status
def run_cli(*argv: str, module: str = "smallthinker_lab.cli") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *names: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_cli_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(run_cli("generate", "hi", "--model", str(missing)), str(missing))


def test_cli_bad_memory_limit(ckpt):
    assert_one_line_error(run_cli("generate", "hi", "--model", str(ckpt), "--memory-limit", "nan"), "'nan'",
                          "memory_limit")


def test_cli_corrupt_config_through_the_sub_cli(tmp_path, ckpt):
    path = write_config(tmp_path / "m", "rms_norm_eps", "1e-6")
    shutil.copy(ckpt / "model.safetensors", path.parent / "model.safetensors")  # the weights are fine
    r = run_cli("convert", str(path.parent), module="smallthinker_lab.engine.cli")
    assert_one_line_error(r, str(path), "rms_norm_eps", "'1e-6'")


def test_cli_errors_in_process(tmp_path, capsys, ckpt):
    from smallthinker_lab import cli

    folder = tokenizer_copy(tmp_path)
    (folder / "tokenizer.json").write_bytes(b"\xff\xfe")
    shutil.copy(ckpt / "config.json", folder / "config.json")
    shutil.copy(ckpt / "model.safetensors", folder / "model.safetensors")
    cases = [
        (["generate", "hi", "--model", str(folder)], str(folder / "tokenizer.json")),
        (["generate", "hi", "--model", str(ckpt), "--memory-limit", ""], "memory_limit is empty"),
        (["generate", "hi", "--model", str(ckpt), "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["report", "--model", str(ckpt), "--memory-limit", "x%", "--out", str(tmp_path / "r")], "'x%'"),
        (["train", "--config", "smallthinker-test", "--domain-weights", "{bad", "--out", str(tmp_path / "t")],
         "--domain-weights '{bad'"),
    ]
    for argv, name in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()  # the report checked its limit before writing anything


def test_cli_keeps_the_traceback_of_a_bug(capsys):
    import argparse

    from smallthinker_lab.cli import run_command

    def bug(args):
        return None + 1

    with pytest.raises(TypeError):
        run_command(bug, argparse.Namespace(), "smallthinker-lab x")
    assert run_command(lambda a: (_ for _ in ()).throw(KeyError("no such key 'k'")), argparse.Namespace(), "p") == 2
    assert capsys.readouterr().err == "p: error: no such key 'k'\n"


def test_tokenize_corpus_names_a_damaged_tokenizer_file(tmp_path):
    from smallthinker_lab.data.tokenize import tokenize_corpus

    folder = tokenizer_copy(tmp_path)
    path = folder / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(TokenizerError, match=str(path)):
        tokenize_corpus(tmp_path / "corpus", folder, out_dir=tmp_path / "tokens")
