from __future__ import annotations

import json
import logging

import structlog

from lorafleet.core.logging import configure_logging

log = structlog.get_logger("lorafleet.tests.logging")


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_json_lines_with_context(capsys, restore_logging):
    configure_logging("json", "info")
    with structlog.contextvars.bound_contextvars(request_id="r-9"):
        log.info("adapter_loaded", adapter="a1", version=3)
    log.debug("too_verbose")

    (line,) = _lines(capsys.readouterr().err)
    event = json.loads(line)
    assert event["event"] == "adapter_loaded"
    assert (event["adapter"], event["version"]) == ("a1", 3)
    assert event["request_id"] == "r-9"
    assert event["level"] == "info"
    assert event["logger"] == "lorafleet.tests.logging"
    assert "T" in event["timestamp"]


def test_stdlib_records_rendered_the_same_way(capsys, restore_logging):
    configure_logging("json", "info")
    logging.getLogger("some.library").warning("plain %s message", "stdlib")
    (line,) = _lines(capsys.readouterr().err)
    event = json.loads(line)
    assert event["event"] == "plain stdlib message"
    assert (event["level"], event["logger"]) == ("warning", "some.library")


def test_exceptions_are_in_the_json(capsys, restore_logging):
    configure_logging("json")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("rpc_failed")
    event = json.loads(_lines(capsys.readouterr().err)[0])
    assert "RuntimeError: kaput" in event["exception"]


def test_reconfigure_is_idempotent(capsys, restore_logging):
    configure_logging("json", "info")
    configure_logging("json", "debug")
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "lorafleet"]
    assert len(ours) == 1
    log.debug("once_only")
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1  # debug now enabled, and not duplicated
    assert json.loads(lines[0])["event"] == "once_only"


def test_console_format_and_auto(capsys, restore_logging):
    configure_logging("console", "info")
    log.info("node_joined", node="n1")
    err = capsys.readouterr().err
    assert "node_joined" in err and "node=n1" in err
    assert not err.lstrip().startswith("{")

    # Under pytest stderr is captured, not a TTY: auto means JSON.
    configure_logging("auto", "info")
    log.info("auto_format")
    assert json.loads(_lines(capsys.readouterr().err)[0])["event"] == "auto_format"
