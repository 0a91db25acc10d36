"""The draft trainer (train/dense_draft.py) and the draft shipped beside the default model."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

import smallthinker_lab as sl
from smallthinker_lab.resources import default_draft_dir, default_model_dir
from smallthinker_lab.train.dense_draft import DraftArgs, train_draft

pytestmark = pytest.mark.usefixtures("one_thread")


def target_embedding() -> torch.Tensor:
    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


def test_the_shipped_draft_loads_by_name_and_fits_the_default_model():
    draft = sl.load_model("smallthinker-tiny-draft", dtype=torch.float32)
    target = sl.load_model("default", dtype=torch.float32)
    assert isinstance(draft, sl.DenseForCausalLM) and draft.name_or_path == str(default_draft_dir())
    assert draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()  # the same tokenizer, so it can draft
    assert 2e6 < draft.num_parameters() < 6e6
    assert (default_draft_dir() / "model.safetensors").stat().st_size <= 12 * 10**6
    assert torch.equal(draft.model.embed_tokens.weight, target_embedding().float())  # the target's, kept frozen
    out = sl.generate(target, "Question: 3 + 4 =", 8, draft=draft, draft_tokens=3)
    assert list(out) == list(sl.generate(target, "Question: 3 + 4 =", 8))


def test_training_a_draft_writes_a_loadable_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tokens"
    data.mkdir()
    for d in ("code", "math"):
        rng.integers(0, 8192, 4000, dtype=np.uint16).tofile(data / f"{d}.bin")
        rng.integers(0, 8192, 400, dtype=np.uint16).tofile(data / f"{d}.val.bin")
    out = tmp_path / "draft"
    summary = train_draft(DraftArgs(data_dir=str(data), out_dir=str(out), steps=3, batch_size=2, seq_len=16,
                                    warmup=1, threads=1, eval_windows=2), progress=False)
    draft = sl.load_model(out)
    assert draft.config.sliding_window == 16 and all(draft.config.is_sliding(i) for i in range(2))
    assert torch.equal(draft.model.embed_tokens.weight, target_embedding())
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 2 * 16
    assert summary["trainable_parameters"] == summary["parameters"] - 8192 * 256
    assert set(summary["val_ce_final"]) == {"code", "math"}
    for name in ("train_log.csv", "eval_log.csv", "args.json", "summary.json"):
        assert (out / "training" / name).is_file()
    assert (out / "tokenizer.json").read_bytes() == (default_model_dir() / "tokenizer.json").read_bytes()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DraftArgs(steps=0)
    with pytest.raises(ValueError, match="freeze_embedding=True needs init_embedding=True"):
        DraftArgs(init_embedding=False)
