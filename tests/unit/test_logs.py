"""tidegate.logs: one JSON object per line, carrying the bound request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from tidegate.logs import bind_request_id, configure_logging, current_request_id


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_message_level_logger_extras_and_errors(restore_root_logging):
    out = io.StringIO()
    configure_logging("json", logging.INFO, out)
    log = logging.getLogger("router.test")
    log.info("answered %s in %.1f ms", "edge", 12.345, extra={"tier": "edge", "flags": ["x"]})
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = lines(out)
    assert first["msg"] == "answered edge in 12.3 ms" and first["level"] == "INFO"
    assert first["logger"] == "router.test" and first["ts"].endswith("Z")
    assert first["tier"] == "edge" and first["flags"] == ["x"]
    assert "request_id" not in first  # outside any request
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


async def test_every_record_in_a_request_task_carries_its_id(restore_root_logging):
    out = io.StringIO()
    configure_logging("json", logging.INFO, out)
    log = logging.getLogger("anywhere")

    async def request(request_id: str) -> None:
        bind_request_id(request_id)
        await asyncio.sleep(0)  # interleave with the other request
        log.info("working")
        await asyncio.create_task(asyncio.sleep(0))
        log.info("done")

    await asyncio.gather(request("aaa"), request("bbb"))
    records = lines(out)
    assert sorted(r["request_id"] for r in records) == ["aaa", "aaa", "bbb", "bbb"]
    assert current_request_id() == ""  # the tasks' ids did not leak here


def test_text_format_is_one_plain_line(restore_root_logging):
    out = io.StringIO()
    configure_logging("text", logging.INFO, out)
    logging.getLogger("x").info("hello")
    assert out.getvalue().rstrip().endswith("INFO x: hello")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("yaml")  # type: ignore[arg-type]
