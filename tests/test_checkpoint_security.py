"""A checkpoint folder someone else could write: every reader (load_model, the engine, convert) refuses the same bad
folders with a clear error naming the file, and nothing outside the folder is read, written or truncated.

Issue 14, holes 3 (shard paths), 4 (symbolic links), 8 (config.json sizes), 9 (stale temporaries) and the unclear
errors of non-contiguous safetensors data and malformed bundle indexes."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smallthinker_lab import CheckpointError, SmallThinkerConfig, load_model
from smallthinker_lab.engine import BundleError, Engine, convert
from smallthinker_lab.engine import bundle as bundle_mod
from smallthinker_lab.engine.bundle import DATA_NAME, INDEX_NAME, open_bundle
from smallthinker_lab.engine.conversion import ensure_bundle
from smallthinker_lab.model import checkpoint as ckpt
from smallthinker_lab.model import write_synthetic_checkpoint

REPO = Path(__file__).resolve().parents[1]
NORM = "model.norm.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides) -> SmallThinkerConfig:
    return SmallThinkerConfig.from_name("smallthinker-test", **overrides)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("security")
    single = write_synthetic_checkpoint(base / "single", config(), dtype=torch.float32)
    sharded = write_synthetic_checkpoint(base / "sharded", config(), dtype=torch.float32, max_shard_size="100KB")
    return single, sharded


@pytest.fixture
def single(sources, tmp_path) -> Path:
    return Path(shutil.copytree(sources[0], tmp_path / "single"))


@pytest.fixture
def sharded(sources, tmp_path) -> Path:
    return Path(shutil.copytree(sources[1], tmp_path / "sharded"))


# the three readers of a checkpoint folder: each must refuse what load_model refuses
def _load(folder):
    return load_model(folder)


def _engine(folder):
    with Engine.from_pretrained(folder, memory_limit=None, progress=False):
        pass


def _convert(folder):
    return convert(folder, folder.parent / "bundle-out", progress=False)


READERS = pytest.mark.parametrize("read", [_load, _engine, _convert], ids=["load_model", "engine", "convert"])


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) -> its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def index_of(folder: Path) -> dict:
    return json.loads((folder / ckpt.INDEX_FILE).read_text())


def remap(folder: Path, shard: str, to: str) -> list[str]:
    """Point every tensor the index maps to ``shard`` at ``to``; returns those tensor names."""
    idx = index_of(folder)
    names = [n for n, s in idx["weight_map"].items() if s == shard]
    idx["weight_map"].update({n: to for n in names})
    (folder / ckpt.INDEX_FILE).write_text(json.dumps(idx))
    return names


FIRST_SHARD = "model-00001-of-00012.safetensors"


# ---------------------------------------------------------------- hole 3: shard paths
@READERS
def test_a_shard_path_outside_the_folder_is_refused(sharded, read):
    outside = sharded.parent / "outside.safetensors"
    shutil.move(sharded / FIRST_SHARD, outside)  # a valid shard, so only the path is wrong
    remap(sharded, FIRST_SHARD, "../outside.safetensors")
    with pytest.raises(CheckpointError, match=r"index\.json names shard \.\./outside\.safetensors .*outside the "
                                              r"checkpoint folder"):
        read(sharded)
    assert not (sharded.parent / "bundle-out").exists()


@READERS
@pytest.mark.parametrize("target", ["absolute", "/etc/passwd"])
def test_an_absolute_shard_path_is_refused_as_outside_not_as_missing(sharded, read, target):
    path = str(sharded.parent / "outside.safetensors") if target == "absolute" else target
    if target == "absolute":
        shutil.move(sharded / FIRST_SHARD, path)
    remap(sharded, FIRST_SHARD, path)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as err:
        read(sharded)
    assert path in str(err.value) and "does not exist" not in str(err.value)


@READERS
def test_a_shard_in_a_subfolder_is_refused(sharded, read):
    (sharded / "sub").mkdir()
    shutil.move(sharded / FIRST_SHARD, sharded / "sub" / FIRST_SHARD)
    remap(sharded, FIRST_SHARD, f"sub/{FIRST_SHARD}")
    with pytest.raises(CheckpointError, match=rf"names shard sub/{FIRST_SHARD} \(for .*\), which is not the name of a "
                                              rf"file in the checkpoint folder"):
        read(sharded)


@READERS
@pytest.mark.parametrize("file", [FIRST_SHARD, ckpt.INDEX_FILE, ckpt.CONFIG_FILE])
def test_a_symlink_to_a_file_outside_the_folder_is_refused(sharded, read, file):
    outside = sharded.parent / f"outside-{file}"
    shutil.move(sharded / file, outside)
    (sharded / file).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{file}.* is a symbolic link to {outside}, outside the checkpoint "
                                              f"folder {sharded}"):
        read(sharded)


@READERS
def test_a_single_weight_file_linked_from_elsewhere_is_refused(single, read):
    outside = single.parent / "elsewhere.safetensors"
    shutil.move(single / ckpt.SINGLE_FILE, outside)
    (single / ckpt.SINGLE_FILE).symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symbolic link to .*elsewhere.safetensors, outside the checkpoint"):
        read(single)


def test_links_inside_the_folder_and_into_the_hub_cache_blobs_load(sharded, tmp_path):
    """What is not refused: a link to another file of the folder, and the Hugging Face hub cache's layout
    (snapshots/REV/file -> ../../blobs/SHA), both reading only files of the checkpoint."""
    want = load_model(sharded).model.norm.weight.clone()
    shutil.move(sharded / FIRST_SHARD, sharded / "blob-1")
    (sharded / FIRST_SHARD).symlink_to("blob-1")
    assert torch.equal(load_model(sharded).model.norm.weight, want)

    hub = tmp_path / "models--x--y"
    snap = hub / "snapshots" / "0123abcd"
    (hub / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(sharded.iterdir()):
        blob = hub / "blobs" / f"sha-{p.name}"
        shutil.copyfile(p.resolve(), blob)
        if not p.is_symlink() and p.name != "blob-1":
            (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (snap / FIRST_SHARD).symlink_to(Path("..") / ".." / "blobs" / f"sha-{FIRST_SHARD}")
    assert torch.equal(load_model(snap).model.norm.weight, want)
    with Engine.from_pretrained(snap, memory_limit=None, progress=False) as e:
        assert torch.equal(e.model.model.norm.weight, want)


@pytest.mark.parametrize("name", ["x" * 5000, ".", "..", "", "a\0b", "loop.safetensors"])
def test_shard_names_the_file_system_cannot_take_are_refused_clearly(sharded, name):
    if name == "loop.safetensors":
        (sharded / name).symlink_to(name)
    remap(sharded, FIRST_SHARD, name)
    with pytest.raises(CheckpointError, match=r"index\.json names shard .*(outside the checkpoint folder|not the name "
                                              r"of a file|cannot be examined|characters)"):
        load_model(sharded)


@READERS
def test_a_shard_that_is_not_a_regular_file_is_refused_without_hanging(sharded, read):
    (sharded / FIRST_SHARD).unlink()
    os.mkfifo(sharded / FIRST_SHARD)  # opening a FIFO for reading blocks until someone writes
    with pytest.raises(CheckpointError, match=f"{FIRST_SHARD} is not a regular file"):
        read(sharded)


@READERS
def test_every_reader_refuses_an_integer_norm(single, read):
    tensors = load_file(single / ckpt.SINGLE_FILE)
    tensors[NORM] = tensors[NORM].to(torch.int32)
    save_file(tensors, single / ckpt.SINGLE_FILE)
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {NORM} has dtype I32; weights must be"):
        read(single)


@READERS
def test_every_reader_refuses_both_a_single_file_and_an_index(single, sharded, read):
    shutil.copyfile(single / ckpt.SINGLE_FILE, sharded / ckpt.SINGLE_FILE)
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        read(sharded)


@READERS
def test_every_reader_refuses_an_unexpected_tensor(single, read):
    tensors = load_file(single / ckpt.SINGLE_FILE)
    tensors["model.layers.1" + "7" * 5000 + ".x.weight"] = torch.ones(2)  # int() of 5000 digits raises ValueError
    save_file(tensors, single / ckpt.SINGLE_FILE)
    with pytest.raises(CheckpointError, match="1 unexpected tensor"):
        read(single)


# ---------------------------------------------------------------- hole 4: symbolic links in the folder
def test_a_symlinked_convert_lock_is_refused_and_its_target_untouched(single, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious data\n" * 100)
    before = snapshot(victim)
    out = single / "expert_bundle"
    out.mkdir()
    (out / ".convert.lock").symlink_to(victim)
    with pytest.raises(BundleError, match=r"the conversion lock .*\.convert\.lock is a symbolic link"):
        Engine.from_pretrained(single, memory_limit=None, progress=False)
    with pytest.raises(BundleError, match="is a symbolic link"):
        ensure_bundle(single, None, None, progress=False)
    assert snapshot(victim) == before


def test_an_existing_lock_file_is_reused_and_never_truncated(single):
    out = single / "expert_bundle"
    out.mkdir()
    (out / ".convert.lock").write_bytes(b"not empty")
    ensure_bundle(single, None, None, progress=False)
    assert (out / ".convert.lock").read_bytes() == b"not empty"  # opened without O_TRUNC
    open_bundle(out, config())


@pytest.mark.parametrize("how", ["engine", "convert", "ensure_bundle"])
def test_a_symlinked_bundle_folder_is_refused_unless_chosen_explicitly(single, tmp_path, how):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_bytes(b"keep me")
    before = snapshot(elsewhere)
    (single / "expert_bundle").symlink_to(elsewhere)
    run = {"engine": lambda: Engine.from_pretrained(single, memory_limit=None, progress=False),
           "convert": lambda: convert(single, progress=False),
           "ensure_bundle": lambda: ensure_bundle(single, None, None, progress=False)}[how]
    with pytest.raises(BundleError, match=f"default bundle folder {single / 'expert_bundle'} is a symbolic link to "
                                          f"{elsewhere}, outside the checkpoint folder"):
        run()
    assert snapshot(elsewhere) == before and sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    # the user's own choice of that folder is used as it is
    with Engine.from_pretrained(single, memory_limit=None, progress=False, bundle_dir=elsewhere) as e:
        assert e.bundle_dir == elsewhere
    assert (elsewhere / INDEX_NAME).is_file() and (elsewhere / "keep.txt").read_bytes() == b"keep me"


def test_links_in_place_of_bundle_files_and_temporaries_are_never_written_through(single, tmp_path, monkeypatch):
    """experts.bin / experts.json as links to files elsewhere, and a link planted under the name of the next
    conversion's temporary: the conversion replaces the links with its own files; the targets keep their bytes."""
    out = tmp_path / "b"
    out.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in (DATA_NAME, INDEX_NAME, "tmp")}
    for v in victims.values():
        v.write_bytes(b"do not touch " * 50)
    before = {k: v.read_bytes() for k, v in victims.items()}
    (out / DATA_NAME).symlink_to(victims[DATA_NAME])
    (out / INDEX_NAME).symlink_to(victims[INDEX_NAME])
    fixed = uuid.UUID(int=0xABCDEF12 << 96)
    monkeypatch.setattr(bundle_mod.uuid, "uuid4", lambda: fixed)
    planted = out / f".{DATA_NAME}.tmp-{os.getpid()}-{fixed.hex[:8]}"
    planted.symlink_to(victims["tmp"])
    convert(single, out, progress=False)
    assert {k: v.read_bytes() for k, v in victims.items()} == before
    assert not (out / DATA_NAME).is_symlink() and not (out / INDEX_NAME).is_symlink()
    assert open_bundle(out, config()).bundle_id == fixed.hex
    assert sorted(p.name for p in out.iterdir()) == [DATA_NAME, INDEX_NAME]
    # and the exclusive open itself: an existing name, link or file, is never opened
    planted.symlink_to(victims["tmp"])
    with pytest.raises(FileExistsError):
        bundle_mod._create_exclusive(planted, [])
    assert victims["tmp"].read_bytes() == before["tmp"]


