"""The HTTP door's own accept loop: uvicorn's protocol on each connection, accept failures paused and logged.

uvicorn's server accepts through loop.create_server(). On uvloop (what `clinphoto serve` runs on) that is libuv's
accept, which never tells the program it failed: out of file descriptors it takes back a spare one, accepts every
waiting connection and closes it at once, and logs nothing; and when that spare is gone it retries without pause
(a review measured a whole core spent, accept4() failing ~5,700 times in 1.5 s). Accepted here, as the MLLP door
accepts (gateway/hl7/listener.py), a failure pauses accepting for a second, waiting connections stay queued in the
backlog until descriptors come free, and one line says why (rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from gateway.core.logs import RateLimited

log = logging.getLogger("clinphoto.http")

PAUSE_SECONDS = 1.0
BATCH = 64  # connections accepted in one go before the other doors have the loop again


class Acceptor:
    """Accept on a listening socket (non-blocking) and start `protocol_factory`'s protocol on each connection."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = sock.fileno()
        self._starting: set[asyncio.Task] = set()
        self._failure_log = RateLimited(log, 10.0)

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._accept)

    def stop(self) -> None:
        """Stop accepting and close the listening socket (connections already made are uvicorn's to close)."""
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
        self.sock.close()

    def _accept(self) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(BATCH):
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
                loop.remove_reader(self._fd)
                loop.call_later(PAUSE_SECONDS, self._resume)
                return
            conn.setblocking(False)
            # a response must not wait ~40 ms for Nagle's algorithm (GET /healthz keep-alive 44 ms -> 1.8 ms)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._start(loop, conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _resume(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self._fd, self._accept)

    async def _start(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the peer gone already
            log.info("HTTP connection could not start: %s", type(exc).__name__)
            conn.close()
