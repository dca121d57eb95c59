"""router.reload: which parts of a new config apply, and rejection of bad files."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
import yaml

from router.reload import RELOADABLE, Reloader, merge_reloadable
from router.service import build_router
from router.settings import RouterSettings


def settings(**data: object) -> RouterSettings:
    return RouterSettings.model_validate(data)


def test_reloadable_sections_apply_and_restart_only_fields_are_kept() -> None:
    current = settings(listen="127.0.0.1:1", budgets={"url": "memory"})
    new = settings(
        listen="127.0.0.1:2",
        policy={"version": "v2", "min_confidence": 0.9},
        rules=[{"name": "r", "tags": ["x"], "route": "cloud"}],
        budgets={"url": "redis://127.0.0.1:6379/0", "default": {"requests_per_second": 5}},
        retries={"cloud_attempts": 1},
        breaker={"failure_threshold": 9},
    )
    applied, ignored = merge_reloadable(current, new)
    assert applied.policy.version == "v2" and applied.rules == new.rules
    assert applied.retries.cloud_attempts == 1 and applied.breaker.failure_threshold == 9
    assert applied.budgets.default.requests_per_second == 5  # limits apply ...
    assert applied.budgets.url == "memory"  # ... the store does not
    assert applied.listen == "127.0.0.1:1"
    assert ignored == ["listen", "budgets.url/key_prefix"]
    assert set(RELOADABLE) == {"policy", "rules", "tenants", "budgets", "retries", "breaker"}


async def test_reloader_applies_to_the_pipeline_and_rejects_bad_files(tmp_path, caplog) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"policy": {"version": "one"}, "edge": []}))
    servicer = build_router(RouterSettings.model_validate({"policy": {"version": "one"}}))
    try:
        pipeline = servicer.pipeline
        reloader = Reloader(path, pipeline)
        path.write_text(
            yaml.safe_dump({"policy": {"version": "two"}, "breaker": {"cooldown_s": 1}})
        )
        assert reloader.reload("test")
        assert pipeline.version == "two" and pipeline.policy.version == "two"
        assert all(n.breaker.settings.cooldown_s == 1 for n in pipeline.clouds)
        path.unlink()
        with caplog.at_level(logging.ERROR, logger="router.reload"):
            assert not reloader.reload("test")
        assert "config reload (test) rejected, keeping policy two" in caplog.text
        assert "does not exist" in pipeline.last_reload_error
        assert (reloader.reloads, reloader.rejected) == (1, 1)
    finally:
        await servicer.close()


TENANTED = {
    "policy": {"version": "keyed"},
    "tenants": [{"name": "acme", "api_key_hashes": ["sha256:" + "0" * 64]}],
    "rules": [{"name": "acme-cloud", "tenants": ["acme"], "route": "cloud"}],
}


async def test_an_empty_file_is_refused_and_the_running_tenants_stay(tmp_path, caplog) -> None:
    """Editors truncate before writing: a reload caught in between must not run
    on all defaults (no tenants: auth off, no rules)."""
    path = tmp_path / "router.yaml"
    servicer = build_router(settings(**TENANTED))
    try:
        pipeline = servicer.pipeline
        reloader = Reloader(path, pipeline)
        for text in ("", "\n", "# only a comment\n"):
            path.write_text(text)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="router.reload"):
                assert not reloader.reload("test")
            assert [r.levelno for r in caplog.records] == [logging.WARNING]
            assert f"config file {path} is empty" in caplog.text
            assert [t.name for t in pipeline.settings.tenants] == ["acme"]
            assert [r.name for r in pipeline.settings.rules] == ["acme-cloud"]
            assert pipeline.version == "keyed" and "is empty" in pipeline.last_reload_error
        assert (reloader.reloads, reloader.rejected) == (0, 3)
        path.write_text("{}\n")  # an explicit empty mapping still means all defaults
        assert reloader.reload("test") and pipeline.settings.tenants == []
    finally:
        await servicer.close()


async def test_an_unreadable_file_is_rejected_not_raised(tmp_path) -> None:
    path = tmp_path / "router.yaml"
    servicer = build_router(settings(**TENANTED))
    try:
        reloader = Reloader(path, servicer.pipeline)
        path.write_bytes(b"policy:\n  version: \xff\xfe\n")
        assert not reloader.reload("test")
        assert "is not valid UTF-8" in servicer.pipeline.last_reload_error
        path.unlink()
        path.mkdir()  # reading fails with an OSError, as without permission (we run as root)
        assert not reloader.reload("test")
        assert "cannot be read" in servicer.pipeline.last_reload_error
        assert servicer.pipeline.version == "keyed" and reloader.rejected == 2
    finally:
        await servicer.close()


async def test_the_watch_survives_a_bad_file_and_applies_the_next_good_one(tmp_path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(TENANTED))
    servicer = build_router(settings(**TENANTED))
    reloader = Reloader(path, servicer.pipeline)
    reloader.start_watch(0.02)
    try:
        pipeline = servicer.pipeline
        path.write_bytes(b"policy:\n  version: \xff\n")  # not UTF-8
        await until(lambda: reloader.rejected == 1)
        path.write_text("rules: " + "[" * 3000 + "]" * 3000 + "\n")  # PyYAML recurses
        await until(lambda: reloader.rejected == 2)
        assert "nested too deeply" in pipeline.last_reload_error

        # Whatever else a reload raises (a bug), the watch logs it and goes on.
        def broken(trigger: str) -> bool:
            raise RuntimeError(f"a bug ({trigger})")

        reloader.reload = broken  # type: ignore[method-assign]
        path.write_text("# touched\n")
        await until(lambda: reloader.rejected >= 3)  # (again each poll: the bug keeps failing)
        assert "RuntimeError: a bug (file change)" in pipeline.last_reload_error
        del reloader.reload  # the real one again
        before = reloader.rejected
        path.write_text("")  # a save in progress
        await until(lambda: reloader.rejected > before)
        assert "is empty" in pipeline.last_reload_error
        assert pipeline.version == "keyed" and pipeline.settings.tenants
        path.write_text(yaml.safe_dump({**TENANTED, "policy": {"version": "next"}}))
        await until(lambda: pipeline.version == "next")
        assert reloader._watch is not None and not reloader._watch.done()
    finally:
        await reloader.stop()
        await servicer.close()


async def test_sighup_reloads_and_survives_a_bad_file(tmp_path) -> None:
    path = tmp_path / "router.yaml"
    servicer = build_router(settings(**TENANTED))
    reloader = Reloader(path, servicer.pipeline)
    if not reloader.install_sighup():
        pytest.skip("no SIGHUP handler here (not the main thread, or not Unix)")
    try:
        path.write_text("rules: " + "[" * 3000 + "]" * 3000 + "\n")  # nested too deeply
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: reloader.rejected == 1)
        path.write_text(yaml.safe_dump({**TENANTED, "policy": {"version": "hup"}}))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: servicer.pipeline.version == "hup")
    finally:
        reloader.remove_sighup()
        await servicer.close()


async def until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not condition():
        assert loop.time() < give_up, "timed out"
        await asyncio.sleep(0.01)
