"""Faults reach the caller as clear exceptions naming layer and expert; afterwards no I/O thread runs, no file
descriptor to the bundle stays open, and the engine can be closed and opened again."""

import errno
import os
import shutil
import threading

import pytest
from conftest import random_model

from smallthinker_lab.engine import BundleError, Engine, ExpertReadError, convert
from smallthinker_lab.engine.bundle import DATA_NAME
from smallthinker_lab.engine.io import THREAD_PREFIX
from smallthinker_lab.model.checkpoint import load_model, save_pretrained

PROMPT = [5, 9, 2, 77, 31, 64, 8, 100, 42, 3]
NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "model"
    save_pretrained(random_model(seed=3), folder)
    convert(folder, progress=False)
    return folder, load_model(folder).generate(PROMPT, NEW, stop_tokens=[])


@pytest.fixture
def ckpt(source, tmp_path):
    """A private copy of the checkpoint and its bundle (each test damages its own)."""
    folder = tmp_path / "model"
    shutil.copytree(source[0], folder, copy_function=shutil.copy2)
    return folder


def io_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def fds_to(path):
    path = os.path.realpath(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def threads_before():
    """I/O threads of engines other tests may have left open; ours must all be gone after each fault."""
    global _BEFORE
    _BEFORE = set(io_threads())
    yield


_BEFORE: set = set()


def assert_released(folder):
    assert set(io_threads()) <= _BEFORE
    assert fds_to(folder / "expert_bundle" / DATA_NAME) == []


def open_engine(folder, **kw):
    return Engine.from_pretrained(folder, memory_limit=None, progress=False, **kw)


def test_truncated_bundle(ckpt):
    data = ckpt / "expert_bundle" / DATA_NAME
    size = data.stat().st_size
    os.truncate(data, size - 4096)
    with pytest.raises(BundleError, match=rf"truncated: {size - 4096} bytes, the index says {size}"):
        open_engine(ckpt)
    assert_released(ckpt)


def test_truncated_after_opening_is_a_short_read(ckpt, source):
    e = open_engine(ckpt)
    data = ckpt / "expert_bundle" / DATA_NAME
    good = data.read_bytes()
    os.truncate(data, 4096)
    with pytest.raises(ExpertReadError, match=r"short read of layer 0 expert \d+") as info:
        e.generate(PROMPT, NEW)
    assert info.value.layer == 0 and info.value.expert is not None
    data.write_bytes(good)
    assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == source[1]  # usable again, failed reads forgotten
    e.close()
    assert_released(ckpt)


def test_corrupted_expert_fails_its_checksum(ckpt, source):
    e = open_engine(ckpt)
    b = e.bundle
    data = ckpt / "expert_bundle" / DATA_NAME
    with open(data, "r+b") as f:  # flip one byte inside every expert of layer 1
        for expert in range(b.num_experts):
            f.seek(b.offset(1, expert) + 100)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    got = []
    with pytest.raises(ExpertReadError, match=r"checksum mismatch in layer 1 expert \d+ .* the bundle is corrupt"):
        for token in e.stream(PROMPT, NEW):  # experts are computed while their checksums run ...
            got.append(token)
    assert got == []  # ... but the forward that read them raises before its logits leave: no token from bad bytes
    assert e._unverified == []
    e.close()
    assert_released(ckpt)
    # checksums off: the corruption goes unnoticed (why they are on by default)
    with open_engine(ckpt, verify_checksums=False) as e2:
        e2.generate(PROMPT, 2)
    convert(ckpt, progress=False)  # repair
    e.reopen()
    assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == source[1]
    e.close()
    assert_released(ckpt)


def test_missing_files(ckpt):
    (ckpt / "expert_bundle" / DATA_NAME).unlink()
    with pytest.raises(BundleError, match=r"experts.bin is missing"):
        open_engine(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        open_engine(ckpt)
    assert_released(ckpt)


def test_read_error_in_an_io_thread(ckpt, source):
    failed = []

    def fault(layer, expert, buf):
        if layer == 2 and not failed:
            failed.append((layer, expert, threading.current_thread().name))
            raise OSError(errno.EIO, "Input/output error (injected)")

    e = open_engine(ckpt, fault=fault, io_threads=3)
    with pytest.raises(ExpertReadError, match=r"reading layer 2 expert \d+ .* failed: .*injected") as info:
        e.generate(PROMPT, NEW)
    assert failed[0][2].startswith(THREAD_PREFIX)  # raised in an I/O thread, delivered to the caller
    assert isinstance(info.value.__cause__, OSError) and info.value.layer == 2
    assert e.cache.pinned() == []
    assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == source[1]
    e.close()
    assert_released(ckpt)
    with open_engine(ckpt) as again:  # a new engine on the same files
        assert again.generate(PROMPT, NEW, stop_tokens=[]).tokens == source[1]
    assert_released(ckpt)


@pytest.mark.parametrize("direct_ok", [True, False])
def test_page_cache_bypass_reads_the_same_bytes(ckpt, source, monkeypatch, direct_ok):
    """O_DIRECT where the filesystem takes it, else posix_fadvise(DONTNEED) after each read; same bytes either way."""
    from smallthinker_lab.engine import io as io_mod

    advised = []
    real_open, real_fadvise = os.open, os.posix_fadvise
    if not direct_ok:  # a filesystem that refuses O_DIRECT (tmpfs, some network filesystems)
        def no_direct(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        monkeypatch.setattr(io_mod.os, "open", no_direct)
    monkeypatch.setattr(io_mod.os, "posix_fadvise", lambda *a: advised.append(a) or real_fadvise(*a))
    with open_engine(ckpt, bypass_page_cache=True) as e:
        if not direct_ok:
            assert e.reader.direct is False
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == source[1]
        n = e.stats()["misses"]
        assert len(advised) == (0 if e.reader.direct else n)
    assert_released(ckpt)
