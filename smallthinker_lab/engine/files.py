"""Crash- and symlink-safe file handling for the bundle writer: locks and temporaries opened without following links,
stale temporaries of dead processes removed, directories synced."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from pathlib import Path

from ..model.atomic import pid_alive
from .errors import BundleError

# 3: the kernel formats and "packing" (2: per-expert "checksum" with the algorithm named in the index; 1: crc32 only)


# temporaries of a conversion: .experts.bin.tmp-PID[-TOKEN], .experts.json.tmp-PID[-TOKEN]
_TEMP_RE = re.compile(r"\.(?:experts\.bin|experts\.json)\.tmp-(\d{1,12})(?:-[0-9a-f]{1,32})?")


_LIVE_TEMPS: set[str] = set()  # the temporaries conversions of this process are writing now


_LIVE_LOCK = threading.Lock()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the conversion temporaries in ``folder`` left by dead processes (a killed conversion leaves its
    ``.experts.bin.tmp-PID``: as large as the bundle); those of live processes and this process's own conversions
    in progress are kept. A temporary named for this process's pid that none of its conversions is writing is an
    earlier process's (pids are reused) and removed. Returns the paths removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        m = _TEMP_RE.fullmatch(p.name)
        if not m or not (p.is_symlink() or p.is_file()):
            continue
        pid = int(m.group(1))
        with _LIVE_LOCK:
            if str(p) in _LIVE_TEMPS or (pid != os.getpid() and pid_alive(pid)):
                continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _create_exclusive(path: Path, created: list[Path], mode: str = "wb"):
    """A new file opened for writing: created here (O_EXCL: never an existing file), never through a symbolic link;
    appended to ``created`` (what the caller removes on failure: never a file it did not create)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o644)
    created.append(path)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _open_lock(path: Path) -> int:
    """The conversion lock file, opened without following a symbolic link and without truncating (a lock is never
    written): a link or anything but a regular file is refused, so the lock cannot damage a file elsewhere."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"the conversion lock {path} is a symbolic link: refusing to open it "
                              f"(remove it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"the conversion lock {path} is not a regular file: refusing to use it (remove it)")
    return fd


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
