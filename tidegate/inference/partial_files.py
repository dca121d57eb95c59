"""Where a cache entry is written before it is renamed into place, and the sweeping
of what writers that died left behind.

Every model cache (the assembled GGUF, the converted folder, the quantized
weights, the compiled step, the sha256 memos) is written as
``.<name>.partial-<pid>[suffix]`` beside its target and renamed over it when
whole, so a reader never sees half a file. A writer killed outright (SIGKILL,
out of memory, power loss) leaves its partial behind, some of them gigabytes;
the next writer of the same target removes those whose process is gone. A
partial is swept only once it has not changed for an hour, because a cache
folder shared between machines may hold another machine's live writer, whose
pid means nothing here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0


def partial_path(target: Path, suffix: str = "") -> Path:
    """This process's partial for ``target``; sweeps dead writers' partials first."""
    sweep_stale(target)
    return target.with_name(f".{target.name}.partial-{os.getpid()}{suffix}")


def sweep_stale(target: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove partials of ``target`` left by processes that are gone; returns them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.partial-(\d+)(\..*)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []  # no folder yet, or unreadable: nothing to sweep
    swept = []
    for path in entries:
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match[1])):
            continue
        try:
            if time.time() - path.lstat().st_mtime < stale_after_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:  # another sweeper got there first, or a read-only cache
            log.debug("could not sweep %s: %s", path, exc)
            continue
        log.info("removed %s, left by a writer that died", path)
        swept.append(path)
    return swept


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
