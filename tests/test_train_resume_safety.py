"""Resuming a training run runs no code from the output folder; checkpoint.pt is written atomically."""

import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from smallthinker_lab.model.checkpoint import CheckpointError
from smallthinker_lab.train import read_checkpoint, train
from smallthinker_lab.train.trainer import (
    CHECKPOINT_FORMAT,
    TrainArgs,
    _load_checkpoint,
    _save_checkpoint,
    param_groups,
    resolve_config,
)
from tests.conftest import random_model
from tests.test_train import RUN, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


class Planted:
    """Unpickling this creates the marker file: what an attacker's checkpoint.pt would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("tokens"), n=3000, n_val=400)


SMALL = {**RUN, "steps": 4, "eval_windows": 1}


def _old_format_state(marker: Path | None = None) -> dict:
    """The layout of checkpoints written before this fix: numpy's RNG state pickled as a tuple with an ndarray."""
    model = random_model()
    state = {"step": 3, "model": model.state_dict(), "optimizer": {}, "args": {}, "config": model.config.to_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "cuda": None}}
    if marker is not None:
        state["extra"] = Planted(marker)
    return state


@pytest.mark.parametrize("how", ["plain pickle", "torch.save", "old format", "old format with payload"])
def test_a_planted_checkpoint_is_refused_and_runs_nothing(corpus, tmp_path, how):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoint.pt"
    if how == "plain pickle":
        ckpt.write_bytes(pickle.dumps({"step": 1, "x": Planted(marker)}))
    elif how == "torch.save":
        torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "step": 1, "x": Planted(marker)}, ckpt)
    else:
        torch.save(_old_format_state(marker if how.endswith("payload") else None), ckpt)
    with pytest.raises(CheckpointError) as err:
        train("smallthinker-test", corpus, out, **SMALL)
    msg = str(err.value)
    assert str(ckpt) in msg and "refusing to load" in msg and "not unpickled" in msg
    assert "--no-resume" in msg
    assert not marker.exists()
    assert ckpt.exists() and not (out / "train_log.jsonl").exists()  # nothing was written over
    # read_checkpoint, the public reader, refuses the same way
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(ckpt)
    assert not marker.exists()
    # --no-resume starts over and replaces the planted file with a safe one
    train("smallthinker-test", corpus, out, **{**SMALL, "resume": False})
    assert read_checkpoint(ckpt)["step"] == SMALL["steps"] and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x80\x04K\x01."])
def test_an_unreadable_checkpoint_names_the_file(tmp_path, content):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(ckpt)):
        read_checkpoint(ckpt)


def test_a_zip_of_plain_data_without_the_marker_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "model": {}}, ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is not a smallthinker-lab training checkpoint"):
        read_checkpoint(ckpt)
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "step": "3", "model": {}, "optimizer": {}, "args": {},
                "config": {}, "rng": {}}, ckpt)
    with pytest.raises(CheckpointError, match="field 'step' is str"):
        read_checkpoint(ckpt)


def _plain_only(obj, where="state"):
    """Every leaf of the stored state is a tensor or a plain Python value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), (where, k)
            _plain_only(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain_only(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)), (where, type(obj))


def _setup(seed=0):
    args = TrainArgs(**SMALL)
    cfg = resolve_config("smallthinker-test")
    model = random_model(seed=seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=args.betas, foreach=True)
    model(torch.randint(0, cfg.vocab_size, (2, 8))).logits.square().mean().backward()
    opt.step()
    return args, cfg, model, opt


def test_state_is_plain_and_every_part_round_trips(tmp_path):
    args, cfg, model, opt = _setup()
    path = tmp_path / "checkpoint.pt"
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    _save_checkpoint(path, model, opt, 3, args, cfg, torch.device("cpu"))
    expect = (random.random(), np.random.rand(), torch.rand(()).item())
    state = torch.load(path, weights_only=True)  # loads with the restricted unpickler: plain data only
    _plain_only(state)
    assert state["args"]["betas"] == [0.9, 0.95] and state["config"]["hidden_size"] == cfg.hidden_size
    # a fresh model and optimizer, other RNG states: loading restores all of them
    _, _, model2, opt2 = _setup(seed=1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert _load_checkpoint(path, model2, opt2, args, cfg, torch.device("cpu")) == 3
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expect
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
    # a different model config is refused by name
    other = resolve_config("smallthinker-test")
    other.rope_theta = other.rope_theta * 2
    with pytest.raises(ValueError, match="rope_theta"):
        _load_checkpoint(path, model2, opt2, args, other, torch.device("cpu"))


KILL = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from smallthinker_lab.train.trainer import TrainArgs, _save_checkpoint, param_groups, resolve_config
    from tests.conftest import random_model
    point, path = sys.argv[1], Path(sys.argv[2])
    die = lambda *a, **k: os._exit(9)
    if point == "fsync":
        os.fsync = die
    elif point == "replace":
        os.replace = die
    elif point == "save":  # half the archive written, then killed
        def save(obj, f, **kw):
            f.write(b"PK\\x03\\x04 partial")
            f.flush()
            os._exit(9)
        torch.save = save
    model = random_model(seed=3)
    opt = torch.optim.AdamW(param_groups(model, 0.1))
    _save_checkpoint(path, model, opt, 9, TrainArgs(), resolve_config("smallthinker-test"), torch.device("cpu"))
""")


@pytest.mark.parametrize("point", ["save", "fsync", "replace"])
def test_a_writer_killed_mid_write_leaves_the_old_checkpoint(tmp_path, point):
    args, cfg, model, opt = _setup()
    path = tmp_path / "checkpoint.pt"
    _save_checkpoint(path, model, opt, 3, args, cfg, torch.device("cpu"))
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL, point, str(path)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err.decode()[-2000:]
    assert path.read_bytes() == before and read_checkpoint(path)["step"] == 3
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt")
    assert stale == [f"checkpoint.pt.tmp-{proc.pid}"]
    # the next write removes the dead writer's temporary and leaves only the new checkpoint
    _save_checkpoint(path, model, opt, 4, args, cfg, torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert read_checkpoint(path)["step"] == 4


def test_the_temporary_is_not_opened_through_a_symlink(tmp_path):
    args, cfg, model, opt = _setup()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / f"checkpoint.pt.tmp-{os.getpid()}").symlink_to(victim)
    _save_checkpoint(out / "checkpoint.pt", model, opt, 1, args, cfg, torch.device("cpu"))
    assert victim.read_text() == "keep me"
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_the_cli_refuses_a_planted_checkpoint_in_one_line(corpus, tmp_path, capsys):
    from smallthinker_lab.cli import main

    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    torch.save({"x": Planted(marker)}, ckpt)
    rc = main(["train", "--config", "smallthinker-test", "--data", str(corpus), "--out", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(ckpt) in err and "refusing to load" in err
    assert not marker.exists()
