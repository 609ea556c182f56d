"""Logging set-up. Patient names, NHS numbers and image bytes never go to INFO or above:
log ids (asset id, patient row id, control id) instead."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# record attributes that are not fields of a JSON line: uvicorn's `color_message` is its message again with ANSI
# colour codes, for its own coloured console formatter
NOT_FIELDS = [*RESERVED_ATTRS, "color_message"]


def json_formatter() -> JsonFormatter:
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "asctime": "time"},
                         reserved_attrs=NOT_FIELDS)


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
