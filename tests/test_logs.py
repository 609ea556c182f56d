"""The JSON log lines: one object a line, the fields we name, nothing a console formatter put there for itself."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from gateway.core.log_setup import configure_logging


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


def test_a_librarys_warning_keeps_its_kind_and_place_but_not_its_text():
    """pydicom's warnings quote the value they refuse (a patient name sent with VR DA, seen from a STOW-RS), and its
    logger logs it again. In a process of its own: pytest takes Python's warnings for itself."""
    script = (
        "from gateway.core.log_setup import configure_logging\n"
        "configure_logging('json', 'INFO')\n"
        "from pydicom import Dataset\n"
        "from pydicom.dataelem import DataElement\n"
        "for _ in range(3):\n"
        "    Dataset().add(DataElement(0x00100010, 'DA', 'ZZSECRET^' + 'NAME', validation_mode=1))  # 1: WARN\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert "ZZSECRET" not in done.stderr, done.stderr
    (warning,) = lines  # once a place, as Python's warnings are: not once a value
    assert warning["name"] == "py.warnings" and warning["level"] == "WARNING", warning
    assert warning["message"].startswith("UserWarning at ") and "pydicom" in warning["message"], warning


def test_an_exceptions_message_is_left_out_at_error_and_its_traceback_kept(json_lines):
    value = "ZZSECRET^NAME"
    try:
        int(value)
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (line,) = json_lines()
    assert "ZZSECRET" not in json.dumps(line), line
    assert line["message"] == "Exception in ASGI application"
    assert "test_logs.py" in line["exc_info"] and line["exc_info"].endswith("ValueError (its message is logged at DEBUG only)")
