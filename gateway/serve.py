"""One process, every door: HTTP (uvicorn), MLLP and DICOM in one asyncio loop.

SIGTERM/SIGINT stop the doors from accepting, let in-flight work finish, then close
the database. Nothing is half-written: every write is one transaction and every
blob is renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
from collections.abc import Callable
from functools import partial
from typing import Protocol

import uvicorn

from gateway.app import create_app
from gateway.core.context import Gateway
from gateway.core.descriptors import fit_connection_limit
from gateway.core.ingest.deferred import Renderer
from gateway.dicom.listener import DicomListener
from gateway.hl7.listener import MllpListener
from gateway.http.acceptor import Acceptor
from gateway.http.bounded_head import BoundedHeadProtocol
from gateway.http.tls import server_context
from gateway.settings import Settings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A door could not open (port taken, bad mapping file, bad TLS files...); one line says which and why."""


class Listener(Protocol):
    name: str

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class HttpListener:
    name = "http"

    def __init__(self, gw: Gateway, s: Settings) -> None:
        config = uvicorn.Config(
            create_app(gw), host=s.http_host, port=s.http_port, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=30,
            # httptools (HTTP parsed in C) with the request head bounded as h11 bounds it: see bounded_head.py
            http=BoundedHeadProtocol,
            ws="none",  # no door speaks WebSocket: an upgrade would hand the connection to a protocol without our timeouts
        )
        self._server = uvicorn.Server(config)
        self._read_timeout = s.http_read_timeout
        self._tls = server_context(s.http_tls_cert, s.http_tls_key, "http_tls_cert")  # unusable: no door starts
        self._max_connections = fit_connection_limit(s.http_max_connections, "http_max_connections", log)
        self._server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # serve() owns the signals
        self._task: asyncio.Task | None = None
        self._acceptor: Acceptor | None = None
        self._port: int | None = None

    async def start(self) -> None:
        # We bind the socket ourselves: a bind error is then an OSError we report in one
        # line, where uvicorn would call sys.exit() from inside the event loop.
        config = self._server.config
        sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
            sock.listen(config.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
        # uvicorn serves no socket of its own (its accept, on uvloop, fails silently: acceptor.py); it is given each
        # connection our acceptor takes, through the protocol factory its own server would have used
        self._task = asyncio.create_task(self._server.serve(sockets=[]))
        try:
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("HTTP server stopped during start-up")
                await asyncio.sleep(0.02)
        except BaseException:
            sock.close()  # no acceptor owns it yet
            raise
        server = self._server
        protocol = partial(BoundedHeadProtocol, config=config, server_state=server.server_state,
                           app_state=server.lifespan.state, read_timeout=self._read_timeout)
        # a TLS handshake is bounded as a request head is (http_read_timeout)
        self._acceptor = Acceptor(sock, lambda on_closed: protocol(on_closed=on_closed), self._max_connections, tls=self._tls,
                                  handshake_timeout=self._read_timeout)
        self._acceptor.start()
        self._port = sock.getsockname()[1]
        log.info("HTTP listening on %s://%s:%s (at most %d connections)", "https" if self._tls else "http", config.host, self.port,
                 self._max_connections)

    @property
    def port(self) -> int:
        """The bound port (differs from the setting when that is 0)."""
        if self._port is None:
            raise RuntimeError("the HTTP door has not been started")
        return self._port

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()
        self._server.should_exit = True
        if self._task:
            await self._task


def build_listeners(gw: Gateway, settings: Settings) -> list[Listener]:
    wanted = set(settings.listeners)
    listeners: list[Listener] = []
    # -- listeners: one block each (keep this marker) --
    if "mllp" in wanted:
        listeners.append(MllpListener(gw.db, settings.hl7, settings.hl7.host or settings.http_host, settings.mllp_port))
    if "dicom" in wanted:
        listeners.append(DicomListener(gw, settings.dicom_host or settings.http_host, settings.dicom_port))
    # HTTP opens last: health checks (and `make run`'s wait) poll it, so once it answers every other door listens;
    # opened first, /healthz answered while the PAS's MLLP connections were still refused
    if "http" in wanted:
        listeners.append(HttpListener(gw, settings))
    return listeners


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (as nginx and PostgreSQL do): every connection of every
    door holds a descriptor, and running out makes accept() fail for all doors at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def run(gw: Gateway, settings: Settings, on_ready: Callable[[dict[str, int]], None] | None = None) -> None:
    """serve() until stopped, on libuv's event loop (uvloop) where it is installed: the HTTP door's reads, writes and
    callbacks run on that loop, and 12-MP STOW-RS went from 62.8 to 68.6 files/s on it (A/B, 6 batches of 40 in
    turns). The DIMSE door runs on its own threads and does not change (C-STORE on 4 associations 75.6 on both)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(gw, settings, on_ready))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The kind of event loop the doors run on (the tests that run a door in-process make theirs with this too)."""
    try:
        import uvloop
    except ImportError:  # not built for this platform (Windows): asyncio's own loop serves, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(gw: Gateway, settings: Settings, on_ready: Callable[[dict[str, int]], None] | None = None) -> None:
    """Run every door until SIGTERM/SIGINT; `on_ready` gets each door's bound port once all listen."""
    raise_open_file_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Listener] = []
    # received DICOM objects are answered before their renditions are made: this thread makes them
    renderer = Renderer(gw)
    renderer.start()
    try:
        try:
            listeners = build_listeners(gw, settings)
        except Exception as exc:
            raise StartupError(" ".join(str(exc).split())) from exc
        for listener in listeners:
            try:
                await listener.start()
            except Exception as exc:
                raise StartupError(f"{listener.name}: {' '.join(str(exc).split())}") from exc
            started.append(listener)
        # what is alive once every door listens (modules, mappers, settings) lives as long as the process: kept
        # out of the cyclic collector's scans, whose full collections otherwise stall a query now and then (serve
        # on DICOM and HTTP only, 800 C-FIND and QIDO-RS queries: a full collection of 192k objects, 132 ms; frozen,
        # 10.7k objects are tracked and none ran). The MLLP listener freezes what it holds at its own start.
        gc.freeze()
        # the loop named: asyncio's own, where uvloop is not installed, serves STOW-RS ~9 % slower
        log.info("clinphoto ready: %s (event loop: %s)", ", ".join(door.name for door in started),
                 type(loop).__module__.split(".")[0])
        if on_ready is not None:
            on_ready({door.name: door.port for door in started})
        await stop.wait()
        log.info("shutting down: finishing in-flight work")
    finally:
        for listener in reversed(started):
            try:
                await listener.stop()
            except Exception:
                log.exception("error while stopping %s", listener.name)
        renderer.stop()
        gw.close()
        log.info("stopped")
