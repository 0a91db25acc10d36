"""Every fetched archive is pinned by sha256 and checked before anything opens it; no package code ever runs.

No network: a PEP 503 index in a local folder (file:// URLs) serves a planted sdist whose setup.py would
create a marker file, and .deb files with a maintainer script are built locally with dpkg-deb.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from smallthinker_lab.data import sources
from smallthinker_lab.data.sources import ChecksumError, FetchError, Source

ROOT = Path(__file__).resolve().parents[1]
DATA = "evilpkg/data.txt"
DATA_BYTES = "数据 data\n".encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist(path: Path, marker: Path) -> bytes:
    """evilpkg-1.0.tar.gz: a setup.py that creates ``marker`` when run (as any build of its metadata does)."""
    setup = f"open({str(marker)!r}, 'w').write('setup.py ran')\nfrom setuptools import setup\nsetup(name='evilpkg')\n"
    members = {"evilpkg-1.0/setup.py": setup.encode(), "evilpkg-1.0/PKG-INFO": b"Name: evilpkg\nVersion: 1.0\n",
               f"evilpkg-1.0/{DATA}": DATA_BYTES}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local index serving evilpkg 1.0; returns (cache dir, marker path, archive bytes)."""
    marker = tmp_path / "setup_py_ran"
    files = tmp_path / "files"
    files.mkdir()
    blob = _sdist(files / "evilpkg-1.0.tar.gz", marker)
    page = tmp_path / "simple" / "evilpkg"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        '<html><body><a href="../../files/evilpkg-0.9.tar.gz">evilpkg-0.9.tar.gz</a>\n'
        f'<a href="../../files/evilpkg-1.0.tar.gz#sha256={_sha(blob)}">evilpkg-1.0.tar.gz</a></body></html>\n')
    monkeypatch.setenv("SMALLTHINKER_LAB_INDEX_URL", (tmp_path / "simple").as_uri())
    return tmp_path / "cache", marker, blob


def _add(monkeypatch, archive_sha256: str, member_sha256: str = _sha(DATA_BYTES), name: str = "evil") -> Source:
    src = Source(name=name, package="EvilPkg", version="1.0", registry="pypi", licence="test",
                 files={DATA: member_sha256}, archive="evilpkg-1.0.tar.gz", archive_sha256=archive_sha256,
                 archive_prefix="evilpkg-1.0/")
    monkeypatch.setitem(sources.SOURCES, name, src)
    return src


def test_every_source_pins_its_archive(monkeypatch):
    for s in sources.SOURCES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", s.archive_sha256), s.name
        stem = (s.package.replace("-", "_") if s.registry == "pypi" else s.package).lower()
        sep = "_" if s.registry == "debian" else "-"
        assert s.archive.lower().startswith(f"{stem}{sep}{s.version}"), (s.name, s.archive)
        ends = {"pypi": (".whl", ".tar.gz"), "debian": (".deb",), "npm": (f"-{s.version}.tgz",)}[s.registry]
        assert s.archive.endswith(ends), s.archive
    bad = Source(name="x", package="x", version="1", registry="pypi", licence="", files={"a": "0" * 64})
    monkeypatch.setitem(sources.SOURCES, "x", bad)
    with pytest.raises(ValueError, match="'x'.*pins no archive"):
        sources.fetch("x", download=False)


def test_a_pinned_sdist_is_read_without_running_its_setup_py(index, monkeypatch):
    cache, marker, blob = index
    _add(monkeypatch, _sha(blob))
    assert sources.read_bytes("evil", DATA, cache_dir=cache) == DATA_BYTES
    assert not marker.exists()
    assert sorted(p.name for p in (cache / "pypi").iterdir()) == ["evilpkg-1.0.tar.gz"]
    assert (cache / "pypi" / "evilpkg-1.0.tar.gz").read_bytes() == blob
    assert sources.read_bytes("evil", DATA, cache_dir=cache, download=False) == DATA_BYTES  # from the cache
    assert not marker.exists()
    # the planted setup.py is live: building its metadata (what `pip download` of an sdist does) would run it
    with tarfile.open(cache / "pypi" / "evilpkg-1.0.tar.gz") as t:
        setup = t.extractfile("evilpkg-1.0/setup.py").read()
    (cache / "setup.py").write_bytes(setup)
    subprocess.run([sys.executable, "setup.py", "--name"], cwd=cache, capture_output=True)
    assert marker.read_text() == "setup.py ran"


