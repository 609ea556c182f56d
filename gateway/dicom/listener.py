"""The DICOM door: association control by configured peers, C-ECHO, C-STORE (storage.py), C-FIND (find.py),
C-GET and C-MOVE (retrieve.py), Storage Commitment reports for routing (commitment.py).

Each association is checked against `auth.dicom_peers` (calling AE title and
source address) before anything is negotiated; an unknown AE title or a known
one from the wrong host gets A-ASSOCIATE-RJ, and the refusal is audited. The
query/retrieve/store services bind further handlers here, each a translation
onto the core services under the subject the peer acts as.
"""

from __future__ import annotations

import asyncio
import logging
import socketserver
import ssl
import threading
import time
from typing import Any, Protocol, cast

from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from gateway.core.context import Gateway
from gateway.core.identity import (
    DicomPeerRejected,
    PeerRefusal,
    authenticate_dicom_peer,
    dicom_peers,
    peer_allows,
    unserved_permissions,
)
from gateway.dicom import commitment, find, retrieve, sockets, storage, tls
from gateway.dicom.pdu_in import MAX_PDU_LENGTH
from gateway.dicom.reactor import EventAssociation, EventRequestHandler
from gateway.dicom.router import Router
from store import audit

log = logging.getLogger("clinphoto.dicom")

# pynetdicom logs at WARNING and above only (gateway/core/log_setup.py), yet by default it decodes each C-FIND/C-GET/C-MOVE
# identifier again to log it at INFO (a PatientID is an NHS number) and builds debug lines for every message and
# PDU: ~3% of a C-FIND's CPU (py-spy), for nothing. Off for every association of this process.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (C-ECHO)
REJECTED_PERMANENT, SOURCE_SERVICE_USER = 0x01, 0x01
MOVE_MODELS = (retrieve.PATIENT_ROOT_MOVE, retrieve.STUDY_ROOT_MOVE)
STOP_GRACE = 10.0  # seconds a request being served may take to finish when the gateway stops
# A-ASSOCIATE-RJ reasons for a service-user rejection (PS3.8 7.1.1.9)
REJECT_REASON = {
    PeerRefusal.CALLED_AE_NOT_OURS: 0x07,  # called AE title not recognised
    PeerRefusal.UNKNOWN_CALLING_AE: 0x03,  # calling AE title not recognised
    PeerRefusal.WRONG_HOST: 0x03,  # a known AE from the wrong host: told apart only in our audit record
}


class DicomDoorSettings(Protocol):
    """What this door reads beyond the core's settings (gateway.settings.Settings has them)."""

    ae_title: str
    dicom_pending_interval: float
    dicom_idle_timeout: float
    dicom_max_associations: int


