"""The MLLP listener started by `clinphoto serve`: sockets in, ACKs out, work handed to the group committer.

An asyncio Protocol rather than streams: at thousands of messages a second the
per-read Task and timeout that StreamReader + wait_for cost is measurable. Each
connection's messages go to the committer in arrival order and their ACKs come
back in that order; the idle timeout is one periodic sweep, not a timer per read.
Nothing touches the database on the loop's thread: the writer thread commits
every message, so a locked database delays ACKs, never the loop. A large message
is read in a worker thread, so one hostile sender cannot stall the other doors
that share the loop; connections are capped, a frame has a deadline, and the
accept loop is our own, so running out of file descriptors pauses accepting
instead of spinning (asyncio's accept loop logs each failure and retries
~100-fold: 2.3 million log lines in 40 s here).

Reading is held (the sender is then held back by TCP) while MAX_IN_FLIGHT messages are unanswered, and while the
ACKs written exceed the transport's high-water mark: a sender that reads none of its ACKs would otherwise have them
buffered here without bound. Time held does not count against the frame deadline; a peer that takes none of the ACKs
waiting for it within the idle timeout is aborted (close() would wait for ever for them to drain).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import socket
import ssl
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from gateway.core.descriptors import fit_connection_limit
from gateway.core.logs import RateLimited
from gateway.core.unsent import unsent
from gateway.hl7.ack import AckError
from gateway.hl7.committer import GroupCommitter
from gateway.hl7.config import Hl7Settings
from gateway.hl7.mllp import FrameTooLarge, MllpDecoder, frame
from gateway.hl7.pipeline import Prepared, Processor, Result
from mapping.engine import Mapper
from mapping.schema import DEFAULT_MAPPING, load_mapping
from store.db import Database

log = logging.getLogger("clinphoto.hl7.mllp")

# a client that sends without reading its ACKs is paused at this many unanswered messages
MAX_IN_FLIGHT = 256
# Messages up to this size are read on the event loop: a normal ADT (~1 KB) takes ~50 us, less than a hop to a
# worker thread. Larger ones go to a worker, so one 300 KB message (37 s once) cannot hold up HTTP or DICOM.
INLINE_PREPARE_BYTES = 32 * 1024
# at the connection cap, a connection this long inside one frame may be closed for a new one (a PAS sends a
# whole message in milliseconds)
SLOW_FRAME_SECONDS = 1.0


def build_processor(settings: Hl7Settings) -> Processor:
    mapping = load_mapping(settings.mapping_file or DEFAULT_MAPPING)
    return Processor(settings, Mapper(mapping, {"mrn_system": settings.mrn_system}))


def tls_context(settings: Hl7Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(settings.tls_client_ca)
    return ctx


class AllowList:
    def __init__(self, entries: list[str]) -> None:
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class MllpConnection(asyncio.Protocol):
    def __init__(self, listener: MllpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.decoder = MllpDecoder(listener.settings.max_frame_bytes)
        self.in_flight = 0
        # refreshed by whole messages and ACKs only: stray bytes trickled outside a frame do not keep it alive
        self.last_active = time.monotonic()
        self.frame_started: float | None = None  # when the frame now arriving began (the frame deadline)
        # messages being read in a worker thread, with the ones behind them, in arrival order
        self.preparing: deque[asyncio.Future] = deque()
        self.closing = False
        # the two reasons to hold reading, kept apart so that the end of one does not resume what the other holds
        self.in_flight_held = False  # MAX_IN_FLIGHT messages unanswered
        self.write_paused = False  # ACKs past the transport's high-water mark (pause_writing)
        self.held_since: float | None = None  # when reading was held, for either reason
        self.written = 0  # bytes of ACKs handed to the transport
        # while ACKs wait in our buffer: the most bytes the peer had taken so far (written - unsent), and when
        self.send_progress: tuple[int, float] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.starting.discard(self)
        # a stream socket's (plain or TLS): uvloop's TCPTransport has Transport's methods without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peername[0]}:{peername[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # an ACK must not wait ~40 ms for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.listener.allow.allows(str(peername[0])):
            self.listener.refused_log.warning("MLLP connection from %s refused: not in the allowed sources", self.peer)
            self.closing = True
            transport.abort()
            return
        self.listener.connections.add(self)
        log.info("MLLP connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        now = time.monotonic()
        try:
            messages, dropped, truncated = self.decoder.feed(data)
        except FrameTooLarge as exc:
            log.warning("MLLP connection from %s closed: %s", self.peer, exc)
            self.close(abort=True)
            return
        if messages:
            self.last_active = now
        if not self.decoder.in_frame:
            self.frame_started = None
        elif self.frame_started is None or messages:
            self.frame_started = now
        if dropped:
            log.warning("MLLP from %s: %d bytes outside a frame ignored", self.peer, dropped)
        if truncated:
            log.warning("MLLP from %s: %d unterminated frame(s) dropped (a new frame started)", self.peer, truncated)
        listener = self.listener
        loop = listener.loop
        for raw in messages:
            self.in_flight += 1
            if len(raw) <= INLINE_PREPARE_BYTES and not self.preparing:
                # always the writer thread, never a commit here: a commit waiting for the database write
                # lock (busy timeout 30 s) would stall every connection, HTTP and DICOM sharing this loop
                listener.committer.submit_nowait(listener.prepare(raw, self.peer), loop, self._answered)
                continue
            future = loop.run_in_executor(listener.workers, listener.prepare, raw, self.peer)
            self.preparing.append(future)
            future.add_done_callback(self._prepared)
        if self.in_flight >= MAX_IN_FLIGHT and not self.in_flight_held:
            self.in_flight_held = True
            self._hold_or_read()

    def _prepared(self, _future: asyncio.Future) -> None:
        """Hand the messages read so far to the writer, in the order they arrived."""
        queue = self.preparing
        while queue and queue[0].done():
            self.listener.committer.submit_nowait(queue.popleft().result(), self.listener.loop, self._answered)

    def _answered(self, result: Result) -> None:
        self.in_flight -= 1
        self.last_active = time.monotonic()
        if result.ack is not None and self.transport is not None and not self.transport.is_closing():
            ack = frame(result.ack)
            self.written += len(ack)
            self.transport.write(ack)  # may call pause_writing
        if self.in_flight_held and self.in_flight < MAX_IN_FLIGHT // 2:
            self.in_flight_held = False
            self._hold_or_read()
        if self.closing and self.in_flight == 0:
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._hold_or_read()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._hold_or_read()

    def _hold_or_read(self) -> None:
        """Hold reading while either reason holds, read again once neither does."""
        held = self.in_flight_held or self.write_paused
        transport = self.transport
        if held == (self.held_since is not None) or transport is None or self.closing:
            return  # closing: nothing more is read (and after EOF, resume_reading would read the EOF again)
        now = time.monotonic()
        if held:
            self.held_since = now
            transport.pause_reading()
            return
        if self.frame_started is not None and self.held_since is not None:
            self.frame_started += now - self.held_since  # we held the sender back: not its frame's time
        self.held_since = None
        transport.resume_reading()

    def frame_age(self, now: float) -> float | None:
        """How long the frame now arriving has taken, less the time we have held the sender back; None outside one."""
        if self.frame_started is None:
            return None
        return (now if self.held_since is None else self.held_since) - self.frame_started

    def send_stalled(self, now: float, timeout: float) -> bool:
        """For `timeout` seconds ACKs have waited in our buffer and the peer has taken none of what we wrote (looked
        at each sweep)."""
        if self.transport is None or not self.transport.get_write_buffer_size():
            self.send_progress = None
            return False
        taken = self.written - unsent(self.transport)
        if self.send_progress is None or taken > self.send_progress[0]:
            self.send_progress = (taken, now)
            return False
        return now - self.send_progress[1] > timeout

    def eof_received(self) -> bool | None:
        if self.decoder.pending:
            log.warning("MLLP connection from %s closed inside a frame: %d bytes dropped", self.peer, self.decoder.pending)
        self.closing = True
        if self.in_flight == 0:
            return None  # close now
        return True  # keep the transport open to send the ACKs still owed, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        if exc is not None:
            log.info("MLLP connection from %s ended: %s", self.peer, type(exc).__name__)
        self.transport = None

    def close(self, abort: bool = False) -> None:
        self.closing = True
        if self.transport is None:
            return
        if abort:
            self.transport.abort()  # also after close(), which waits for the write buffer to drain
        elif not self.transport.is_closing():
            self.transport.close()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for host:port (every address of a name, as asyncio binds them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if port == 0:
        infos = infos[:1]  # several addresses would each get a different free port
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class MllpListener:
    name = "mllp"

    def __init__(self, db: Database, settings: Hl7Settings, host: str, port: int) -> None:
        self.settings = settings
        self.host, self._port = host, port
        self.processor = build_processor(settings)
        self.committer = GroupCommitter(db, self.processor, settings.batch_max)
        self.allow = AllowList(settings.allowed_sources)
        self.connections: set[MllpConnection] = set()
        # accepted, TLS handshake or protocol set-up not yet done (each counted in one set only, so the cap is exact)
        self.starting: set[MllpConnection] = set()
        self.max_connections = settings.max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hl7-read")
        self._socks: list[socket.socket] = []
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # events a hostile or broken sender can repeat at will: logged, but not once per event
        self.refused_log = RateLimited(log)
        self._accept_log = RateLimited(log)
        self._timeout_log = RateLimited(log)
        self._evict_log = RateLimited(log)
        self._stall_log = RateLimited(log)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the listener was started on."""
        if self._loop is None:
            raise RuntimeError("the MLLP listener has not been started")
        return self._loop

    @property
    def port(self) -> int:
        return self._socks[0].getsockname()[1] if self._socks else self._port

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Objects alive at start-up (modules, mappers, settings) never die: keep them out of the cyclic
        # collector's scans, which otherwise cost ~15% of the ADT hot path.
        gc.freeze()
        self._ssl = tls_context(self.settings)
        self.max_connections = fit_connection_limit(self.settings.max_connections, "hl7.max_connections", log)
        self._socks = listening_sockets(self.host, self._port)
        self.committer.start()
        for sock in self._socks:
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        self._schedule_sweep()
        log.info("MLLP listening on %s:%s%s (at most %d connections)", self.host, self.port,
                 " (TLS)" if self.settings.tls_cert else "", self.max_connections)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(64):  # then let the other doors have the loop
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # out of file descriptors or memory: pause accepting for a second rather than spin on it
                self._accept_log.warning("MLLP cannot accept connections (%s); pausing 1 s", exc.strerror or exc)
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(1.0, self._resume_accept, sock)
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.debug("accept failure", exc_info=True)
                return
            if len(self.connections) + len(self.starting) >= self.max_connections and not self._make_room():
                self.refused_log.warning("MLLP connection limit reached (%d open, setting hl7.max_connections): "
                                         "a new connection was closed", self.max_connections)
                conn.close()
                continue
            conn.setblocking(False)
            protocol = MllpConnection(self)
            self.starting.add(protocol)
            self.loop.create_task(self._start_connection(conn, protocol))

    def _make_room(self) -> bool:
        """At the cap, close the connection stuck longest inside a frame (slower than SLOW_FRAME_SECONDS), so
        senders trickling bytes cannot keep a prompt PAS out until their frame deadline; False if none is."""
        now = time.monotonic()
        ages = {c: c.frame_age(now) or 0.0 for c in self.connections}
        stuck = [c for c, age in ages.items() if age > SLOW_FRAME_SECONDS]
        if not stuck:
            return False
        slowest = max(stuck, key=ages.__getitem__)
        self._evict_log.warning("MLLP connection limit reached: closed the connection from %s, inside one frame for "
                                  "%.0f s, to make room", slowest.peer, ages[slowest])
        self.connections.discard(slowest)
        slowest.close(abort=True)
        return True

    def _resume_accept(self, sock: socket.socket) -> None:
        if sock in self._socks and sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    async def _start_connection(self, conn: socket.socket, protocol: MllpConnection) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, conn, ssl=self._ssl,
                                                    ssl_handshake_timeout=self.settings.frame_timeout if self._ssl else None)
        except Exception as exc:  # a failed TLS handshake, a peer gone already
            log.info("MLLP connection could not start: %s", type(exc).__name__)
            conn.close()
        finally:
            self.starting.discard(protocol)

    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.settings.idle_timeout / 4, self.settings.frame_timeout / 4)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        s = self.settings
        for conn in list(self.connections):
            if (conn.frame_age(now) or 0.0) > s.frame_timeout:
                self._timeout_log.warning("MLLP connection from %s closed: no whole frame within %.0f s "
                                          "(setting hl7.frame_timeout)", conn.peer, s.frame_timeout)
                conn.close(abort=True)
            elif conn.send_stalled(now, s.idle_timeout):
                # also a connection already closing: uvloop's close() waits for the buffer to drain, for ever here
                self._stall_log.warning("MLLP connection from %s closed: none of its ACKs taken in %.0f s "
                                        "(setting hl7.idle_timeout)", conn.peer, s.idle_timeout)
                conn.close(abort=True)
            elif conn.in_flight == 0 and conn.send_progress is None and now - conn.last_active > s.idle_timeout:
                # (ACKs still waiting unsent are send_stalled's to time out: a close() would wait on them)
                log.info("MLLP connection from %s closed after %.0f s idle", conn.peer, s.idle_timeout)
                conn.close()
        self._schedule_sweep()

    async def stop(self) -> None:
        """Stop accepting, answer every message already received, close the connections, stop the writer."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sock in self._socks:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
        deadline = time.monotonic() + 30
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close(abort=conn.write_paused)  # its peer is not reading: close() would wait on it for ever
        # a peer that reads takes the last ACKs (< 64 KiB, the high-water mark) at once; one that does not is aborted
        deadline = time.monotonic() + 1.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close(abort=True)
        await self.loop.run_in_executor(None, self.committer.stop)
        self.workers.shutdown(wait=False)
        log.info("MLLP listener stopped: %d message(s) in %d group commit(s)", self.committer.messages, self.committer.batches)

    def prepare(self, raw: bytes, peer: str) -> Prepared:
        try:
            return self.processor.prepare(raw, peer)
        except Exception as exc:  # a bug must cost one message an AR, never the listener
            log.error("HL7 message from %s could not be read: %s", peer, type(exc).__name__)
            log.debug("prepare failure", exc_info=True)
            p = Prepared(raw=raw, peer=peer)
            p.reject = AckError("207", "application internal error while reading the message")
            return p
