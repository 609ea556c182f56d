"""The routing sender: a thread that takes due outbox items (gateway/core/routing.py) and sends each photo by
C-STORE to its destination, as the destination's identity may see it (the policy decides when sending: a photo no
consent covers yet is tried again later), one association per destination per round. For a destination routed
with storage commitment, the photos that association delivered are then named in one N-ACTION (Storage
Commitment push model); the destination's N-EVENT-REPORT comes back to the listener (commitment.py)."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

from pynetdicom import AE, evt
from pynetdicom.association import Association

from gateway.core import access, routing
from gateway.core.context import Gateway
from gateway.core.identity import Subject, dicom_peers, peer_subject
from gateway.core.ingest.received import SOP_CLASSES, TRANSFER_SYNTAXES
from gateway.core.objects.uids import new_uid
from gateway.core.refusals import Refused
from gateway.dicom import sockets, tls
from gateway.dicom.commitment import COMMITMENT_SYNTAXES, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, commitment_request, on_event_report
from gateway.dicom.transfer import dataset_for
from store import audit

log = logging.getLogger("clinphoto.dicom")

WARNINGS = (0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Sent:
    """What a destination took: the instance, and which stored object of the photo it was (a correction may replace
    it meanwhile: routing.delivered)."""

    sop_class_uid: str
    sop_instance_uid: str
    object_sha256: str


class Router:
    def __init__(self, gw: Gateway, poll_seconds: float = 1.0, network_timeout: float = 60.0) -> None:
        self.gw = gw
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ae = AE(ae_title=gw.settings.ae_title)
        # a destination that stops reading (or answering) is given up after the door's idle timeout, as the
        # listener's peers are (gateway/dicom/sockets.py), and the item retried later
        self.ae.network_timeout = network_timeout
        # and one whose TLS handshake never ends, too: pynetdicom makes it inside connect(), bounded by this alone
        # (None by default), and the router's thread waited for it as long as the destination kept the connection
        self.ae.connection_timeout = network_timeout
        for sop_class in SOP_CLASSES:
            for syntax in TRANSFER_SYNTAXES:  # one context per syntax: the destination accepts the stored one alone
                self.ae.add_requested_context(sop_class, syntax)
        self.ae.add_requested_context(STORAGE_COMMITMENT, COMMITMENT_SYNTAXES)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-router", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.round()
            except Exception as exc:  # the database or a destination misbehaving: try again next round
                log.error("routing round failed: %s", type(exc).__name__)
                log.debug("routing round failure", exc_info=True)
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)

    def round(self) -> bool:
        """One round: claim due items, send them; whether any were claimed."""
        settings = self.gw.settings.routing
        claimed = routing.claim(self.gw, settings)
        by_destination: dict[str, list[routing.Claimed]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        for destination, items in by_destination.items():
            self._send(destination, items)
        return bool(claimed)

    def _send(self, destination: str, items: list[routing.Claimed]) -> None:
        settings = self.gw.settings.routing
        peer = next((p for p in dicom_peers(self.gw.settings) if p.ae_title == destination and p.port), None)
        if peer is None or peer.port is None:
            for item in items:
                routing.failed(self.gw, settings, item.id, f"{destination} is not a configured DICOM peer with a port")
            return
        subject = peer_subject(peer, peer.hosts[0])
        try:
            tls_args = tls.client_tls_args(cast(tls.TlsSettings, self.gw.settings), peer, peer.hosts[0])
        except tls.TlsSetupError as exc:  # a file changed since start-up, when each was loaded (listener.py)
            for item in items:
                routing.failed(self.gw, settings, item.id, f"cannot reach {destination} over TLS: {exc}")
            return
        # a destination may report its commitment on this association while it is still open
        assoc = self.ae.associate(peer.hosts[0], peer.port, ae_title=destination, tls_args=tls_args,
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: on_event_report(self.gw, event)),
                                                # Nagle off; a PACS reading nothing times out
                                                sockets.CONNECTION_OPEN, sockets.CONNECTION_CLOSE])
        assoc = sockets.fails_fast_once_closed(assoc)  # then the items left fail at once, to be retried later
        if not assoc.is_established:
            for item in items:
                routing.failed(self.gw, settings, item.id, f"no association with {destination} at {peer.hosts[0]}:{peer.port}"
                               + (" over TLS (the log says why)" if tls_args else ""))
            return
        try:
            sent = [(item, took) for item in items if (took := self._send_one(assoc, subject, destination, item))]
            self._deliver(assoc, destination, sent)
        finally:
            assoc.release()

    def _deliver(self, assoc: Association, destination: str, sent: list[tuple[routing.Claimed, Sent]]) -> None:
        """Record what the destination accepted; for a committing destination, ask it (one N-ACTION) to commit."""
        settings = self.gw.settings.routing
        ids = [item.id for item, _ in sent]
        objects = {item.id: took.object_sha256 for item, took in sent}
        if not settings.commits(destination) or not sent:
            routing.delivered(self.gw, settings, objects)
            return
        transaction = new_uid(self.gw.settings.uid_root)
        routing.delivered(self.gw, settings, objects, commitment_uid=transaction)  # before asking: a quick report finds them
        try:
            status, _ = assoc.send_n_action(commitment_request(transaction, [(t.sop_class_uid, t.sop_instance_uid) for _, t in sent]),
                                            1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
            code = int(getattr(status, "Status", -1)) if status else -1
        except Exception as exc:  # the destination did not accept Storage Commitment on this association
            code, why = -1, f"{type(exc).__name__}: {exc}"
        else:
            why = f"status 0x{code & 0xFFFF:04X}" if code >= 0 else "no answer"
        if code != 0x0000:
            # delivered but not committed: left to the commitment timeout, which sends them again
            log.warning("Storage Commitment request to %s refused (%s)", destination, why)
            routing.commitment_unasked(self.gw, ids, f"{destination} refused the Storage Commitment request ({why})")

    def _send_one(self, assoc: Association, subject: Subject, destination: str, item: routing.Claimed) -> Sent | None:
        """C-STORE one item; what was sent when the destination took it, else None (the failure recorded)."""
        settings = self.gw.settings.routing
        try:
            ctx = access.photo_request(self.gw, subject, "read", f"routing to {destination}")
            obj = access.dicom_object(self.gw, ctx, item.asset_id, type_code=audit.INSTANCES_TRANSFERRED)
            ds = dataset_for(assoc, obj.served)
        except Refused as exc:
            routing.failed(self.gw, settings, item.id, f"not for {destination} under the policy now ({exc})")
            return None
        except access.StoreFault as exc:
            routing.failed(self.gw, settings, item.id, str(exc))
            return None
        if ds is None:
            routing.failed(self.gw, settings, item.id, f"{destination} accepts neither the stored transfer syntax "
                           f"({obj.served.transfer_syntax}) nor an uncompressed one for this SOP class")
            return None
        try:
            status = assoc.send_c_store(ds)
        except Exception as exc:  # no accepted context for the stored transfer syntax, or the association broke
            routing.failed(self.gw, settings, item.id, f"C-STORE to {destination} failed: {type(exc).__name__}: {exc}")
            return None
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == 0x0000 or code in WARNINGS:
            return Sent(obj.served.sop_class_uid, obj.served.sop_instance_uid, obj.asset.dicom_sha256 or "")
        routing.failed(self.gw, settings, item.id, f"{destination} answered C-STORE with status 0x{code & 0xFFFF:04X}"
                       if code >= 0 else f"no answer from {destination}")
        return None
