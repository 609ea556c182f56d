"""uvicorn's httptools protocol with the request head bounded in size, as h11's is, and slow clients timed out.

httptools parses HTTP in C: a 12-MP STOW-RS went from 61.2 to 70.0 files/s against h11 in Python (A/B, 6 batches of
30 in turns). But under uvicorn it takes request heads of any size: a probe's 64 x 1 MB headers were buffered and
answered 200, where h11 keeps at most 16 KiB of a head unparsed and answers 400. This keeps httptools' speed and h11's
bound: bytes read while a request's head is still incomplete are counted, and past MAX_HEAD_BYTES the request is
answered 400 and the connection closed. A read that completes the head is not counted (its body may follow in it);
one that ends a request's body and begins the next request's head is counted whole (pipelined requests after a large
body, which no client here sends, could be refused early).

uvicorn also waits for ever on a connection that sends nothing, or a head or body a byte at a time, or reads nothing
of its answer (only a keep-alive connection idle since its last answer is timed out, and stray bytes after that
answer stop even that timer): each holds a descriptor of the limit every door shares and a place under the HTTP
door's connection cap. As nginx does (client_header_timeout, client_body_timeout, send_timeout), within
`read_timeout`:
- a head must be whole from its first byte (or from the connection, or the last answer's stray bytes): else 408;
- a connection that never began a request is closed without an answer (a browser's unused preconnection);
- a body may not go without a byte: the request ends as a client disconnect would (408 when nothing was answered);
- an answer waiting unsent may not go without the client taking some of it (its end too: uvloop's close() waits for
  it to drain): the connection is aborted and the request ends as a client disconnect would.
Time in which we hold the client back (reading paused while the app has not taken what came, 100-continue not yet
sent, an earlier pipelined answer still being made) does not count: the clock starts again when it ends. A body sent
a byte at a time, each within the timeout, is not cut off (nginx's rule too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway.core.logs import RateLimited
from gateway.core.unsent import unsent
from gateway.http.ignored_upgrade import IgnoresUpgrade

log = logging.getLogger("clinphoto.http")
slow_log = RateLimited(log)

# the send timeout looks this often per read_timeout, and gives up a whole read_timeout after the last progress it
# saw: a client taking 100 KB/s took it in steps ~1-2 s apart (its TCP window reopening), and one look a second
# apart at read_timeout 1 s cut it off
SEND_CHECKS = 4
MAX_HEAD_BYTES = 16 * 1024  # h11's (uvicorn's h11_max_incomplete_event_size): a bearer token and cookies fit


# what the connection waits for while its read timer runs: none for a request, or between requests (before the first,
# or after stray bytes); a request's head; its body
IDLE, HEAD, BODY = "idle", "head", "body"


class BoundedHeadProtocol(IgnoresUpgrade):
    def __init__(self, *args: Any, read_timeout: float = 60.0, on_closed: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # a request begun, its head not complete yet
        self._head_bytes = 0
        self._read_timeout = read_timeout
        self._on_closed = on_closed
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # IDLE, HEAD or BODY while the read timer runs
        self._last_read = 0.0
        self._held_back = False  # at the timer's last check we were holding the client back
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent_mark = 0  # the fewest bytes seen unsent since the send timer was set: fewer later is progress
        self._answering: Any = None  # the request whose answer is being made (self.cycle is the newest one read)
        self._deferred_400: str | None = None  # bad input after an answer in flight, answered 400 once that is made
        self._deferred_after: Any = None  # with a queued request's bad body: the request whose answer comes first
        self._in_body = False  # a request's head complete, its body not yet
        self._last_progress = 0.0  # when the unsent bytes last went down (the send timer's)
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait(IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop_waiting()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed()

    def data_received(self, data: bytes) -> None:
        if self._deferred_400 is not None:  # what follows a bad head is not read
            return
        if self._waiting_for is not None:
            self._last_read = self.loop.time()
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                self.send_400_response("Request head too large.")
                return
        if self._timer is None and (self.cycle is None or self.cycle.response_complete):
            # bytes outside any request (a blank line, the rest of a body answered early) stopped uvicorn's
            # keep-alive timer and began nothing: without this the connection would be held for ever
            self._wait(IDLE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._in_body = True, 0, False
        if self._waiting_for == IDLE:
            self._waiting_for = HEAD  # the head is due within read_timeout of the connection or of the stray bytes
        else:
            self._wait(HEAD)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if not self.transport.is_closing():
            self._in_body = True
            self._wait(BODY)  # stopped at once by on_message_complete when there is none

    def on_message_complete(self) -> None:
        self._in_body = False
        self._stop_waiting()
        super().on_message_complete()

    def body_resumed(self) -> None:
        self._in_body = True
        self._wait(BODY)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        cycle, answering = self.cycle, self._answering
        if self._in_body and cycle is not None and (answering is None or answering is cycle):
            # the body of the request being answered is bad: it ends (its app would wait for the rest for ever),
            # and the client is told why unless its answer has begun
            if self._end_read_request(cycle):
                return
        elif self._answer_in_flight():
            # written now it would be taken for the answer still being made to an earlier pipelined request
            self._deferred_400 = msg
            if self._in_body:  # a queued request's body: that request is never answered, only the 400 after it
                self._deferred_after = answering
            self.flow.pause_reading()
            return
        super().send_400_response(msg)
        self._watch_sending()

    def on_response_complete(self) -> None:
        after = self._deferred_after
        if self._deferred_400 is not None and after is not None and after.response_complete and not self.transport.is_closing():
            # the request read after this answer's has a bad body: the 400 now, and nothing queued is started
            msg, self._deferred_400, self._deferred_after = self._deferred_400, None, None
            self._end_requests()
            self.pipeline.clear()
            super().send_400_response(msg)
            self._watch_sending()
            return
        super().on_response_complete()
        if self._deferred_400 is not None and not self.transport.is_closing() and not self._answer_in_flight():
            msg, self._deferred_400 = self._deferred_400, None
            super().send_400_response(msg)
        self._watch_sending()  # an answer whose end is still unsent: close() waits for it to drain

    def shutdown(self) -> None:
        super().shutdown()
        self._watch_sending()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_sending()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:  # drained: the client reads
            self._send_timer.cancel()
            self._send_timer = None
        self._watch_sending()  # uvloop resumes with up to 16 bytes still unsent

    def _answer_in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _watch_sending(self) -> None:
        """While bytes wait unsent, the client must take some of them every read_timeout (nginx's send_timeout)."""
        if self._send_timer is None and not self._lost and self.transport.get_write_buffer_size():
            self._unsent_mark, self._last_progress = unsent(self.transport), self.loop.time()
            self._send_timer = self.loop.call_later(self._read_timeout / SEND_CHECKS, self._send_timed_out)

    def _wait(self, what: str) -> None:
        self._stop_waiting()
        self._waiting_for, self._last_read, self._held_back = what, self.loop.time(), False
        self._timer = self.loop.call_later(self._read_timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting_for = None

    def _holding_back(self, what: str) -> bool:
        """We, not the client, are why nothing comes: reading paused (the app has not taken what came, or an earlier
        pipelined request is still being answered), or 100-continue not yet sent."""
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            return True
        return what != BODY and cycle is not None and not cycle.response_complete

    def _timed_out(self) -> None:
        self._timer = None
        what = self._waiting_for
        if what is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._holding_back(what) or self._held_back:
            # the client gets a whole read_timeout from when we stop holding it back
            self._held_back = self._holding_back(what)
            self._last_read = now
            self._timer = self.loop.call_later(self._read_timeout, self._timed_out)
            return
        if what == BODY and now - self._last_read < self._read_timeout:  # a body's timeout runs from its last byte
            self._timer = self.loop.call_later(self._read_timeout - (now - self._last_read), self._timed_out)
            return
        self._waiting_for = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        if what == IDLE:
            log.debug("HTTP connection from %s began no request in %.0f s: closed", client, self._read_timeout)
            self.transport.close()
            return
        slow_log.warning("HTTP client %s sent no whole request %s in %.0f s: answered 408 and closed", client,
                         what, self._read_timeout)
        if what == BODY and self.cycle is not None and self._end_read_request(self.cycle):
            return
        self.transport.write(b"".join([STATUS_LINE[408], b"content-type: text/plain; charset=utf-8\r\n",
                                       b"content-length: 16\r\nconnection: close\r\n\r\n", b"Request timeout."]))
        self.transport.close()
        self._watch_sending()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        waiting = unsent(self.transport)
        if not waiting or self._lost:
            return
        now = self.loop.time()
        if waiting < self._unsent_mark:  # it took some: a slow link, not a stalled client
            self._unsent_mark, self._last_progress = waiting, now
        if now - self._last_progress < self._read_timeout:
            self._send_timer = self.loop.call_later(self._read_timeout / SEND_CHECKS, self._send_timed_out)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        slow_log.warning("HTTP client %s took none of its answer in %.0f s: closed", client, self._read_timeout)
        self._end_requests()
        self.transport.abort()  # close() would wait for the unread answer to drain

    def _end_read_request(self, cycle: Any) -> bool:
        """End the requests, `cycle` (the one being read) with them; True when its answer had begun: the connection
        is then closed, as no error can follow that answer (the caller writes it otherwise)."""
        answered = bool(cycle.response_started)
        self._end_requests()
        if answered:
            self.transport.close()
            self._watch_sending()
        return answered

    def _end_requests(self) -> None:
        """Every request of the connection's: the app's receive() now gets http.disconnect, and its send() writes
        nothing (the one being answered may be older than self.cycle, the newest read, when requests are pipelined)."""
        queued = [cycle for cycle, _app in self.pipeline]
        for cycle in {id(c): c for c in (self._answering, self.cycle, *queued) if c is not None}.values():
            cycle.disconnected = True
            cycle.message_event.set()