def test_a_download_with_another_sha256_is_refused_and_removed(index, monkeypatch):
    cache, marker, blob = index
    pin = "0" * 64
    _add(monkeypatch, pin)
    with pytest.raises(ChecksumError) as err:
        sources.read_bytes("evil", DATA, cache_dir=cache)
    msg = str(err.value)
    assert "EvilPkg" in msg and "evilpkg-1.0.tar.gz" in msg and pin in msg and _sha(blob) in msg
    assert list((cache / "pypi").iterdir()) == []  # neither the archive nor a partial download is left
    assert not marker.exists()


def test_a_tampered_cached_archive_is_refused_and_removed(index, monkeypatch):
    cache, marker, blob = index
    _add(monkeypatch, _sha(blob))
    (cache / "pypi").mkdir(parents=True)
    planted = cache / "pypi" / "evilpkg-1.0.tar.gz"
    _sdist(planted, marker)  # same content but for one byte of the data file
    with tarfile.open(planted) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data.replace(b"data", b"DATA")))
    planted.write_bytes(buf.getvalue())
    with pytest.raises(ChecksumError, match=re.escape(DATA)) as err:
        sources.read_bytes("evil", DATA, cache_dir=cache, download=False)
    assert _sha(blob) in str(err.value) and _sha(buf.getvalue()) in str(err.value) and str(planted) in str(err.value)
    assert not planted.exists() and not marker.exists()
    # the next fetch downloads the pinned archive again
    assert sources.read_bytes("evil", DATA, cache_dir=cache) == DATA_BYTES


def test_a_member_with_another_sha256_names_the_member(index, monkeypatch):
    cache, _, blob = index
    _add(monkeypatch, _sha(blob), member_sha256="1" * 64)
    with pytest.raises(ChecksumError, match=f"sha256 mismatch for {re.escape(DATA)} in EvilPkg 1.0.*{'1' * 64}"):
        sources.read_bytes("evil", DATA, cache_dir=cache)


