"""The HTTP door's own accept loop: uvicorn's protocol on each connection, accept failures paused and logged.

uvicorn's server accepts through loop.create_server(). On uvloop (what `clinphoto serve` runs on) that is libuv's
accept, which never tells the program it failed: out of file descriptors it takes back a spare one, accepts every
waiting connection and closes it at once, and logs nothing; and when that spare is gone it retries without pause
(a review measured a whole core spent, accept4() failing ~5,700 times in 1.5 s). Accepted here, as the MLLP door
accepts (gateway/hl7/listener.py), a failure pauses accepting for a second, waiting connections stay queued in the
backlog until descriptors come free, and one line says why (rate-limited).

It also caps the connections open at once (setting http_max_connections, fitted to the open-file limit beside the
other doors): at the cap it stops accepting, so new connections wait in the backlog, and starts again as soon as one
closes. Connections that are idle, trickle a request or read none of their answer are closed by the protocol's
timeouts (bounded_head.py), so a cap filled by them empties within that time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from gateway.core.logs import RateLimited

log = logging.getLogger("clinphoto.http")

PAUSE_SECONDS = 1.0
BATCH = 64  # connections accepted in one go before the other doors have the loop again


class Acceptor:
    """Accept on a listening socket (non-blocking), at most `max_connections` open at once, and start on each the
    protocol `protocol_factory(on_closed)` makes; the protocol calls on_closed once, when its connection is lost."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[Callable[[], None]], asyncio.Protocol],
                 max_connections: int, tls: ssl.SSLContext | None = None, handshake_timeout: float = 60.0) -> None:
        self.sock = sock
        self.tls = tls  # each connection's TLS handshake is made by the loop, within handshake_timeout (counted open)
        self.handshake_timeout = handshake_timeout
        self.protocol_factory = protocol_factory
        self.max_connections = max_connections
        self.open = 0  # accepted and not yet closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = sock.fileno()
        self._reading = False
        self._paused_on_failure = False
        self._starting: set[asyncio.Task] = set()
        self._failure_log = RateLimited(log, 10.0)
        self._full_log = RateLimited(log, 10.0)

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._resume()

    def stop(self) -> None:
        """Stop accepting and close the listening socket (connections already made are uvicorn's to close)."""
        self._pause()
        self.sock.close()

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _resume(self) -> None:
        if not self._reading and self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self._fd, self._accept)
            self._reading = True

    def _closed(self) -> None:
        self.open -= 1
        if self.open < self.max_connections and not self._paused_on_failure:
            self._resume()

    def _accept(self) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(BATCH):
            if self.open >= self.max_connections:
                self._full_log.warning("HTTP connection limit reached (%d open, setting http_max_connections): new "
                                       "connections wait until one closes", self.open)
                self._pause()
                return
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # out of file descriptors or memory: the connections wait in the backlog, not closed unanswered
                self._failure_log.warning("HTTP cannot accept connections (%s); pausing %.0f s",
                                          exc.strerror or exc, PAUSE_SECONDS)
                self._pause()
                self._paused_on_failure = True
                loop.call_later(PAUSE_SECONDS, self._failure_passed)
                return
            conn.setblocking(False)
            # a response must not wait ~40 ms for Nagle's algorithm (GET /healthz keep-alive 44 ms -> 1.8 ms)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.open += 1
            task = loop.create_task(self._start(loop, conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _failure_passed(self) -> None:
        self._paused_on_failure = False
        if self.open < self.max_connections:
            self._resume()

    async def _start(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        counted = True

        def closed_once() -> None:  # the connection leaves the count once, whichever way it ends
            nonlocal counted
            if counted:
                counted = False
                self._closed()

        try:
            await loop.connect_accepted_socket(lambda: self.protocol_factory(closed_once), conn, ssl=self.tls,
                                               ssl_handshake_timeout=self.handshake_timeout if self.tls else None)
        except Exception as exc:  # the peer gone already, or its TLS handshake failed or took too long
            log.info("HTTP connection could not start: %s", getattr(exc, "reason", None) or type(exc).__name__)
            conn.close()
            closed_once()  # connection_lost never comes for a connection never made
