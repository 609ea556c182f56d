"""Logging set-up. Patient names, NHS numbers and image bytes never go to INFO or above:
log ids (asset id, patient row id, control id) instead."""

from __future__ import annotations

import logging
import sys
import threading
import time

from pythonjsonlogger.json import JsonFormatter


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log prints query strings, which may carry patient identifiers
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncio logs every failed accept() with a traceback: out of file descriptors, that was 2.3 million lines in 40 s
    logging.getLogger("asyncio").addFilter(RateLimitFilter("socket.accept() out of system resource"))


class RateLimited:
    """At most one line per `interval` seconds for one kind of event; the next line says how many were left out.

    For events an attacker can repeat at will (refused connections, failed accepts): each is worth knowing,
    a line for each would drown the log and the disk."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger, self.interval = logger, interval
        self._last = float("-inf")
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        if skipped:
            message += f" (and {skipped} more like this in the last {self.interval:.0f} s)"
        self.logger.warning(message, *args)


class RateLimitFilter(logging.Filter):
    """Lets through one record per `interval` seconds of those whose message starts with `prefix`."""

    def __init__(self, prefix: str, interval: float = 10.0) -> None:
        super().__init__()
        self.prefix, self.interval = prefix, interval
        self._last = float("-inf")
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            self._skipped += 1
            return False
        if self._skipped:
            record.msg = f"{record.msg} (and {self._skipped} more in the last {self.interval:.0f} s)"
        record.exc_info, record.exc_text = None, None  # the traceback is the same every time
        self._last, self._skipped = now, 0
        return True