def test_an_index_without_the_archive_is_a_fetch_error(index, monkeypatch, tmp_path):
    cache, _, blob = index
    _add(monkeypatch, _sha(blob))
    monkeypatch.setitem(sources.SOURCES, "evil", Source(**{**vars(sources.SOURCES["evil"]), "version": "2.0",
                                                          "archive": "evilpkg-2.0.tar.gz"}))
    with pytest.raises(FetchError, match=r"simple/evilpkg/ lists no evilpkg-2\.0\.tar\.gz"):
        sources.fetch("evil", cache_dir=cache)
    monkeypatch.setenv("SMALLTHINKER_LAB_INDEX_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(FetchError, match="cannot fetch .*nowhere/evilpkg/"):
        sources.fetch("evil", cache_dir=cache)


KILL = """
import os, sys
from smallthinker_lab.data import sources
from smallthinker_lab.data.sources import Source
sources.SOURCES["evil"] = Source(name="evil", package="evilpkg", version="1.0", registry="pypi", licence="",
                                 files={}, archive="evilpkg-1.0.tar.gz", archive_sha256=sys.argv[2])
os.replace = lambda *a: os._exit(9)  # killed after the download, before it takes the archive's name
sources.fetch("evil", cache_dir=sys.argv[1])
"""


def test_a_killed_download_leaves_no_archive_and_its_partial_file_is_removed_next_time(index, monkeypatch):
    cache, marker, blob = index
    _add(monkeypatch, _sha(blob))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL, str(cache), _sha(blob)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err.decode()[-2000:]
    assert sorted(p.name for p in (cache / "pypi").iterdir()) == [f"evilpkg-1.0.tar.gz.part-{proc.pid}"]
    with pytest.raises(FetchError, match="not in the cache"):
        sources.fetch("evil", cache_dir=cache, download=False)
    assert sources.read_bytes("evil", DATA, cache_dir=cache) == DATA_BYTES
    assert sorted(p.name for p in (cache / "pypi").iterdir()) == ["evilpkg-1.0.tar.gz"]
    assert not marker.exists()


def _deb(tmp_path: Path, marker: Path) -> Path:
    """fortunes-zh_2.98_all.deb look-alike whose postinst would create ``marker`` if it were installed."""
    root = tmp_path / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fortunes-zh\nVersion: 2.98\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    post = root / "DEBIAN" / "postinst"
    post.write_text(f"#!/bin/sh\ntouch {marker}\n")
    post.chmod(0o755)
    data = root / "usr/share/games/fortunes/chinese"
    data.parent.mkdir(parents=True)
    data.write_text("一\n%\n二\n")
    deb = tmp_path / "fortunes-zh_2.98_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None, reason="needs dpkg")
def test_a_deb_is_checked_before_dpkg_x_and_its_scripts_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "postinst_ran"
    deb = _deb(tmp_path, marker)
    member = "usr/share/games/fortunes/chinese"
    src = Source(name="fortunes-test", package="fortunes-zh", version="2.98", registry="debian", licence="",
                 files={member: _sha("一\n%\n二\n".encode())}, archive=deb.name, archive_sha256=_sha(deb.read_bytes()))
    monkeypatch.setitem(sources.SOURCES, src.name, src)
    cache = tmp_path / "cache"
    (cache / "debian").mkdir(parents=True)
    shutil.copyfile(deb, cache / "debian" / deb.name)
    assert sources.read_bytes(src.name, member, cache_dir=cache, download=False) == "一\n%\n二\n".encode()
    assert not marker.exists()
    assert sorted(p.name for p in (cache / "debian").iterdir()) == sorted([deb.name, "fortunes-zh"])
    # a .deb that is not the pinned one is removed, not extracted, and the old extraction is not reused
    monkeypatch.setitem(sources.SOURCES, src.name, Source(**{**vars(src), "archive_sha256": "2" * 64}))
    with pytest.raises(ChecksumError, match=f"fortunes-zh 2.98.*expected {'2' * 64}, got {_sha(deb.read_bytes())}"):
        sources.read_bytes(src.name, member, cache_dir=cache, download=False)
    assert not (cache / "debian" / deb.name).exists() and not marker.exists()


def test_an_npm_tarball_is_fetched_checked_and_read(tmp_path, monkeypatch):
    member = b'[{"title": "t", "paragraphs": ["a"]}]'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("package/dist/x/a.json")
        info.size = len(member)
        t.addfile(info, io.BytesIO(member))
    blob = buf.getvalue()
    reg = tmp_path / "registry" / "poems" / "-"
    reg.mkdir(parents=True)
    (reg / "poems-1.0.0.tgz").write_bytes(blob)
    monkeypatch.setenv("SMALLTHINKER_LAB_NPM_REGISTRY", (tmp_path / "registry").as_uri())
    digest = sources.tree_sha256({"a.json": member})
    src = Source(name="poems", package="poems", version="1.0.0", registry="npm", licence="MIT",
                 files={"dist/x/": digest}, archive="poems-1.0.0.tgz", archive_sha256=sources.sha256_bytes(blob),
                 archive_prefix="package/")
    monkeypatch.setitem(sources.SOURCES, "poems", src)
    cache = tmp_path / "cache"
    assert sources.read_tree("poems", "dist/x/", cache_dir=cache) == {"a.json": member}
    assert (cache / "npm" / "poems-1.0.0.tgz").read_bytes() == blob
    (cache / "npm" / "poems-1.0.0.tgz").write_bytes(blob + b"\0")  # tampered in the cache
    with pytest.raises(sources.ChecksumError, match="poems-1.0.0.tgz"):
        sources.read_tree("poems", "dist/x/", cache_dir=cache, download=False)
    assert not (cache / "npm" / "poems-1.0.0.tgz").exists()
