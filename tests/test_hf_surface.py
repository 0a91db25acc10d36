"""The Hugging Face-shaped surface: from_pretrained and repo ids through the local hub cache, the forward's output
object, and one generate for text, ids and tensors whose result the model and the engine share."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model
from test_engine_cli import _char_tokenizer

import smallthinker_lab as sl
from smallthinker_lab import GenerationResult, SmallThinkerForCausalLM, load_model, save_pretrained
from smallthinker_lab.engine import engine as engine_module
from smallthinker_lab.model import CausalLMOutput

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ID = "PowerInfer/SmallThinker-4BA0.6B-Instruct"
ROOT = Path(__file__).resolve().parents[1]


def fake_hub_cache(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A cache laid out as huggingface_hub writes it: blobs/<digest>, snapshots/<commit>/<file> -> ../../blobs/...
    (relative symlinks), refs/<name> holding a commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            blob = repo / "blobs" / f"{commit}-{f.name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two revisions of one repo in a fake hub cache (main and v1, different weights), and their source folders."""
    base = tmp_path_factory.mktemp("hub")
    main, v1 = base / "src-main", base / "src-v1"
    save_pretrained(random_model(seed=1), main)
    _char_tokenizer(main)
    save_pretrained(random_model(seed=2), v1)
    cache = base / "cache"
    fake_hub_cache(cache, REPO_ID, {"a" * 40: main, "b" * 40: v1}, {"main": "a" * 40, "v1": "b" * 40})
    return cache, main, v1


