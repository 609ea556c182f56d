"""The JSON log lines: one object a line, the fields we name, nothing a console formatter put there for itself."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.logs import configure_logging


@pytest.fixture
def json_lines(monkeypatch):
    """Logging configured as `CLINPHOTO_LOG_FORMAT=json` does, into a buffer; the root logger restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # as in a fresh `clinphoto serve` (uvicorn run with log_config=None): a test earlier in this process may have run
    # uvicorn with its own logging config, which gives its loggers handlers, levels and propagate=False
    uvicorn_loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error")]
    saved = [(lg.handlers[:], lg.propagate, lg.level, lg.disabled) for lg in uvicorn_loggers]
    for logger in uvicorn_loggers:
        logger.handlers[:], logger.propagate, logger.disabled = [], True, False
        logger.setLevel(logging.NOTSET)  # setLevel: the loggers' cached levels are cleared too
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    configure_logging("json", "INFO")
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:], root.level = handlers, level
    for logger, (old_handlers, propagate, old_level, disabled) in zip(uvicorn_loggers, saved):
        logger.handlers[:], logger.propagate, logger.disabled = old_handlers, propagate, disabled
        logger.setLevel(old_level)


def test_uvicorns_color_message_is_not_a_field(json_lines):
    # as uvicorn logs its start: the plain message, and the same with ANSI codes for its coloured console
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:8080",
                                            extra={"color_message": "Uvicorn running on \x1b[1m%s\x1b[0m"})
    logging.getLogger("clinphoto.test").info("stored %s", "a1", extra={"asset_id": "a1"})
    uvicorn_line, ours = json_lines()
    assert uvicorn_line["message"] == "Uvicorn running on http://127.0.0.1:8080" and "color_message" not in uvicorn_line
    assert {"time", "level", "name", "message"} <= set(uvicorn_line) and "\x1b" not in json.dumps(uvicorn_line)
    assert ours["asset_id"] == "a1"  # other extras are still fields
