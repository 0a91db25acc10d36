"""Kill tests of every folder write: a process killed at any write step leaves the old state or the new one.

Each kill runs the write in a forked child whose fault hook (``smallthinker_lab.model.atomic._fault``) calls
``os._exit`` at a named step: no ``finally`` block, no cleanup, as when the process is killed. The parent then checks
that the folder loads and equals what was there before (a kill before the swap) or what was being written (after),
never a mix, that files the writer does not own survive, and that the next write removes the killed one's leftovers.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model

import smallthinker_lab as sl
from smallthinker_lab.instruments import Recording
from smallthinker_lab.instruments.recording import RecordingError
from smallthinker_lab.model import atomic, generate
from smallthinker_lab.model.checkpoint import load_model, save_pretrained

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")]

KILLED = 17


def killed_at(step: str, write, nth: int = 1) -> None:
    """Run ``write()`` in a forked child that dies at the ``nth`` time it reaches ``step``; assert it got there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            seen = [0]

            def hook(s: str) -> None:
                if s == step:
                    seen[0] += 1
                    if seen[0] == nth:
                        os._exit(KILLED)

            atomic._fault = hook
            write()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == KILLED, \
        f"the write did not reach step {step!r} (#{nth}): exit status {status}"


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def leftovers(folder: Path) -> list[str]:
    """Entries next to ``folder`` other than itself (staging and set-aside folders)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# ----------------------------------------------------------------- checkpoints
USER_FILES = {"tokenizer.json": b'{"model": "mine"}', "expert_bundle/experts.bin": b"\x01\x02" * 100,
              "expert_bundle/index.json": b"{}", "notes/deep/readme.txt": b"keep me"}


def model(seed: int, who: str):
    m = random_model(seed=seed)
    m.config.extra["saved_by"] = who  # config.json differs between the two saves, not only the weights
    return m


@pytest.fixture(scope="module")
def models():
    return model(1, "old"), model(2, "new")


@pytest.fixture(scope="module")
def references(models, tmp_path_factory):
    """What each model looks like saved with each layout, for comparison."""
    root = tmp_path_factory.mktemp("refs")
    return {(who, shard): state(save_pretrained(m, root / f"{who}-{shard}", max_shard_size=shard))
            for who, m in zip(("old", "new"), models) for shard in (None, "300KB")}


def state(folder: Path) -> dict:
    """Everything a checkpoint folder says: files, config.json, tensors as loaded."""
    m = load_model(folder)
    return {"files": sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.name not in (*USER_FILES, "link")),
            "config": json.loads((folder / "config.json").read_text()),
            "tensors": {k: v.clone() for k, v in m.state_dict().items()}}


def assert_same(got: dict, want: dict) -> None:
    assert got["files"] == want["files"]
    assert got["config"] == want["config"]
    assert got["tensors"].keys() == want["tensors"].keys()
    for k, v in want["tensors"].items():
        assert torch.equal(got["tensors"][k], v), k


def user_files_intact(folder: Path) -> None:
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name
    assert os.readlink(folder / "link") == "tokenizer.json"


def old_checkpoint(models, tmp_path: Path, shard) -> Path:
    folder = tmp_path / "work" / "ckpt"
    save_pretrained(models[0], folder, max_shard_size=shard)
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "link").symlink_to("tokenizer.json")
    return folder


SWITCHES = [(None, "300KB"), ("300KB", None)]  # single file -> shards, shards -> single file
BEFORE = ["staging-created", "shard-written", "weights-written", "config-written", "carried-over", "before-swap"]
AFTER = ["after-swap", "done"]


@pytest.mark.parametrize("old_shard,new_shard", SWITCHES, ids=["single-to-sharded", "sharded-to-single"])
@pytest.mark.parametrize("step", [*BEFORE, "index-written", *AFTER])
def test_save_pretrained_killed_at_each_step_leaves_old_or_new(models, references, tmp_path, step, old_shard,
                                                               new_shard):
    if step == "index-written" and new_shard is None:
        pytest.skip("a single-file save writes no index")
    folder = old_checkpoint(models, tmp_path, old_shard)
    killed_at(step, lambda: save_pretrained(models[1], folder, max_shard_size=new_shard))
    expect = ("new", new_shard) if step in AFTER else ("old", old_shard)
    assert_same(state(folder), references[expect])
    user_files_intact(folder)
    if step not in ("done",):
        assert leftovers(folder), "the killed save should have left its staging folder"
    # the next save removes the killed one's leftovers and writes what it is asked to
    save_pretrained(models[1], folder, max_shard_size=new_shard)
    assert leftovers(folder) == []
    assert_same(state(folder), references[("new", new_shard)])
    user_files_intact(folder)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_killed_between_shards_leaves_the_old_checkpoint(models, references, tmp_path):
    folder = old_checkpoint(models, tmp_path, None)
    killed_at("shard-written", lambda: save_pretrained(models[1], folder, max_shard_size="300KB"), nth=2)
    assert_same(state(folder), references[("old", None)])


def test_killed_saving_into_a_new_folder_leaves_no_folder(models, references, tmp_path):
    folder = tmp_path / "work" / "fresh"
    killed_at("before-swap", lambda: save_pretrained(models[1], folder))
    assert not folder.exists()
    killed_at("after-swap", lambda: save_pretrained(models[1], folder))
    assert_same(state(folder), references[("new", None)])
    save_pretrained(models[1], folder)
    assert leftovers(folder) == []


def test_without_an_atomic_swap_a_kill_between_the_renames_is_undone_by_the_next_save(models, references, tmp_path,
                                                                                      monkeypatch):
    """Where the file system cannot exchange two folders, the old one is set aside and the new one renamed in; a kill
    between the two leaves no folder, and the next write (or clean_stale) puts the old one back first."""
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # as on a file system without RENAME_EXCHANGE
    folder = old_checkpoint(models, tmp_path, None)
    killed_at("before-swap", lambda: save_pretrained(models[1], folder, max_shard_size="300KB"))
    assert_same(state(folder), references[("old", None)])
    killed_at("mid-swap", lambda: save_pretrained(models[1], folder, max_shard_size="300KB"))
    assert not folder.exists() and any(".old-" in n for n in leftovers(folder))
    atomic.clean_stale(folder)
    assert_same(state(folder), references[("old", None)])
    user_files_intact(folder)
    assert leftovers(folder) == []
    killed_at("mid-swap", lambda: save_pretrained(models[1], folder, max_shard_size="300KB"))
    save_pretrained(models[1], folder)  # restores the old folder, then replaces it
    assert_same(state(folder), references[("new", None)])
    user_files_intact(folder)
    assert leftovers(folder) == []
    killed_at("after-swap", lambda: save_pretrained(models[0], folder))
    assert_same(state(folder), references[("old", None)])


def test_a_real_sigkill_at_the_config_write_in_a_fresh_interpreter(models, references, tmp_path):
    """The issue's case: killed around config.json, the folder must not load the new weights with the old config."""
    folder = old_checkpoint(models, tmp_path, None)
    new = tmp_path / "new-model"
    save_pretrained(models[1], new)
    script = textwrap.dedent(f"""
        import os, signal
        from smallthinker_lab.model import atomic, load_model, save_pretrained
        model = load_model({str(new)!r})
        model.config.extra["saved_by"] = "new"
        atomic._fault = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == "config-written" else None
        save_pretrained(model, {str(folder)!r}, max_shard_size="300KB")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert_same(state(folder), references[("old", None)])
    user_files_intact(folder)
    save_pretrained(models[1], folder, max_shard_size="300KB")
    assert leftovers(folder) == []
    assert_same(state(folder), references[("new", "300KB")])


def test_leftovers_of_live_processes_are_kept_and_old_in_folder_temporaries_go(models, tmp_path):
    folder = old_checkpoint(models, tmp_path, None)
    live = folder.with_name(f".ckpt.save-{os.getpid()}-0123abcd")  # a save of this (live) process
    live.mkdir()
    dead = folder.with_name(f".ckpt.save-{dead_pid()}-0123abcd")
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    stale = [f".model.safetensors.tmp-{dead_pid()}", f".config.tmp-{dead_pid()}.json"]  # the in-place writer's
    for name in stale:
        (folder / name).write_bytes(b"half")
    save_pretrained(models[1], folder)
    assert leftovers(folder) == [live.name]
    assert not any((folder / name).exists() for name in stale)
    user_files_intact(folder)


def test_save_through_a_symlink_and_from_inside_the_folder(models, references, tmp_path, monkeypatch):
    folder = old_checkpoint(models, tmp_path, None)
    link = tmp_path / "alias"
    link.symlink_to(folder)
    save_pretrained(models[1], link, max_shard_size="300KB")
    assert link.is_symlink() and link.resolve() == folder
    assert_same(state(folder), references[("new", "300KB")])
    monkeypatch.chdir(folder)
    save_pretrained(models[0], ".")
    assert Path.cwd() == folder and (Path.cwd() / "config.json").exists()  # this process follows the new folder
    assert_same(state(Path(".")), references[("old", None)])
    user_files_intact(folder)


def test_a_folder_that_is_a_file_and_a_mount_point_are_refused_or_written_in_place(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file exists and is not a folder"):
        atomic.target_folder(tmp_path / "file")
    reason = atomic.staging_unavailable("/")
    assert reason is not None and "/ is a mount point" in reason
    assert atomic.staging_unavailable(tmp_path / "a" / "b") is None


# ----------------------------------------------------------------- recordings
def record(seed: int, full: bool, n_new: int):
    m = random_model(seed=seed)
    prompt = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(seed))
    with sl.record(m, full=full) as rec:
        generate(m, prompt, n_new, stop_tokens=[])
    assert rec.meta  # builds the arrays
    return rec


@pytest.fixture(scope="module")
def recordings():
    # different kinds of tables, arrays and metadata: a mix is visible
    return record(1, full=False, n_new=2), record(2, full=True, n_new=4)


def same_recording(got: Recording, want: Recording) -> None:
    assert got.meta == want.meta
    assert sorted(got._arrays) == sorted(want._arrays)
    for n, a in want._arrays.items():
        assert np.array_equal(got._arrays[n], a), n


def old_recording(recordings, tmp_path: Path) -> Path:
    folder = recordings[0].save(tmp_path / "work" / "rec")
    (folder / "plot.png").write_bytes(b"png")  # a file the recording does not own
    return folder


REC_BEFORE = ["staging-created", "table-written", "arrays-written", "meta-written", "carried-over", "before-swap"]


@pytest.mark.parametrize("step", [*REC_BEFORE, *AFTER])
def test_recording_save_killed_at_each_step_leaves_old_or_new(recordings, tmp_path, step):
    old, new = recordings
    folder = old_recording(recordings, tmp_path)
    killed_at(step, lambda: new.save(folder))
    same_recording(Recording.load(folder), new if step in AFTER else old)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["meta.json", "arrays.npz", "plot.png", *json.loads((folder / "meta.json").read_text())["tables"]])
    assert (folder / "plot.png").read_bytes() == b"png"
    new.save(folder)
    assert leftovers(folder) == []
    same_recording(Recording.load(folder), new)


def test_recording_written_in_place_refuses_to_load_a_mix(recordings, tmp_path, monkeypatch, caplog):
    """Where no staging folder can be made, a kill leaves a folder load() refuses with a clear error, never a mix."""
    old, new = recordings
    folder = old_recording(recordings, tmp_path)
    monkeypatch.setattr(atomic, "staging_unavailable", lambda path: f"{path} is a mount point")
    for step in ("table-written", "arrays-written"):
        killed_at(step, lambda: new.save(folder))
        with pytest.raises(FileNotFoundError, match=rf"no meta\.json in recording folder {re.escape(str(folder))}"):
            Recording.load(folder)
    with caplog.at_level(logging.WARNING):
        new.save(folder)
    assert "writing the recording in place" in caplog.text
    same_recording(Recording.load(folder), new)
    killed_at("meta-written", lambda: old.save(folder))
    same_recording(Recording.load(folder), old)
    assert not (folder / "router_logits.parquet").exists()  # the earlier save's tables go
    assert (folder / "plot.png").read_bytes() == b"png"


@pytest.mark.parametrize("swap", ["arrays.npz", "experts.parquet"])
def test_recording_load_names_a_file_of_another_save(recordings, tmp_path, swap):
    a = recordings[0].save(tmp_path / "a")
    b = recordings[1].save(tmp_path / "b")
    shutil.copyfile(b / swap, a / swap)
    with pytest.raises(RecordingError, match=rf"{re.escape(str(a / swap))} does not belong to this recording"):
        Recording.load(a)


def test_recording_load_names_a_damaged_or_missing_file(recordings, tmp_path):
    a = recordings[0].save(tmp_path / "a")
    data = bytearray((a / "arrays.npz").read_bytes())
    data[100] ^= 1  # same size, other content
    (a / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=rf"{re.escape(str(a / 'arrays.npz'))} does not belong.*sha256"):
        Recording.load(a)
    b = recordings[0].save(tmp_path / "b")
    (b / "steps.parquet").unlink()
    with pytest.raises(RecordingError, match=rf"{re.escape(str(b))}: steps\.parquet is missing, but meta\.json "
                                             r"records it"):
        Recording.load(b)
    c = recordings[0].save(tmp_path / "c")
    meta = json.loads((c / "meta.json").read_text())
    meta["files"]["../../etc/passwd"] = meta["files"].pop("steps.parquet")
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RecordingError, match=r"meta\.json records no size and sha256 of steps\.parquet"):
        Recording.load(c)
    meta["tables"].remove("steps.parquet")
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RecordingError, match=r"'\.\./\.\./etc/passwd' that is not a plain file name"):
        Recording.load(c)
    (c / "meta.json").write_text("[1, 2")
    with pytest.raises(RecordingError, match=rf"{re.escape(str(c / 'meta.json'))} is not a recording's metadata"):
        Recording.load(c)


def test_recording_of_an_older_version_without_hashes_loads_with_a_warning(recordings, tmp_path, caplog):
    a = recordings[0].save(tmp_path / "a")
    meta = json.loads((a / "meta.json").read_text())
    del meta["files"]
    (a / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        same_recording(Recording.load(a), recordings[0])
    assert "records no hashes of its files" in caplog.text and str(a) in caplog.text


def test_recording_save_drops_tables_of_an_earlier_save(recordings, tmp_path):
    folder = recordings[1].save(tmp_path / "r")  # full: has router_logits.parquet
    assert (folder / "router_logits.parquet").exists()
    recordings[0].save(folder)
    assert not (folder / "router_logits.parquet").exists()
    same_recording(Recording.load(folder), recordings[0])