IDS = torch.tensor([[5, 9, 2, 77, 31, 64, 8, 100]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------ from_pretrained and the hub cache
def test_from_pretrained_resolves_a_repo_id_in_the_hub_cache(hub):
    cache, main, v1 = hub
    model = SmallThinkerForCausalLM.from_pretrained(REPO_ID, cache_dir=cache)
    assert Path(model.name_or_path) == cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / ("a" * 40)
    assert torch.equal(_logits(model), _logits(load_model(main)))
    older = load_model(REPO_ID, cache_dir=cache, revision="v1")
    assert torch.equal(_logits(older), _logits(load_model(v1)))
    assert not torch.equal(_logits(older), _logits(model))
    folder = SmallThinkerForCausalLM.from_pretrained(main)  # a folder is still a folder
    assert torch.equal(_logits(folder), _logits(model))


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_load_model_follows_hf_home_and_hf_hub_cache(hub, tmp_path, variable):
    cache, main, _ = hub
    if variable == "HF_HOME":  # the cache is HF_HOME/hub
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "hub").symlink_to(cache)
        value = tmp_path / "home"
    else:
        value = cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({variable: str(value), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    code = f"import smallthinker_lab as sl; print(sl.load_model({REPO_ID!r}).name_or_path)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(f"models--PowerInfer--SmallThinker-4BA0.6B-Instruct/snapshots/{'a' * 40}")


def test_a_missing_repo_id_says_where_it_looked(hub, tmp_path):
    cache, _, _ = hub
    with pytest.raises(FileNotFoundError) as e:
        load_model("PowerInfer/SmallThinker-21BA3B-Instruct", cache_dir=cache)
    msg = str(e.value)
    assert str(cache) in msg and "models--PowerInfer--SmallThinker-21BA3B-Instruct does not exist" in msg
    assert "hf download PowerInfer/SmallThinker-21BA3B-Instruct" in msg and "HF_HUB_CACHE" in msg
    with pytest.raises(FileNotFoundError, match="has no snapshot for revision v9"):
        load_model(REPO_ID, cache_dir=cache, revision="v9")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):  # not a repo id: a plain missing path
        load_model(tmp_path / "nowhere" / "deeper" / "still")


# ------------------------------------------------------------------ the forward's output object
def test_forward_returns_logits_and_hf_shaped_router_logits():
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(ids)
        assert isinstance(out, CausalLMOutput) and out.router_logits is None
        assert out.logits.shape == (2, 7, model.config.vocab_size)
        (only,) = out  # unpacks as the fields that are set
        logits, router_logits = model(ids, output_router_logits=True)
        first = model.model.layers[0].block_sparse_moe.route(model.model.embed_tokens(ids))  # (B, T, E), raw x
    assert torch.equal(logits, only)
    assert isinstance(router_logits, tuple) and len(router_logits) == model.config.num_hidden_layers
    E = model.config.num_experts
    assert all(r.shape == (2 * 7, E) for r in router_logits)  # transformers' (batch * seq, experts)
    assert torch.equal(router_logits[0], first.reshape(14, E))  # row b * T + t is sequence b, token t
    assert torch.equal(router_logits[0][7 + 3], first[1, 3])


# ------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def ckpt(hub):
    return hub[1]  # a checkpoint folder with a tokenizer


def test_generate_takes_text_ids_and_tensors_and_returns_tokens_text_timings(ckpt):
    model = load_model(ckpt)
    tok = model.tokenizer
    assert tok is not None  # found in the folder the model came from
    prompt = "def add(a, b):"
    ids = tok(prompt)["input_ids"]
    from_text = sl.generate(model, prompt, 12, stop_tokens=[])
    assert isinstance(from_text, GenerationResult) and len(from_text) == 12
    assert from_text.tokens == sl.generate(model, ids, 12, stop_tokens=[]).tokens
    assert from_text == model.generate(torch.tensor(ids), 12, stop_tokens=[])  # a 1-D tensor
    assert from_text == sl.generate(model, torch.tensor([ids]), 12, stop_tokens=[])  # a (1, T) tensor
    assert from_text.text == tok.decode(from_text.tokens) and from_text.prompt_tokens == len(ids)
    st = from_text.stats
    assert st.prompt_tokens == len(ids) and st.new_tokens == 12 and len(st.decode_token_seconds) == 11
    assert st.prefill_seconds > 0 and st.decode_tok_s > 0
    # what callers of the old list-returning generate did still works
    assert tok.decode(from_text) == from_text.text and from_text[-1] == from_text.tokens[-1]
    assert ids + from_text == ids + from_text.tokens
    text = repr(from_text)
    assert text.startswith("GenerationResult(12 tokens [") and "tok/s" in text and len(text) < 200


def test_a_text_prompt_without_a_tokenizer_is_refused_clearly(ckpt):
    bare = random_model()
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
        sl.generate(bare, "hello", 2)
    tok = load_model(ckpt).tokenizer
    out = sl.generate(bare, "hello", 3, tokenizer=tok, stop_tokens=[])
    assert out.text == tok.decode(out.tokens)
    with pytest.raises(ValueError, match=r"\(T,\) or \(1, T\)"):
        sl.generate(bare, torch.zeros(1, 1, 3, dtype=torch.long), 2)


def test_engine_and_model_return_the_same_result_type(ckpt):
    assert engine_module.GenerationResult is GenerationResult
    model = load_model(ckpt)
    ref = sl.generate(model, "def add(a, b):", 8, stop_tokens=[])
    with sl.Engine.from_pretrained(ckpt, memory_limit=None, progress=False) as engine:
        got = engine.generate("def add(a, b):", 8, stop_tokens=[])
    assert type(got) is type(ref)
    assert got.tokens == ref.tokens and got.text == ref.text and got.prompt_tokens == ref.prompt_tokens


def test_engine_generate_takes_the_same_prompts(ckpt):
    model = load_model(ckpt)
    ids = model.tokenizer("x = 1")["input_ids"]
    ref = sl.generate(model, ids, 6, stop_tokens=[])
    with sl.Engine.from_pretrained(ckpt, memory_limit=None, progress=False) as engine:
        outs = [engine.generate(p, 6, stop_tokens=[]) for p in ("x = 1", ids, torch.tensor(ids))]
    assert all(o.tokens == ref.tokens and o.text == ref.text for o in outs)
