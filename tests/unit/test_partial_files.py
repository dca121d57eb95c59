"""Cache entries are written as partials; what a killed writer left is swept by the next
writer, and by every start that finds the entry already in place."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tidegate.inference import bundled, compiled_step, loading, quantized_cache
from tidegate.inference.partial_files import partial_path, sweep_stale

HOUR, DAY = 3600.0, 86400.0


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def aged(path, seconds=2 * HOUR):
    if not path.exists():
        path.write_bytes(b"x")
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)
    return path


def aged_folder(path, seconds=2 * HOUR):
    """A partial folder whose every entry, and itself, last changed ``seconds`` ago."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights").write_bytes(b"x" * 10)
    for inner in path.rglob("*"):
        aged(inner, seconds)
    return aged(path, seconds)


def test_a_dead_writers_old_partials_are_swept_and_nothing_else(tmp_path):
    target = tmp_path / "model.gguf"
    gone = dead_pid()
    stale_file = aged(tmp_path / f".model.gguf.partial-{gone}")
    stale_dir = aged_folder(tmp_path / f".model.gguf.partial-{gone + 1000000}.pt2")  # never a pid
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


def test_a_partial_unchanged_for_a_day_is_swept_whatever_its_pid_says(tmp_path):
    # The pid may since belong to an unrelated live process (here: our parent).
    target = tmp_path / "model.gguf"
    reused = os.getppid()
    old_file = aged(tmp_path / f".model.gguf.partial-{reused}", 2 * DAY)
    old_dir = aged_folder(tmp_path / f".model.gguf.partial-{reused}.pt2", 2 * DAY)
    writing = aged(tmp_path / f".model.gguf.partial-{reused}.tmp", 2 * HOUR)  # live, slow

    assert sorted(sweep_stale(target)) == sorted([old_file, old_dir])
    assert writing.exists()


def test_a_folder_is_as_fresh_as_the_newest_thing_inside_it(tmp_path):
    # A folder's own mtime does not move while a big file inside it grows.
    target = tmp_path / "converted"
    gone = dead_pid()
    growing = aged_folder(tmp_path / f".converted.partial-{gone}")
    (growing / "sub").mkdir()
    (growing / "sub" / "model.safetensors").write_bytes(b"still being written")
    aged(growing / "sub")
    aged(growing)
    quiet = aged_folder(tmp_path / f".converted.partial-{gone + 1000000}")
    (quiet / "sub").mkdir()
    aged(quiet / "sub")
    aged(quiet)

    assert sweep_stale(target) == [quiet]
    assert growing.exists()


# A writer killed and restarted within the hour: the sweep at the restart finds its partial
# too young, the restarted writer builds the target, and no write of it ever comes again.
# Each call site sweeps where it finds the target in place, so a later start removes it.


@pytest.fixture
def leftover(tmp_path):
    """The partial a killed writer left beside ``target``, an hour and more ago."""

    def beside(target, suffix=""):
        target.parent.mkdir(parents=True, exist_ok=True)
        return aged_folder(target.with_name(f".{target.name}.partial-{dead_pid()}{suffix}"))

    return beside


def test_the_quantized_cache_sweeps_where_it_finds_its_entry(tmp_path, leftover):
    target = tmp_path / "quantized" / "entry"
    quantized_cache.store(torch.nn.Linear(2, 2), target, {})
    left = leftover(target)
    assert quantized_cache.load(target, torch.nn.Linear(2, 2)) is not None
    assert not left.exists()


def test_the_compiled_step_sweeps_where_it_finds_its_package(tmp_path, leftover, monkeypatch):
    target = compiled_step.package_path(tmp_path, "m@1", "int8", torch.get_num_threads())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"package")
    left = leftover(target, ".pt2")
    monkeypatch.setattr(compiled_step, "load_package", lambda target, decoder: "step")
    used = []
    decoder = SimpleNamespace(use_compiled=used.append)
    compiled_step.attach(decoder, SimpleNamespace(quantization="int8"), "m@1", tmp_path)
    assert used == ["step"] and not left.exists()


def test_conversion_sweeps_where_it_finds_the_converted_folder(tmp_path, leftover):
    target = tmp_path / "model-0123456789ab"
    target.mkdir()
    (target / "config.json").write_text("{}")
    left = leftover(target)
    assert not loading._ensure_converted(target, lambda: pytest.fail("converted again"), {})
    assert not left.exists()


def test_a_bundled_model_sweeps_its_assembled_gguf_where_it_finds_it_converted(tmp_path, leftover):
    model = bundled.BundledModel("fake", "", (), "ab" * 32, 1)
    target = bundled.converted_dir(model, tmp_path)
    target.mkdir()
    (target / "config.json").write_text("{}")
    left = leftover(tmp_path / ".assembling" / model.gguf_name)
    assert not loading._bundled(model, tmp_path).converted
    assert not left.exists()


def test_the_sha256_memo_sweeps_where_it_finds_its_memo(tmp_path, leftover):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    root = tmp_path / "cache"
    loading._memo_sha256(gguf, root)
    (memo,) = (root / ".sha256").iterdir()
    left = leftover(memo)
    loading._memo_sha256(gguf, root)
    assert not left.exists()
