"""Where a cache entry is written before it is renamed into place, and the sweeping
of what writers that died left behind.

Every model cache (the assembled GGUF, the converted folder, the quantized
weights, the compiled step, the sha256 memos) is written as
``.<name>.partial-<pid>[suffix]`` beside its target and renamed over it when
whole, so a reader never sees half a file. A writer killed outright (SIGKILL,
out of memory, power loss) leaves its partial behind, some of them gigabytes;
``sweep_stale`` removes those whose process is gone.

A partial is swept only once it has not changed for an hour, because a cache
folder shared between machines may hold another machine's live writer, whose
pid means nothing here. For a folder, "changed" means anything inside it
changed: a folder's own mtime moves only when entries come and go, not while a
big file in it grows. A partial that has not changed for a day is swept
whatever its pid says: that pid may since have been given to an unrelated
process, and a writer that makes no progress for a day is not writing.

When it is swept: ``partial_path`` sweeps before each write, and the call
sites also call ``sweep_stale`` when they find their target already in place
(a directory listing, cheap beside loading the entry). The second is what
removes the partial of a writer killed and restarted within the hour (the
usual supervisor restart): the sweep at the restart finds it too young, the
restarted writer then builds the target, and no write of that target, hence
no ``partial_path``, ever comes again; every later start finds the target and
sweeps, so the partial goes at the first start after its hour. Sweeping
instead when the new partial is renamed into place, whatever the age of the
others, would be sooner but unsafe: another machine's live writer of the same
target looks dead here, and removing its partial under it (or its folder
mid-write) makes its rename or its writes fail, an error on a machine that
did nothing wrong.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0  # unchanged this long and its writer gone: left by a dead writer
ABANDONED_AFTER_S = 86400.0  # unchanged this long: left behind, whatever its pid says


def partial_path(target: Path, suffix: str = "") -> Path:
    """This process's partial for ``target``; sweeps dead writers' partials first."""
    sweep_stale(target)
    return target.with_name(f".{target.name}.partial-{os.getpid()}{suffix}")


def sweep_stale(
    target: Path,
    stale_after_s: float = STALE_AFTER_S,
    abandoned_after_s: float = ABANDONED_AFTER_S,
) -> list[Path]:
    """Remove partials of ``target`` that no writer is writing; returns them.

    Call it also where ``target`` is found in place (see the module docstring).
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.partial-(\d+)(\..*)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []  # no folder yet, or unreadable: nothing to sweep
    swept = []
    for path in entries:
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        try:
            idle = time.time() - _last_change(path)
            if idle < stale_after_s or (idle < abandoned_after_s and _alive(int(match[1]))):
                continue
            _remove(path)
        except OSError as exc:  # another sweeper got there first, or a read-only cache
            log.debug("could not sweep %s: %s", path, exc)
            continue
        log.info("removed %s, left by a writer that died (unchanged for %.0fs)", path, idle)
        swept.append(path)
    return swept


def _last_change(path: Path) -> float:
    """The newest mtime of ``path`` and, for a folder, of anything inside it."""
    newest = path.lstat().st_mtime
    if not path.is_dir() or path.is_symlink():
        return newest
    for folder, dirs, files in os.walk(path):  # does not follow links
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
            except OSError:  # removed meanwhile: what is left still tells
                continue
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or never a pid
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True
