"""Atomic folder writes: a reader sees the old folder or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` on a fresh temporary folder, then rename it to ``target`` in one step.

    A previous ``target`` is replaced (moved aside first, since a directory cannot be renamed over a
    non-empty one); stale temporary folders of earlier crashed writes are removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = target.parent / f".tmp-{target.name}-{os.getpid()}"
    temporary.mkdir()
    try:
        write(temporary)
        _fsync_tree(temporary)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _fsync_tree(folder: Path) -> None:
    # The rename must not become visible before the data: flush the files first.
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
