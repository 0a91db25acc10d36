"""Crash-safe replacement of a whole folder: stage the new contents in a temporary sibling, then swap it in.

:func:`replace_folder` is what :func:`~smallthinker_lab.model.checkpoint.save_pretrained` and
:meth:`~smallthinker_lab.instruments.Recording.save` write through. A writer owns some names in the folder (a
checkpoint: ``config.json``, ``model.safetensors``, the index and the ``model-*-of-*`` shards); it writes the new
versions of them into the staging folder ``.<name>.save-<pid>-<token>`` next to the target. When it is done, every
entry of the old folder that the writer does not own (tokenizer files, an expert bundle, notes, anything else) is
carried over into the staging folder as a hard link (a copy where the file system cannot link; symlinks are
recreated as symlinks and never followed), owned names of the old folder that the new save did not write (shards of
an earlier sharded save, say) are dropped, and the staging folder is swapped with the target in one atomic step
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS). The old folder then lies under the
staging name and is removed. A process killed at any point leaves the target either entirely old or entirely new.

Where the file system cannot swap, two renames are used (old folder aside as ``.<name>.old-<pid>-<token>``, new one
in); a kill between them leaves no folder at the target, and the next write restores the old one before anything
else. Leftovers of dead processes (by the PID in their name) are removed by the next write to the same folder; a
live PID's are left alone. Two caveats of swapping a folder: a process (a shell) whose working directory is the
folder keeps the old, deleted one (this process is moved into the new one), and files another process adds to the
folder while a save is between carrying over and swapping are lost; do not write into a folder while saving to it.

Tests kill a save at the named steps through the :data:`_fault` hook (see :func:`fault`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Called with the name of each write step when set (tests set it to os._exit in a forked or spawned process).
# Steps of replace_folder: "staging-created", "carried-over", "before-swap", ("mid-swap" where the swap is two renames),
# "after-swap", "done". save_pretrained adds "shard-written" (after each weight file), "weights-written",
# "index-written", "config-written"; Recording.save adds "table-written" (after each), "arrays-written", "meta-written".
_fault: Callable[[str], None] | None = None


def fault(step: str) -> None:
    """Call the test hook, if set, at a named write step."""
    hook = _fault
    if hook is not None:
        hook(step)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs (conservatively True where it cannot be told)."""
    if pid <= 0:
        return False
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    except OverflowError:  # a PID no process can have
        return False
    return True


