"""Atomic writes: a reader (or a crash) sees the old folder or file or the complete new one, never a mix.

Every writer of lorakit goes through here: adapters, checkpoints, merged models, sweep results.

A folder is written into a fresh temporary sibling (a name unique to this process and call), every file
and the folder are fsynced, and the temporary then takes the target's place in one step:

- no target yet: ``rename(2)``, atomic;
- a target exists: Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, and the old
  one, now under the temporary name, is removed. Where the call is missing (not Linux, an old kernel, a
  file system without it), the old folder is renamed aside first and the new one renamed in: a crash
  between the two renames leaves the target missing and the old folder beside it under ``.old-`` name,
  which the next write of the same target puts back (so it is never lost).

Two processes writing the same target at once each write their own temporary; the last swap wins and
both end with a complete folder there. Temporaries left by a killed writer are removed by the next write
of the same target, but only those whose process is gone: a live writer's temporary is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = ".{name}.lorakit-tmp-{pid}-{tag}"
_ASIDE = ".{name}.lorakit-old-{pid}-{tag}"
# Glob patterns of what a writer may leave beside its target, for code that tells a folder's own files
# from leftovers.
TEMPORARY_PATTERNS = (".*.lorakit-tmp-*", ".*.lorakit-old-*")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def write_folder(target: str | os.PathLike[str], write: Callable[[Path], None], *,
                 carry_over: bool = False) -> Path:
    """Run ``write(folder)`` on a fresh temporary folder, then put it in ``target``'s place atomically.

    Args:
        target: the folder to create or replace.
        write: fills the (empty) folder it is given.
        carry_over: keep what the old ``target`` holds besides what ``write`` wrote (hard links, so no
            data is copied): for a folder that holds other things too, such as a training run's output
            folder that receives its adapter files.

    Returns:
        ``target`` as a Path.

    Raises:
        NotADirectoryError: ``target`` exists and is not a folder.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = _sibling(target, _TEMPORARY)
    temporary.mkdir()
    try:
        write(temporary)
        if carry_over and target.is_dir():
            _link_missing(target, temporary)
        _fsync_tree(temporary)
        _swap_into_place(temporary, target)
    finally:
        # After a swap the temporary name holds the old folder; after a failure, the partial new one.
        shutil.rmtree(temporary, ignore_errors=True)
    _fsync_directory(target.parent)
    return target


def write_file(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: a temporary file, fsync, ``rename``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _sibling(path, _TEMPORARY)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        # O_EXCL: never clobber; mode 0o666 lets the umask decide, as for any ordinary new file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def remove_stale_temporaries(target: str | os.PathLike[str]) -> None:
    """Remove what killed writers of ``target`` left beside it; put back a folder left aside by a crash.

    Only leftovers of processes that no longer exist are touched.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for prefix, is_aside in ((f".{target.name}.lorakit-tmp-", False), (f".{target.name}.lorakit-old-", True)):
        for leftover in target.parent.glob(f"{prefix}*"):
            pid = leftover.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if is_aside and not target.exists():
                os.rename(leftover, target)  # the crash came between the two renames: put it back
                continue
            _remove(leftover)  # a temporary, or the old copy of a swap that completed


def _sibling(target: Path, pattern: str) -> Path:
    # Same folder as the target, so every rename stays within one file system (atomic).
    name = pattern.format(name=target.name, pid=os.getpid(), tag=uuid.uuid4().hex[:12])
    return target.parent / name


def _swap_into_place(temporary: Path, target: Path) -> None:
    """Atomically make ``temporary`` the ``target``; afterwards ``temporary`` holds the old one, if any."""
    try:
        os.rename(temporary, target)  # no target yet (or an empty one): one atomic rename
        temporary.mkdir()  # so the caller's cleanup finds an (empty) folder, as after a swap
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(temporary, target):
        return
    aside = _sibling(target, _ASIDE)
    os.rename(target, aside)
    os.rename(temporary, target)
    os.rename(aside, temporary)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _LIBC


def _link_missing(source: Path, destination: Path) -> None:
    """Hard-link (copy where links fail) every entry of ``source`` that ``destination`` lacks."""
    for entry in source.iterdir():
        if entry.name.startswith(".") and ".lorakit-" in entry.name:
            continue  # another writer's temporary inside the folder
        copy = destination / entry.name
        if copy.exists() or copy.is_symlink():
            if entry.is_dir() and not entry.is_symlink() and copy.is_dir():
                _link_missing(entry, copy)
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), copy)
        elif entry.is_dir():
            copy.mkdir()
            _link_missing(entry, copy)
        else:
            try:
                os.link(entry, copy)
            except OSError:
                shutil.copy2(entry, copy)


def _fsync_tree(folder: Path) -> None:
    # The rename must not become visible before the data: flush every file and folder first.
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_directory(path)
    _fsync_directory(folder)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
