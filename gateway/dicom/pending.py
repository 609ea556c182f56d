"""Pending C-GET and C-MOVE responses at most one per interval, where pynetdicom sends one after every sub-operation.

PS3.4 C.4.2.3 and C.4.3.3 make pending responses optional. Each costs the requestor a message to read: a pynetdicom
requestor decodes it (~0.1-0.4 ms of Python) on the path between two photos of a C-GET, and the gateway writes it on
the same path (~0.2 ms traced, its thread hand-off included). dcm4chee-arc sends none during a C-GET by default
(dcmSendPendingCGet false); a C-GET requestor sees each sub-operation anyway, as the C-STORE it takes in. A C-MOVE
requestor sees only these responses, so they still come, once per interval: progress for a long retrieve, and a
message well inside a requestor's DIMSE timeout (pynetdicom's is 30 s) while the destination takes the objects.
The final response always carries the counts (PS3.4 C.4.2.1.4, C.4.3.1.4)."""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom.dimse_primitives import C_GET, C_MOVE

PENDING = 0xFF00
DEFAULT_INTERVAL = 1.0  # seconds


class PendingThrottle:
    """Which pending retrieve responses to send, per request (by its Message ID) on one association."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[int, float] = {}  # Message ID -> when its request came, or its last pending response went
        self._lock = threading.Lock()  # the reactor starts requests; a handler's thread may send their responses

    def started(self, request: Any) -> None:
        """A C-GET or C-MOVE request is about to be served (other requests are not counted)."""
        if isinstance(request, (C_GET, C_MOVE)) and request.MessageID is not None:
            with self._lock:
                self._last[int(request.MessageID)] = time.monotonic()

    def should_send(self, response: Any) -> bool:
        """False for a pending C-GET/C-MOVE response sooner than the interval after the last; a final response ends
        the request's count."""
        if self.interval <= 0 or not isinstance(response, (C_GET, C_MOVE)) or response.MessageIDBeingRespondedTo is None:
            return True
        message_id = int(response.MessageIDBeingRespondedTo)
        now = time.monotonic()
        with self._lock:
            if response.Status != PENDING:
                self._last.pop(message_id, None)
                return True
            last = self._last.get(message_id)
            if last is not None and now - last < self.interval:
                return False
            self._last[message_id] = now
            return True
