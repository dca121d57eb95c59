"""``tidegate`` as a user runs it: a real ``python -m tidegate`` process, so
argument parsing, output and exit codes are exactly what a user sees."""

from __future__ import annotations

import asyncio
import os
import sys


async def spawn_tidegate(
    *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``tidegate *args`` (stdout and stderr piped; ``env`` on top of
    this process's environment). The caller waits for it or stops it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidegate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def tidegate(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> tuple[int, str, str]:
    """Run ``tidegate *args`` to the end: (exit code, stdout, stderr)."""
    proc = await spawn_tidegate(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
