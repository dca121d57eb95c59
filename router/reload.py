"""Hot reload of the router's config file: on SIGHUP, and (``reload.watch_file``)
when the file's contents change.

A reload reads and validates the whole file exactly like startup (YAML, the
settings classes, env overrides). An invalid file is rejected with one error
log line naming the bad fields, the running policy stays, and Status reports
the error (``last_reload_error``) until a later reload succeeds. An empty file
is rejected too (with a warning), although startup reads it as all defaults:
editors truncate a file before writing it, and a reload caught in between
must not drop every tenant, budget and rule (which switches auth off).

A valid file replaces the parts that can change under running requests —
``policy``, ``rules``, ``tenants`` (keys), ``budgets`` (limits; usage so far is
kept), ``retries`` and ``breaker`` — in one synchronous step on the event loop
(no request sees half a file). Requests that start afterwards use the new
settings throughout; one already in flight uses them for the steps it has not
taken yet (its plan — rule, threshold — was made with the old ones).
Everything else (listen address, nodes, cache, TLS, the budget store, …) needs
a restart; a reload that changes it says so in a warning and keeps the running
values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from router.settings import RouterSettings, load_router_settings
from tidegate.config import EmptyConfigError
from tidegate.errors import ConfigError

if TYPE_CHECKING:
    from router.pipeline import Pipeline

log = logging.getLogger(__name__)

RELOADABLE = ("policy", "rules", "tenants", "budgets", "retries", "breaker")


def merge_reloadable(
    current: RouterSettings, new: RouterSettings
) -> tuple[RouterSettings, list[str]]:
    """(the settings to run with, the changed fields that need a restart)."""
    update = {name: getattr(new, name) for name in RELOADABLE}
    ignored = [
        name
        for name in type(current).model_fields
        if name not in RELOADABLE and getattr(new, name) != getattr(current, name)
    ]
    store = ("url", "key_prefix")
    if any(getattr(new.budgets, f) != getattr(current.budgets, f) for f in store):
        ignored.append("budgets.url/key_prefix")
        update["budgets"] = new.budgets.model_copy(
            update={f: getattr(current.budgets, f) for f in store}
        )
    return current.model_copy(update=update), ignored


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Reloader:
    """Reloads ``path`` into ``pipeline``; ``install_sighup`` and ``start_watch``
    wire the triggers."""

    def __init__(self, path: str | Path, pipeline: Pipeline) -> None:
        self.path = Path(path)
        self.pipeline = pipeline
        self.reloads = 0  # successful
        self.rejected = 0
        self._digest = _digest(self.path)
        self._watch: asyncio.Task[None] | None = None

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Read, validate and apply the file; False (old policy kept) when invalid."""
        running = self.pipeline.settings
        self._digest = _digest(self.path)
        try:
            new = load_router_settings(self.path, allow_empty=False)
        except EmptyConfigError as exc:
            # Most likely a save in progress (the watch sees the written file
            # next): a warning, not an error.
            self._reject(trigger, str(exc), logging.WARNING)
            return False
        except ConfigError as exc:
            self._reject(trigger, str(exc), logging.ERROR)
            return False
        applied, ignored = merge_reloadable(running, new)
        self.pipeline.apply(applied)
        self.pipeline.last_reload_error = ""
        self.reloads += 1
        log.info(
            "config reloaded (%s) from %s: policy %s -> %s",
            trigger,
            self.path,
            running.policy.version,
            applied.policy.version,
            extra={"event": "reloaded"},
        )
        if ignored:
            log.warning(
                "config reload: %s changed but only take effect after a restart; "
                "the running values are kept",
                ", ".join(ignored),
            )
        return True

    def _reject(self, trigger: str, reason: str, level: int, exc_info: bool = False) -> None:
        self.rejected += 1
        one_line = " ".join(reason.split())
        self.pipeline.last_reload_error = f"{trigger}: {one_line}"
        log.log(
            level,
            "config reload (%s) rejected, keeping policy %s: %s",
            trigger,
            self.pipeline.settings.policy.version,
            one_line,
            exc_info=exc_info,
            extra={"event": "reload_rejected"},
        )

    def _reload_from_trigger(self, trigger: str) -> None:
        """``reload`` for SIGHUP and the watch: anything it raises beyond a
        ConfigError (a bug, an unexpected OS error) is logged and the running
        config kept. Raised inside the watch task it would end the watch for good."""
        try:
            self.reload(trigger)
        except Exception as exc:  # noqa: BLE001 - keep serving and watching
            self._reject(trigger, f"{type(exc).__name__}: {exc}", logging.ERROR, exc_info=True)

    def install_sighup(self) -> bool:
        """Reload on SIGHUP (main thread, Unix); False where that is impossible."""
        try:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, self._reload_from_trigger, "SIGHUP"
            )
        except (NotImplementedError, RuntimeError, AttributeError, ValueError):
            return False
        return True

    def remove_sighup(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def start_watch(self, poll_s: float) -> None:
        """Also reload whenever the file's contents change (checked every poll_s)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._poll(poll_s), name="config-watch")

    async def _poll(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            digest = _digest(self.path)
            if digest is not None and digest != self._digest:
                self._reload_from_trigger("file change")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