class DicomListener:
    name = "dicom"

    def __init__(self, gw: Gateway, host: str, port: int) -> None:
        self.gw = gw
        self.host, self._port = host, port
        settings = cast(DicomDoorSettings, gw.settings)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.pending_interval = settings.dicom_pending_interval  # type: ignore[attr-defined]  # reactor.py reads it
        self.ae.data_set_spool = gw.spool  # type: ignore[attr-defined]  # C-STORE data sets written as they come (spooled.py)
        self.ae.data_set_limit = gw.settings.ingest.max_bytes  # type: ignore[attr-defined]  # and kept up to this size
        self.ae.network_timeout = settings.dicom_idle_timeout  # the idle timer (reactor.py restarts it after a request)
        # a C-MOVE destination's connection and TLS handshake (pynetdicom makes it inside connect(), bounded by this
        # alone, None by default): one that never answered its ClientHello held the C-MOVE, and its association, for good
        self.ae.connection_timeout = settings.dicom_idle_timeout
        self.ae.maximum_associations = settings.dicom_max_associations
        self.ae.add_supported_context(VERIFICATION, list(find.QUERY_SYNTAXES))
        for sop_class, syntaxes in storage.contexts():
            # scp_role: a C-GET requestor stores what we send it on this association (SCP/SCU role selection)
            self.ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        for model in (find.MODALITY_WORKLIST_FIND, find.PATIENT_ROOT_FIND, find.STUDY_ROOT_FIND, retrieve.PATIENT_ROOT_GET, retrieve.STUDY_ROOT_GET,
                      retrieve.PATIENT_ROOT_MOVE, retrieve.STUDY_ROOT_MOVE):
            self.ae.add_supported_context(model, list(find.QUERY_SYNTAXES))
        # a routing destination's Storage Commitment report, on an association it opens to us (it acts as SCP)
        self.ae.add_supported_context(commitment.STORAGE_COMMITMENT, commitment.COMMITMENT_SYNTAXES, scu_role=True, scp_role=True)
        for sop_class, syntaxes in storage.contexts():
            for syntax in syntaxes:  # C-MOVE's association to the destination: one context per transfer syntax, so
                self.ae.add_requested_context(sop_class, syntax)  # it can accept the stored one alone
        self.ae.maximum_pdu_size = MAX_PDU_LENGTH  # a longer P-DATA-TF ends the association (reactor.py)
        self._server: ThreadedAssociationServer | None = None
        # each file TLS needs is loaded now (the listener's, and each peer's reached over TLS): one that cannot be
        # is a start-up error naming it, before any door opens
        tls_settings = cast(tls.TlsSettings, gw.settings)
        self._tls: ssl.SSLContext | None = tls.server_context(tls_settings)
        for peer in dicom_peers(gw.settings):
            tls.client_tls_args(tls_settings, peer, peer.hosts[0])
        # the routing sender runs beside the listener when routes are configured
        self.router: Router | None = (Router(gw, network_timeout=settings.dicom_idle_timeout) if gw.settings.routing.routes
                                      else None)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self._port

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        address = assoc.requestor.address
        try:
            subject = authenticate_dicom_peer(self.gw.settings, request.calling_ae_title, address, request.called_ae_title)
        except DicomPeerRejected as refused:
            log.warning("DICOM association from %s refused: %s", address, refused)
            self._audit_refusal(request.calling_ae_title, address, str(refused))
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REJECT_REASON[refused.kind])
            # as pynetdicom's own rejections do: kill() lets the DUL send the A-ASSOCIATE-RJ before the socket closes
            assoc.kill()
            return
        assoc.clinphoto_subject = subject  # handlers of later services act as this subject
        if not peer_allows(subject, "move"):
            # pynetdicom opens the association to a C-MOVE's destination before its handler may refuse the request:
            # a peer not allowed move is not offered the service (its contexts rejected, abstract syntax not
            # supported), so it cannot make the gateway connect to another peer
            assoc.acceptor.supported_contexts = [c for c in assoc.acceptor.supported_contexts if c.abstract_syntax not in MOVE_MODELS]

    def _audit_refusal(self, calling_ae: str, address: str, reason: str) -> None:
        entry = audit.AuditEntry(
            type_code=audit.SECURITY_ALERT, subtype="association-rejected", action="E", outcome=audit.SERIOUS_FAILURE,
            outcome_desc=reason[:500], agent_who=(calling_ae or "").strip()[:200] or None, agent_role="dicom-peer",
            agent_network=address, entities=[{"type": "dicom-association", "called_ae": self.gw.settings.ae_title}],
        )
        with self.gw.db.write() as session:
            audit.append(session, entry)

    def _on_echo(self, event) -> int:
        subject = getattr(event.assoc, "clinphoto_subject", None)
        if subject is None or not peer_allows(subject, "echo"):
            return 0x0124  # Refused: Not Authorized
        return 0x0000

    def _start_server(self, handlers: list[Any]) -> tls.TlsAssociationServer:
        """AE.start_server(block=False), with associations whose threads wait for work rather than poll (reactor.py)."""
        server = cast(tls.TlsAssociationServer, self.ae.make_server(
            (self.host, self._port), evt_handlers=handlers, server_class=tls.TlsAssociationServer, request_handler=EventRequestHandler,
            ssl_context=self._tls))
        server.handshakes = tls.Handshakes(self.ae.maximum_associations)
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: AE.shutdown() stops it too
        return server

    async def start(self) -> None:
        handlers: list[Any] = [
            sockets.CONNECTION_OPEN,  # Nagle off, kernel timeouts on reads and writes
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, lambda event: storage.on_store(self.gw, event)),
            (evt.EVT_C_FIND, lambda event: find.on_find(self.gw, event)),
            (evt.EVT_C_GET, lambda event: retrieve.on_get(self.gw, event)),
            (evt.EVT_C_MOVE, lambda event: retrieve.on_move(self.gw, event)),
            (evt.EVT_N_EVENT_REPORT, lambda event: commitment.on_event_report(self.gw, event)),
        ]
        self._server = await asyncio.to_thread(self._start_server, handlers)
        log.info("DICOM listening on %s:%s as %s%s", self.host, self.port, self.gw.settings.ae_title, " (TLS)" if self._tls else "")
        if self.router is not None:
            self.router.start()
        for line in unserved_permissions(self.gw.settings):
            log.warning("%s", line)

    async def stop(self) -> None:
        if self.router is not None:
            await asyncio.to_thread(self.router.stop)
        if self._server is not None:
            await asyncio.to_thread(self._close_associations, self._server)
            await asyncio.to_thread(self._server.shutdown)
            self._server = None

    def _close_associations(self, server: ThreadedAssociationServer) -> None:
        """Stop accepting; let each open association finish the request it is serving (up to STOP_GRACE seconds),
        then end it. Left alone, an idle association held the stopped process ~60 s (its network timeout) and a
        connection that never sent an A-ASSOCIATE-RQ ~30 s (the ACSE timeout): their threads are not daemons."""
        socketserver.BaseServer.shutdown(server)  # no new connection: serve_forever() returns (the socket closes after)
        handshakes = getattr(server, "handshakes", None)
        if handshakes is not None:  # connections still in their TLS handshake: closed now (tls.Handshakes)
            handshakes.stop()
        open_ones = [a for a in server.active_associations if isinstance(a, EventAssociation)]
        for assoc in open_ones:
            assoc.close_gracefully()
        deadline = time.monotonic() + STOP_GRACE
        for assoc in open_ones:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in open_ones:
            if assoc.is_alive():  # a long retrieve: cut short; the peer's sub-operation counts say what arrived
                log.warning("DICOM association from %s (%s) aborted: still busy %s s after the stop was asked",
                            assoc.requestor.address, assoc.requestor.ae_title, STOP_GRACE)
                assoc.abort()
                assoc.join(5)