# ---------------------------------------------------------------- hole 8: config.json sizes
@READERS
@pytest.mark.parametrize("key, value, layouts", [
    ("moe_num_primary_experts", 1_000_000_000, True),
    ("num_hidden_layers", 1_000_000_000, False),  # without layouts: SmallThinkerConfig would build 1e9-entry lists
    ("num_hidden_layers", 1e9, False),
    ("num_hidden_layers", 5, False),
])
def test_config_sizes_the_weights_cannot_back_are_refused_at_once(single, read, key, value, layouts):
    d = json.loads((single / ckpt.CONFIG_FILE).read_text())
    d[key] = value
    if not layouts:
        d.pop("rope_layout")
        d.pop("sliding_window_layout")
    (single / ckpt.CONFIG_FILE).write_text(json.dumps(d))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"config\.json: {key} is {value!r}, but the weights .* hold tensors "
                                              rf"of only (4 layers|8 experts)"):
        read(single)
    assert time.perf_counter() - t0 < 1.0


def test_a_config_describing_far_more_tensors_than_stored_is_refused(tmp_path):
    """Layer and expert numbers that are all present, but each by one tiny tensor: the count of tensors the config
    describes (layers x experts) may not exceed twice what is stored, with strict=False too."""
    folder = tmp_path / "m"
    folder.mkdir()
    n = 300
    tensors = {f"model.layers.{i}.block_sparse_moe.experts.{i}.gate.weight": torch.zeros(1) for i in range(n)}
    save_file(tensors, folder / ckpt.SINGLE_FILE)
    d = config().to_dict()
    d.update(num_hidden_layers=n, moe_num_primary_experts=n, rope_layout=[1] * n, sliding_window_layout=[0] * n)
    (folder / ckpt.CONFIG_FILE).write_text(json.dumps(d))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"config\.json: num_hidden_layers={n} x moe_num_primary_experts={n} "
                                              rf"describe {3 + n * (7 + 3 * n)} tensors, but the weights .* hold only"):
        load_model(folder, strict=False)
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------- hole 9: stale temporaries
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_conversion(single, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / f".{DATA_NAME}.tmp-{dead}", out / f".{INDEX_NAME}.tmp-{dead}-0123abcd"]
        kept = [out / f".{DATA_NAME}.tmp-{live.pid}", out / "unrelated.tmp-1"]
        for p in stale + kept:
            p.write_bytes(b"x" * 4096)
        convert(single, out, progress=False)
        assert not any(p.exists() for p in stale)
        assert all(p.read_bytes() == b"x" * 4096 for p in kept)  # another live process's temporary, not ours
        open_bundle(out, config())
    finally:
        live.kill()
        live.wait()