def _temp_re(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(save|old)-(\d+)-[0-9a-f]{{8}}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(folder: Path) -> list[Path]:
    """Remove the staging and set-aside folders of dead processes next to ``folder``; when the folder itself is
    missing and a dead process had set the old one aside (a kill between the two renames of the fallback swap),
    put that one back first. Returns what was removed."""
    parent, pattern = folder.parent, _temp_re(folder.name)
    try:
        found = [(m[1], int(m[2]), parent / m[0]) for e in os.scandir(parent) if (m := pattern.fullmatch(e.name))]
    except FileNotFoundError:
        return []
    removed = []
    for kind, pid, path in sorted(found, key=lambda t: t[0] != "old"):  # "old" first: it may be the only copy
        if pid_alive(pid):
            continue
        if kind == "old" and not os.path.lexists(folder):
            os.rename(path, folder)
            log.warning("%s: put back the previous contents from %s, set aside by a killed write", folder, path.name)
            continue
        _remove(path)
        removed.append(path)
        log.info("removed %s, left by process %d which no longer runs", path, pid)
    return removed


def clean_stale_inside(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Remove entries of ``folder`` whose name matches ``pattern`` (its first non-empty group a PID) of dead
    processes: temporaries of writers that write inside the folder."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in os.scandir(folder):
            m = pattern.fullmatch(e.name)
            if m and not pid_alive(int(next(g for g in m.groups() if g))):
                _remove(Path(e.path))
                removed.append(Path(e.path))
    return removed


# ------------------------------------------------------------------ swapping
_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot (then nothing moved)."""
    try:
        if sys.platform.startswith("linux"):
            fn = getattr(_libc(), "renameat2", None)
            if fn is None:
                return False
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            rc = fn(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        elif sys.platform == "darwin":
            fn = getattr(_libc(), "renamex_np", None)
            if fn is None:
                return False
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rc = fn(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except (OSError, AttributeError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} with {b}: {os.strerror(err)}")


def _swap_in(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder``; the old folder (if any) ends up at ``staging``."""
    if not os.path.lexists(folder):
        try:
            os.rename(staging, folder)  # nothing to replace: one rename
            os.mkdir(staging)  # an empty "old folder" for the caller to remove
            return
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or not folder.exists():
                raise
    if exchange(staging, folder):
        return
    aside = staging.with_name(f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(folder, aside)
    fault("mid-swap")
    os.rename(staging, folder)
    os.rename(aside, staging)


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_tree(src: str, dst: str) -> None:
    """Hard-link ``src`` (a file, a symlink or a folder, recursively) at ``dst``; copy what cannot be linked."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for e in os.scandir(src):
            _link_tree(e.path, os.path.join(dst, e.name))
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except (OSError, NotImplementedError):
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


def carry_over(old: Path, staging: Path, owns: Callable[[str], bool]) -> list[str]:
    """Link every entry of ``old`` that the writer does not own and did not write into ``staging``."""
    kept = []
    for e in sorted(os.scandir(old), key=lambda e: e.name):
        if owns(e.name) or os.path.lexists(staging / e.name):
            continue
        _link_tree(e.path, str(staging / e.name))
        kept.append(e.name)
    st = os.stat(old)
    os.chmod(staging, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError, AttributeError):
        os.chown(staging, st.st_uid, st.st_gid)
    return kept


def target_folder(path: str | os.PathLike) -> Path:
    """The absolute folder a write replaces (symlinks resolved: a symlinked folder's target is what changes)."""
    folder = Path(path).expanduser()
    if folder.is_symlink() or folder.exists():
        folder = folder.resolve()
        if not folder.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
    else:
        folder = Path(os.path.abspath(folder))
    return folder


def staging_unavailable(path: str | os.PathLike) -> str | None:
    """Why no staging folder can be made next to ``path`` (a mount point, a parent that is read-only or not
    writable), or None when :func:`replace_folder` can be used."""
    folder = target_folder(path)
    if folder.is_dir() and os.path.ismount(folder):
        return f"{folder} is a mount point: it cannot be replaced by a swap"
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable: no staging folder can be made next to {folder}"
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return f"{parent} is on a read-only file system"
    return None


@contextlib.contextmanager
def replace_folder(path: str | os.PathLike, owns: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty staging folder; on a normal exit it replaces ``path`` atomically (see the module docstring).

    ``owns(name)`` says which names of the old folder the writer replaces: they are not carried over. On an
    exception the staging folder is removed and the old folder is untouched. Callers check
    :func:`staging_unavailable` first (and write in place where it gives a reason).
    """
    folder = target_folder(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)
    staging = folder.with_name(f".{folder.name}.save-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        fault("staging-created")
        yield staging
        if folder.is_dir():
            carry_over(folder, staging, owns)
        fault("carried-over")
        for e in os.scandir(staging):
            if e.is_file(follow_symlinks=False) and owns(e.name):
                _fsync(Path(e.path))
        _fsync(staging, directory=True)
        here = _is_cwd(folder)
        fault("before-swap")
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fault("after-swap")
    if here:
        os.chdir(folder)
    shutil.rmtree(staging, ignore_errors=True)  # the old folder now
    _fsync(folder.parent, directory=True)
    fault("done")


def _is_cwd(folder: Path) -> bool:
    try:
        return os.path.samefile(os.getcwd(), folder)
    except OSError:
        return False


# ------------------------------------------------------------------ content hashes
def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk."""
    _fsync(Path(path))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
