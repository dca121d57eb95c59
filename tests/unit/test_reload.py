"""router.reload: which parts of a new config apply, and rejection of bad files."""

from __future__ import annotations

import logging

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