def test_this_process_keeps_its_own_live_temporaries_only(tmp_path):
    ours = tmp_path / f".{DATA_NAME}.tmp-{os.getpid()}-00000001"
    earlier = tmp_path / f".{DATA_NAME}.tmp-{os.getpid()}"  # an earlier process that had our pid
    for p in (ours, earlier):
        p.write_bytes(b"y")
    bundle_mod._LIVE_TEMPS.add(str(ours))
    try:
        assert bundle_mod.remove_stale_temporaries(tmp_path) == [earlier]
        assert ours.exists()
    finally:
        bundle_mod._LIVE_TEMPS.discard(str(ours))


KILLED = textwrap.dedent("""
    import os, signal, sys
    from smallthinker_lab.engine import conversion
    real, calls = conversion.get_format, [0]
    class Killed:
        def __init__(self, fmt):
            self.fmt = real(fmt)
        def __getattr__(self, name):
            return getattr(self.fmt, name)
        def encode(self, w):
            calls[0] += 1
            if calls[0] == 30:  # half way through the experts: the process is killed, nothing is cleaned up
                os.kill(os.getpid(), signal.SIGKILL)
            return self.fmt.encode(w)
    conversion.get_format = Killed
    conversion.ensure_bundle(sys.argv[1], None, None, progress=False)
""")


