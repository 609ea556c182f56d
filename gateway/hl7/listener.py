"""The MLLP listener started by `clinphoto serve`: sockets in, ACKs out, work handed to the group committer.

An asyncio Protocol rather than streams: at thousands of messages a second the
per-read Task and timeout that StreamReader + wait_for cost is measurable. Each
connection's messages go to the committer in arrival order and their ACKs come
back in that order; the idle timeout is one periodic sweep, not a timer per read.
Nothing touches the database on the loop's thread: the writer thread commits
every message, so a locked database delays ACKs, never the loop.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import socket
import ssl
import time

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
        self.last_active = time.monotonic()
        self.closing = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peername[0]}:{peername[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # an ACK must not wait ~40 ms for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.listener.allow.allows(str(peername[0])):
            log.warning("MLLP connection from %s refused: not in the allowed sources", self.peer)
            self.closing = True
            transport.abort()
            return
        self.listener.connections.add(self)
        log.info("MLLP connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = time.monotonic()
        try:
            messages, dropped, truncated = self.decoder.feed(data)
        except FrameTooLarge as exc:
            log.warning("MLLP connection from %s closed: %s", self.peer, exc)
            self.close(abort=True)
            return
        if dropped:
            log.warning("MLLP from %s: %d bytes outside a frame ignored", self.peer, dropped)
        if truncated:
            log.warning("MLLP from %s: %d unterminated frame(s) dropped (a new frame started)", self.peer, truncated)
        listener = self.listener
        loop = listener.loop
        prepared = [listener.prepare(raw, self.peer) for raw in messages]
        # always the writer thread, never a commit here: a commit waiting for the database write
        # lock (busy timeout 30 s) would stall every connection, HTTP and DICOM sharing this loop
        for p in prepared:
            self.in_flight += 1
            listener.committer.submit_nowait(p, loop, self._answered)
        if self.in_flight >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _answered(self, result: Result) -> None:
        self.in_flight -= 1
        self.last_active = time.monotonic()
        if result.ack is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(result.ack))
        if self.paused and self.in_flight < MAX_IN_FLIGHT // 2:
            self.paused = False
            self.transport.resume_reading()
        if self.closing and self.in_flight == 0:
            self.close()

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
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.abort if abort else self.transport.close)()


class MllpListener:
    name = "mllp"

    def __init__(self, db: Database, settings: Hl7Settings, host: str, port: int) -> None:
        self.settings = settings
        self.host, self._port = host, port
        self.processor = build_processor(settings)
        self.committer = GroupCommitter(db, self.processor, settings.batch_max)
        self.allow = AllowList(settings.allowed_sources)
        self.connections: set[MllpConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @classmethod
    def from_gateway(cls, gw) -> MllpListener:
        s = gw.settings
        return cls(gw.db, s.hl7, s.hl7.host or s.http_host, s.mllp_port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1] if self._server else self._port

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # Objects alive at start-up (modules, mappers, settings) never die: keep them out of the cyclic
        # collector's scans, which otherwise cost ~15% of the ADT hot path.
        gc.freeze()
        self.committer.start()
        self._server = await self.loop.create_server(lambda: MllpConnection(self), self.host, self._port,
                                                     ssl=tls_context(self.settings))
        self._schedule_sweep()
        log.info("MLLP listening on %s:%s%s", self.host, self.port, " (TLS)" if self.settings.tls_cert else "")

    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.settings.idle_timeout / 4)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.in_flight == 0 and now - conn.last_active > self.settings.idle_timeout:
                log.info("MLLP connection from %s closed after %.0f s idle", conn.peer, self.settings.idle_timeout)
                conn.close()
        self._schedule_sweep()

    async def stop(self) -> None:
        """Stop accepting, answer every message already received, close the connections, stop the writer."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + 30
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)  # let the transports flush and close
        await self.loop.run_in_executor(None, self.committer.stop)
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
