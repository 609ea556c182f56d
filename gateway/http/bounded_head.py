"""uvicorn's httptools protocol with the request head bounded in size, as h11's is, and slow clients timed out.

httptools parses HTTP in C: a 12-MP STOW-RS went from 61.2 to 70.0 files/s against h11 in Python (A/B, 6 batches of
30 in turns). But under uvicorn it takes request heads of any size: a probe's 64 x 1 MB headers were buffered and
answered 200, where h11 keeps at most 16 KiB of a head unparsed and answers 400. This keeps httptools' speed and h11's
bound: bytes read while a request's head is still incomplete are counted, and past MAX_HEAD_BYTES the request is
answered 400 and the connection closed. A read that completes the head is not counted (its body may follow in it);
one that ends a request's body and begins the next request's head is counted whole (pipelined requests after a large
body, which no client here sends, could be refused early).

uvicorn also waits for ever on a connection that sends nothing, or a head or body a byte at a time (only an idle
keep-alive connection is timed out): each holds a descriptor of the one limit every door shares. As nginx does
(client_header_timeout, client_body_timeout), a head must be whole within `read_timeout` of its first byte (or of the
connection, for the first request) and a body may not go `read_timeout` without a byte: a late head is answered 408,
a connection that never sent a byte is closed without an answer (a browser's unused preconnection), and a stalled body
ends the request as a client disconnect would (408 when nothing was answered yet).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.core.logs import RateLimited

log = logging.getLogger("clinphoto.http")
slow_log = RateLimited(log)

MAX_HEAD_BYTES = 16 * 1024  # h11's (uvicorn's h11_max_incomplete_event_size): a bearer token and cookies fit


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, read_timeout: float = 60.0, on_closed: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # a request begun, its head not complete yet
        self._head_bytes = 0
        self._read_timeout = read_timeout
        self._on_closed = on_closed
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "first request", "head" or "body" while the timer runs
        self._last_read = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait("first request")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for is not None:
            self._last_read = self.loop.time()
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                self.send_400_response("Request head too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._waiting_for == "first request":
            self._waiting_for = "head"  # the first request's head is due within read_timeout of the connection
        else:
            self._wait("head")

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if not self.transport.is_closing():
            self._wait("body")  # stopped at once by on_message_complete when there is none

    def on_message_complete(self) -> None:
        self._stop_waiting()
        super().on_message_complete()

    def _wait(self, what: str) -> None:
        self._stop_waiting()
        self._waiting_for, self._last_read = what, self.loop.time()
        self._timer = self.loop.call_later(self._read_timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting_for = None

    def _timed_out(self) -> None:
        self._timer = None
        what = self._waiting_for
        if what is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if what == "body":
            # a body's timeout runs from its last byte, and not while we hold the client back: reading paused
            # (the app has not taken what came) or 100-continue not yet sent
            idle = self.loop.time() - self._last_read
            if idle < self._read_timeout or self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                self._timer = self.loop.call_later(max(self._read_timeout - idle, 0.01), self._timed_out)
                return
        self._waiting_for = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        if what == "first request":
            log.debug("HTTP connection from %s sent nothing in %.0f s: closed", client, self._read_timeout)
            self.transport.close()
            return
        slow_log.warning("HTTP client %s sent no whole request %s in %.0f s: answered 408 and closed", client,
                         "body" if what == "body" else "head", self._read_timeout)
        if what == "body" and cycle is not None:
            answered = cycle.response_started
            cycle.disconnected = True  # the app's receive() now gets http.disconnect; its send() writes nothing
            cycle.message_event.set()
            if answered:
                self.transport.close()
                return
        self.transport.write(b"".join([STATUS_LINE[408], b"content-type: text/plain; charset=utf-8\r\n",
                                       b"content-length: 16\r\nconnection: close\r\n\r\n", b"Request timeout."]))
        self.transport.close()
