"""lorakit.atomic: a folder is the old one or the complete new one, under SIGKILL and concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit import atomic

FILES = 12

# A writer process: fills the folder one file at a time (with pauses, so a kill lands mid-write), all files
# carrying the same version, then lets write_folder swap it into place.
# The module is loaded from its file, not through `lorakit` (whose import pulls in torch): a writer then
# starts in milliseconds and the kills land where the test means them to.
WRITER = f"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("atomic", sys.argv[4])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
write_folder = module.write_folder
target, version, pause = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def write(folder):
    for i in range({FILES}):
        (folder / f"part-{{i}}").write_text(version * 1000)
        time.sleep(pause)
write_folder(target, write)
print("done", flush=True)
"""


def _writer(target: Path, version: str, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), version, str(pause), atomic.__file__],
                            stdout=subprocess.PIPE, text=True)


def _version(target: Path) -> str | None:
    """The one version every file of ``target`` holds; fails on a mix or a partial folder."""
    if not target.exists():
        return None
    parts = sorted(target.iterdir())
    assert [p.name for p in parts] == sorted(f"part-{i}" for i in range(FILES)), "partial folder"
    versions = {p.read_text() for p in parts}
    assert len(versions) == 1, "files of two writes mixed"
    return versions.pop()[0]


def test_a_killed_writer_leaves_the_old_or_the_new_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert _writer(target, "a", 0.0).wait(60) == 0
    for attempt, delay in enumerate([0.02, 0.05, 0.08, 0.11, 0.14, 0.2]):
        version = "bcdefg"[attempt]
        before = _version(target)
        process = _writer(target, version, 0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(60)
        after = _version(target)
        assert after in (before, version)
    # the next write of the same target removes what the killed writers left beside it
    assert _writer(target, "z", 0.0).wait(60) == 0
    assert _version(target) == "z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_writers_at_once_end_with_one_complete_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for _ in range(3):
        first, second = _writer(target, "x", 0.002), _writer(target, "y", 0.002)
        assert first.wait(60) == 0 and second.wait(60) == 0
        assert _version(target) in ("x", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    process = _writer(target, "a", 0.2)
    try:
        deadline = time.time() + 30
        while not list(tmp_path.glob(".out.lorakit-tmp-*")) and time.time() < deadline:
            time.sleep(0.02)
        temporaries = list(tmp_path.glob(".out.lorakit-tmp-*"))
        assert temporaries, "the writer never started"
        atomic.remove_stale_temporaries(target)
        assert all(t.exists() for t in temporaries)
    finally:
        process.wait(60)
    assert _version(target) == "a"


def test_a_folder_left_aside_by_a_crash_between_renames_is_put_back(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    aside = tmp_path / f".out.lorakit-old-{dead.stdout.strip()}-0123456789ab"
    aside.mkdir()
    (aside / "kept").write_text("old")
    atomic.remove_stale_temporaries(target)
    assert (target / "kept").read_text() == "old"


def test_failure_inside_write_keeps_the_old_folder_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    atomic.write_folder(target, lambda folder: (folder / "a").write_text("old"))

    def failing(folder: Path) -> None:
        (folder / "a").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_folder(target, failing)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_carry_over_keeps_other_entries(tmp_path: Path) -> None:
    target = tmp_path / "run"
    (target / "checkpoints" / "step-1").mkdir(parents=True)
    (target / "checkpoints" / "step-1" / "state").write_text("s")
    (target / "metrics.jsonl").write_text("m")
    (target / "adapter").write_text("old")
    atomic.write_folder(target, lambda folder: (folder / "adapter").write_text("new"), carry_over=True)
    assert (target / "adapter").read_text() == "new"
    assert (target / "metrics.jsonl").read_text() == "m"
    assert (target / "checkpoints" / "step-1" / "state").read_text() == "s"


def test_write_file_replaces_atomically_and_refuses_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    atomic.write_file(path, "one")
    atomic.write_file(path, b"two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(NotADirectoryError):
        atomic.write_folder(path, lambda folder: None)


def test_exchange_is_used_where_the_system_has_it(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "x").write_text("1")
    (second / "y").write_text("2")
    assert atomic._exchange(first, second)
    assert (first / "y").exists() and (second / "x").exists()
    assert os.path.isdir(first)