def test_a_killed_conversion_leaves_a_temporary_that_the_next_one_removes(single):
    r = subprocess.run([sys.executable, "-c", KILLED, str(single)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    out = single / "expert_bundle"
    left = [p for p in out.iterdir() if p.name.startswith(f".{DATA_NAME}.tmp-")]
    assert left and left[0].stat().st_size > 0 and not (out / INDEX_NAME).exists()
    with Engine.from_pretrained(single, memory_limit=None, progress=False) as e:
        assert e.bundle.num_experts == config().num_experts
    assert sorted(p.name for p in out.iterdir()) == [".convert.lock", DATA_NAME, INDEX_NAME]


# ---------------------------------------------------------------- unclear errors: safetensors data layout
def _split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(file: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@READERS
def test_tensor_data_with_a_gap_is_refused_naming_file_and_tensors(single, read):
    file = single / ckpt.SINGLE_FILE
    header, data = _split(file)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    (first, a), (second, _) = entries[0], entries[1]
    cut = a["data_offsets"][1]
    for _, v in entries[1:]:  # 64 bytes that belong to no tensor after the first
        v["data_offsets"] = [v["data_offsets"][0] + 64, v["data_offsets"][1] + 64]
    _join(file, header, data[:cut] + bytes(64) + data[cut:])
    with pytest.raises(CheckpointError, match=f"{file} is corrupt: its tensor data is not contiguous: data bytes "
                                              f"{cut} to {cut + 64} between tensors {first} and {second}"):
        read(single)


@READERS
def test_trailing_bytes_and_overlapping_tensors_are_refused(single, read):
    file = single / ckpt.SINGLE_FILE
    original = file.read_bytes()
    file.write_bytes(original + bytes(100))
    with pytest.raises(CheckpointError, match=f"{file} is corrupt: .*the last 100 bytes of the file .*belong to no "
                                              f"tensor"):
        read(single)
    header, data = _split(file)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    b = entries[1][1]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [entries[0][1]["data_offsets"][0], entries[0][1]["data_offsets"][0] + size]
    _join(file, header, data[:-100])
    with pytest.raises(CheckpointError, match=f"{file} is corrupt: .*overlap"):
        read(single)


def test_a_safetensors_failure_after_the_checks_names_file_and_tensor(single, monkeypatch):
    """The header checks should leave nothing for safe_open to refuse; if it does anyway (the file changed in
    between), the error is still a CheckpointError naming the file and the tensor, not a raw SafetensorError."""
    real = ckpt.read_checkpoint

    def then_truncate(*a, **k):
        checked = real(*a, **k)
        file = single / ckpt.SINGLE_FILE
        file.write_bytes(file.read_bytes()[:-8])
        return checked

    monkeypatch.setattr(ckpt, "read_checkpoint", then_truncate)
    with pytest.raises(CheckpointError, match=f"{single / ckpt.SINGLE_FILE}: cannot read (opening it|tensor )"):
        load_model(single)


# ---------------------------------------------------------------- unclear errors: bundle index values
@pytest.fixture(scope="module")
def bundle_src(sources, tmp_path_factory):
    return convert(sources[0], tmp_path_factory.mktemp("bundle") / "b", progress=False)


def _bad_index(bundle_src, tmp_path, mutate) -> Path:
    out = Path(shutil.copytree(bundle_src, tmp_path / "bad"))
    idx = json.loads((out / INDEX_NAME).read_text())
    mutate(idx)
    (out / INDEX_NAME).write_text(json.dumps(idx))
    return out


@pytest.mark.parametrize("mutate, message", [
    (lambda i: i["experts"][1][2].update(offset=2**70), r"layer 1 expert 2: offset is 1180591620717411303424, not an "
                                                        r"integer in \[0, 4611686018427387904\)"),
    (lambda i: i["experts"][0][0].update(offset="4096"), r"layer 0 expert 0: offset is '4096', not an integer"),
    (lambda i: i["experts"][3][7].pop("checksum"), r"layer 3 expert 7: key 'checksum' is missing"),
    (lambda i: i["experts"][0][1].update(checksum=2**70), r"layer 0 expert 1: checksum is 1180591620717411303424"),
    (lambda i: i["experts"][0][1].update(gate=None), r"layer 0 expert 1: gate is None, not an integer"),
    (lambda i: i["experts"][2].__setitem__(0, [1, 2]), r"layer 2 expert 0: the entry is \[1, 2\], not an object"),
    (lambda i: i.update(num_layers="4"), r"num_layers is '4', not an integer in \[1, "),
    (lambda i: i.update(num_experts=True), r"num_experts is True, not an integer"),
    (lambda i: i.update(file_size=2**70), r"file_size is 1180591620717411303424, not an integer"),
    (lambda i: i.pop("stride"), r"key 'stride' is missing"),
    (lambda i: i.pop("format"), r"key 'format' is missing"),
    (lambda i: i.update(format=["fp32"]), r"format is \['fp32'\], not a str"),
    (lambda i: i.update(format="fp5"), r"format 'fp5': unknown weight format"),
    (lambda i: i.update(matrices=[]), r"matrices is \[\], not a dict"),
    (lambda i: i["matrices"].update(up=7), r"matrix up layout 7 does not match"),
    (lambda i: i.update(experts={}), r"experts is \{\}, not a list"),
    (lambda i: i.update(bundle_id=None), r"bundle_id is None, not a str"),
    (lambda i: i.update(source=[]), r"source is \[\], not an object"),
])
def test_malformed_bundle_index_values_name_the_file_and_key(bundle_src, tmp_path, mutate, message):
    out = _bad_index(bundle_src, tmp_path, mutate)
    with pytest.raises(BundleError, match=rf"{out / INDEX_NAME}: {message}"):
        open_bundle(out)


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"experts"', "null", '{"magic": NaN}'])
def test_an_index_that_is_no_object_is_refused(bundle_src, tmp_path, text):
    out = Path(shutil.copytree(bundle_src, tmp_path / "bad"))
    (out / INDEX_NAME).write_text(text)
    with pytest.raises(BundleError, match=rf"{out / INDEX_NAME} is not (an expert bundle index|valid JSON)"):
        open_bundle(out)
    assert bundle_mod._index_summary(out) is None  # what ensure_bundle reads to decide whether to convert


def test_the_engine_reports_a_malformed_index_as_a_bundle_error(single):
    out = convert(single, progress=False)
    idx = json.loads((out / INDEX_NAME).read_text())
    idx["experts"][0][0]["offset"] = 2**70
    (out / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(BundleError, match=rf"{out / INDEX_NAME}: layer 0 expert 0: offset is {2**70}, not an integer"):
        Engine.from_pretrained(single, memory_limit=None, progress=False)
