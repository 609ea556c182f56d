"""Log helpers for every part of the gateway: events a hostile sender can repeat at will are logged, but not once each."""

from __future__ import annotations

import logging
import threading
import time


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
