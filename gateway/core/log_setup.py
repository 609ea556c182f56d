"""Logging set-up, for the gateway's process and the renderer's worker processes alike. Patient names, NHS numbers and
image bytes never go to INFO or above: log ids (asset id, patient row id, control id) instead."""

from __future__ import annotations

import logging
import re
import sys
import traceback

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# record attributes that are not fields of a JSON line: uvicorn's `color_message` is its message again with ANSI
# colour codes, for its own coloured console formatter
NOT_FIELDS = [*RESERVED_ATTRS, "color_message"]


def json_formatter() -> JsonFormatter:
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "asctime": "time"},
                         reserved_attrs=NOT_FIELDS)


# a warning as logging.captureWarnings gives it: "path:line: Category: text\n  source line"
_WARNING = re.compile(r"(?s)(?P<where>.*?:\d+): (?P<category>\w+): ")
detail_log = logging.getLogger("clinphoto.detail")


class NoLibraryText(logging.Filter):
    """Records at INFO and above keep what happened and where, not the text a library or an exception put in them.
    pydicom's warnings quote the value they refuse: a patient name sent with VR DA, an NHS number as a UID, went to
    stderr at WARNING from a STOW-RS. An exception's message can quote its input the same way: uvicorn logs an
    unhandled one with its traceback at ERROR. The full text goes to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or record.name == detail_log.name:
            return True
        if record.name.partition(".")[0] == "pydicom" and record.levelno < logging.ERROR:
            # pydicom logs each value it refuses, quoted, and warns of it too: the warning is kept (below), once
            # a place as Python's warnings are, where this would be a line a value
            detail_log.debug("in full: %s", record.getMessage())
            return False
        if record.name == "py.warnings":
            text = record.getMessage()
            found = _WARNING.match(text)
            detail_log.debug("in full: %s", text)
            record.msg, record.args = (f"{found['category']} at {found['where']} (its text is logged at DEBUG only)"
                                       if found else "a warning (its text is logged at DEBUG only)"), ()
        if record.exc_info and record.exc_info[0] is not None:
            kind, _exc, tb = record.exc_info
            detail_log.debug("in full: %s", record.getMessage(), exc_info=record.exc_info)
            # as exc_text, without exc_info: both formatters (text and JSON) print it instead of formatting their own
            record.exc_text = ("Traceback (most recent call last):\n" + "".join(traceback.format_tb(tb))
                               + f"{kind.__name__} (its message is logged at DEBUG only)")
            record.exc_info = None
        return True


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(NoLibraryText())
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log prints query strings, which may carry patient identifiers
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # warnings go to the handler above (and its filter), not straight to stderr as text
    logging.captureWarnings(True)
