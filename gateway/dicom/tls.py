"""DICOM over TLS (PS3.15 B.9, the BCP 195 TLS Secure Transport Connection Profile): TLS 1.2 or later, on the
listener when it has a certificate, and to each peer configured with `tls` when we connect to it (C-MOVE and routing
destinations), with the peer's certificate checked against its host name.

The handshake of an accepted connection is made on that connection's own thread, not where pynetdicom makes it (on
the thread accepting every connection, with no timeout): a peer that connected and sent nothing held the door shut
to every other peer for as long as it kept the connection open."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, Protocol

from pynetdicom.transport import ThreadedAssociationServer

from gateway.core.policy.settings import DicomPeer
from gateway.dicom import sockets
from gateway.http.tls import TlsSetupError as TlsSetupError  # what router.py and retrieve.py catch
from gateway.http.tls import context, load, load_chain
from gateway.http.tls import server_context as server_tls

log = logging.getLogger("clinphoto.dicom")

HANDSHAKE_TIMEOUT = 30.0  # seconds a connecting peer may take over its TLS handshake (pynetdicom's ACSE timeout)


class TlsSettings(Protocol):
    dicom_tls_cert: Any
    dicom_tls_key: Any
    dicom_tls_client_ca: Any


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The listener's context, or None when it has no certificate (plain DICOM)."""
    ctx = server_tls(settings.dicom_tls_cert, settings.dicom_tls_key, "dicom_tls_cert")
    if ctx is not None and settings.dicom_tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        load("dicom_tls_client_ca", ctx.load_verify_locations, settings.dicom_tls_client_ca)
    return ctx


def client_tls_args(settings: TlsSettings, peer: DicomPeer, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for connecting to `peer` at `host`, or None when it is not reached over TLS: its
    certificate checked against `tls_ca` (else the system's trusted CAs) and `host`; ours presented when asked for."""
    if not peer.tls:
        return None
    ctx = context(ssl.Purpose.SERVER_AUTH)
    if peer.tls_ca:
        load(f"the tls_ca of DICOM peer {peer.ae_title}:", ctx.load_verify_locations, peer.tls_ca)
    if settings.dicom_tls_cert:
        load_chain(ctx, settings.dicom_tls_cert, settings.dicom_tls_key, "dicom_tls_cert")
    return ctx, host


class Handshakes:
    """The handshakes under way on a listener: at most `limit` at once (a connection is no association until its
    handshake is done, so pynetdicom's limit does not count it, and a peer opening connections it never shook hands
    on had a thread each), and all cut short when the listener stops: the stop otherwise waited for each, up to
    HANDSHAKE_TIMEOUT (29.7 s with three connections that never began theirs), its threads being joined."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._socks: set[Any] = set()
        self.stopped = False

    def enter(self, sock: Any) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            if not self.stopped:
                self._socks.add(sock)
                return True
        self._slots.release()
        return False

    def leave(self, sock: Any) -> None:
        with self._lock:
            self._socks.discard(sock)
        self._slots.release()

    def stop(self) -> None:
        """No handshake begins from now on, and those under way fail at once (their connections shut down)."""
        with self._lock:
            self.stopped = True
            under_way = list(self._socks)
        for sock in under_way:
            sockets.cut(sock)


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, wrapping each accepted connection without its handshake (made by handshake()
    on the connection's own thread). `handshakes`: set by the listener (its association limit)."""

    handshakes: Handshakes | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def handshake(sock: Any, address: Any, slots: Handshakes | None = None) -> bool:
    """The accepted connection's TLS handshake, if it is a TLS one, within HANDSHAKE_TIMEOUT and while one of
    `slots` is free: False (logged, the connection closed) when it fails, or the listener is stopping, so no
    association is made on it."""
    if not isinstance(sock, ssl.SSLSocket):
        return True
    host = address[0] if isinstance(address, tuple) else address
    if slots is not None and not slots.enter(sock):
        if slots.stopped:
            log.info("DICOM TLS connection from %s closed: the gateway is stopping", host)
        else:
            log.warning("DICOM TLS connection from %s closed: as many handshakes as associations allowed are under way", host)
        _close(sock)
        return False
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.do_handshake()
        sock.settimeout(None)  # until the association's own timeout bounds each read and write (sockets.guard)
    except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, or the peer gone
        if slots is not None and slots.stopped:
            log.info("DICOM TLS handshake with %s cut short: the gateway is stopping", host)
        else:
            # a certificate refused: why (expired, not for client use, unknown CA), where the reason alone said
            # CERTIFICATE_VERIFY_FAILED for each and left the operator to guess
            log.warning("DICOM TLS handshake with %s failed: %s", host, getattr(exc, "verify_message", None)
                        or getattr(exc, "reason", None) or type(exc).__name__)
        _close(sock)
        return False
    finally:
        if slots is not None:
            slots.leave(sock)
    if slots is not None and slots.stopped:  # done as the listener stopped: it would not see the association
        _close(sock)
        return False
    return True


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass
