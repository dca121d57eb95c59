"""Cache entries are written as partials; what a killed writer left is swept by the next."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tidegate.inference.partial_files import partial_path, sweep_stale


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def aged(path, seconds=7200.0):
    if not path.exists():
        path.write_bytes(b"x")
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_a_dead_writers_old_partials_are_swept_and_nothing_else(tmp_path):
    target = tmp_path / "model.gguf"
    gone = dead_pid()
    stale_file = aged(tmp_path / f".model.gguf.partial-{gone}")
    stale_dir = tmp_path / f".model.gguf.partial-{gone + 1000000}.pt2"  # never a live pid
    stale_dir.mkdir()
    (stale_dir / "weights").write_bytes(b"x" * 10)
    aged(stale_dir)
    fresh = tmp_path / f".model.gguf.partial-{gone}.tmp"  # maybe another machine's, writing
    fresh.write_bytes(b"x")
    live = aged(tmp_path / f".model.gguf.partial-{os.getppid()}")  # a live writer
    other = aged(tmp_path / f".other.gguf.partial-{gone}")  # another target's
    target.write_bytes(b"whole")

    mine = partial_path(target, ".pt2")

    assert mine == tmp_path / f".model.gguf.partial-{os.getpid()}.pt2"
    assert not stale_file.exists() and not stale_dir.exists()
    assert fresh.exists() and live.exists() and other.exists() and target.exists()


def test_sweeping_a_folder_that_does_not_exist_is_nothing(tmp_path):
    assert sweep_stale(tmp_path / "nowhere" / "model.gguf") == []
