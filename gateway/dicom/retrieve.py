"""C-GET and C-MOVE SCP: the instances a query identifier names, among those the peer may see, sent by C-STORE sub-
operations (C-GET on the same association, C-MOVE to a configured peer's host and port).

Each object goes as the core serves it (gateway/core/access.py dicom_object: the stored object with today's
patient module, Pixel Data byte for byte) in its stored transfer syntax whenever the peer accepted that; a peer that
accepted only uncompressed syntaxes gets it decoded (transfer.py); one that accepted neither gets that sub-operation
counted as failed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from pydicom import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt

from gateway.core import access
from gateway.core.context import Gateway
from gateway.core.identity import Subject, dicom_peers, peer_allows, peer_subject
from gateway.core.objects import part10
from gateway.core.objects.transcode import EncodedDataSet, as_stored, encoded_as_stored
from gateway.core.refusals import Kind, Refused
from gateway.dicom import sockets, tls
from gateway.dicom.command import error_comment
from gateway.dicom.find import BadIdentifier, query_of
from gateway.dicom.pdata import FramingDIMSE
from gateway.dicom.pending import PENDING
from gateway.dicom.reactor import EventAssociation
from gateway.dicom.transfer import accepted_syntaxes, dataset_for
from store import audit
from store.models import Asset

log = logging.getLogger("clinphoto.dicom")

PATIENT_ROOT_GET, STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2"
# a retrieve model reads its identifier as the find model of the same root does
FIND_MODEL = {PATIENT_ROOT_GET: "1.2.840.10008.5.1.4.1.2.1.1", PATIENT_ROOT_MOVE: "1.2.840.10008.5.1.4.1.2.1.1",
              STUDY_ROOT_GET: "1.2.840.10008.5.1.4.1.2.2.1", STUDY_ROOT_MOVE: "1.2.840.10008.5.1.4.1.2.2.1"}
CANCELLED = 0xFE00
NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
WRITE_WAIT = 60.0  # seconds the next object's read waits for this one to be written, at most


# the Unique Key of each retrieve level (PS3.4 C.4.2.2.1, C.4.3.2.1): what a C-MOVE or C-GET names its instances by
UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def _check_unique_key(identifier: Dataset) -> None:
    """A retrieve names what it retrieves by its level's Unique Key: a single value, or a list of UIDs (PS3.4 C.4.2.2.1,
    C.4.3.2.1), never empty or a wildcard. Read as a query, an identifier without one matched everything the peer may
    see (a C-MOVE of QueryRetrieveLevel=STUDY alone sent every study)."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    key = UNIQUE_KEY.get(level)
    if key is None:
        return  # query_of refuses the level itself
    value = identifier.get(key)
    text = "" if value is None else "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    if not text.strip() or "*" in text or "?" in text:
        raise BadIdentifier(f"a {level} retrieve needs {key}: a value or UID list, no wildcard")


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = error_comment(comment)
    return ds


def _objects(gw: Gateway, subject: Subject, identifier: Dataset, model: str, what: str,
             prefetch: Callable[[list[access.DicomObject]], None] | None,
             destination: Subject | None = None) -> tuple[list[access.DicomObject], list[Dataset]]:
    """The objects of the visible instances the identifier names, at any level: the query (the policy inside it) and
    the transfer audited in one commit before any is sent (two commits, each an fsync on SQLite, before). Then, as
    the UIDs naming them, those whose stored object cannot be read: each a sub-operation that fails, where they were
    left out and the peer told Success with fewer objects than it asked for. `prefetch` as the core's.
    `destination`: a C-MOVE's destination peer, when the objects go to it: only what its own identity may see too."""
    _check_unique_key(identifier)
    query = query_of(identifier, FIND_MODEL[model])
    ctx = access.photo_request(gw, subject, "read", what)
    recipient = access.recipient_context(gw, destination) if destination is not None else None
    unreadable: list[Asset] = []
    objects = access.dicom_objects_matching(gw, ctx, query, query=f"{what} {query}", channel="dimse",
                                            type_code=audit.INSTANCES_TRANSFERRED, unreadable=unreadable, prefetch=prefetch,
                                            recipient=recipient)
    return objects, [_unsendable(a.sop_class_uid, a.sop_instance_uid) for a in unreadable]


def _unsendable(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An object that cannot be sent, as the UIDs naming it: with no file meta, pynetdicom's send_c_store() refuses
    it, and its C-GET/C-MOVE SCP counts the sub-operation failed and names the instance in the final response."""
    unsendable = Dataset()
    unsendable.SOPClassUID, unsendable.SOPInstanceUID = sop_class_uid, sop_instance_uid
    return unsendable


def _prepare(assoc: Any, obj: access.DicomObject) -> Dataset:
    """The object as the association sending it can take it (as stored, or decoded when it accepted only
    uncompressed pixels); one it cannot take goes as stored, for pynetdicom to count as a failed sub-operation
    naming its SOP Instance UID. One whose stored file can no longer be read (gone, or cut short, since the query
    read its header) goes as the UIDs naming it alone: that sub-operation fails the same way, where the exception
    ended the whole retrieve (0xC411) and the objects after it were never sent."""
    try:
        return _readable(assoc, obj)
    except (OSError, part10.Part10Error) as exc:
        log.warning("object %s not sent: its stored file cannot be read (%s)", obj.served.sop_instance_uid, exc)
        return _unsendable(obj.served.sop_class_uid, obj.served.sop_instance_uid)


def _readable(assoc: Any, obj: access.DicomObject) -> Dataset:
    if isinstance(assoc, EventAssociation) and obj.served.transfer_syntax in accepted_syntaxes(assoc, obj.served.sop_class_uid):
        encoded = encoded_as_stored(obj.served)  # sent as it lies (our own associations only: reactor.py)
        if encoded is not None:
            return encoded
    ds = dataset_for(assoc, obj.served)
    return ds if ds is not None else as_stored(obj.served)


def _prepare_after(written: threading.Event, assoc: Any, obj: access.DicomObject) -> Dataset:
    written.wait(WRITE_WAIT)
    return _prepare(assoc, obj)


def _send(objects: list[access.DicomObject], unreadable: list[Dataset], cancelled: Any, association: Callable[[], Any],
          reader: ThreadPoolExecutor, first: Future[Dataset] | None) -> Iterator[tuple[int | Dataset, Any]]:
    """Each object as _prepare() makes it, read on the reader's thread (the first one perhaps already, `first`), then
    the unreadable ones (each a failed sub-operation)."""
    yield from _send_objects(objects, cancelled, association, reader, first)
    for unsendable in unreadable:
        if cancelled():
            yield CANCELLED, None
            return
        yield PENDING, unsendable


def _send_objects(objects: list[access.DicomObject], cancelled: Any, association: Callable[[], Any],
                  reader: ThreadPoolExecutor, first: Future[Dataset] | None) -> Iterator[tuple[int | Dataset, Any]]:
    """The objects, read on the reader's thread. The next object is read (~0.5 ms for the bench's 2.8 MB photo, much
    of it holding the GIL) while the peer takes in this one (~8 ms a photo), not between the two: once this one is
    written to the socket (on our own associations), or once it is handed over. Read as soon as this one was handed
    over, it held up the writing of this one: 0.6-0.8 ms a photo traced."""
    if not objects:
        return
    assoc = association()  # C-MOVE: the association to the destination, open by the time the first object is asked for
    ahead = first if first is not None else reader.submit(_prepare, assoc, objects[0])
    for following in [*objects[1:], None]:
        if cancelled():
            yield CANCELLED, None
            return
        ds = ahead.result()
        written = threading.Event()
        if following is not None:
            ahead = reader.submit(_prepare_after, written, assoc, following)
        if isinstance(ds, EncodedDataSet):
            ds.after_send = written.set  # the DUL writes it (reactor.py)
        else:
            written.set()  # pynetdicom writes it its own way, piece by piece: read the next one now
        try:
            yield PENDING, ds
        finally:
            written.set()  # written, failed, or the retrieve ended: the reader never waits on it


def _refuse(event: Any, status: int, comment: str) -> Iterator[Any]:
    """A refusal after the count: one sub-operation announced (pynetdicom answers a count of none with Success),
    answered by the failure status and its comment; the response then counts none failed and carries no
    identifier (FramingDIMSE.refusing)."""
    yield 1
    if isinstance(event.assoc.dimse, FramingDIMSE):
        event.assoc.dimse.refusing = True
    yield _failure(status, comment), None


def _retrieve(gw: Gateway, subject: Subject, event: Any, what: str, association: Callable[[], Any],
              read_early: bool, destination: Subject | None = None) -> Iterator[Any]:
    """The count, then each object. `read_early`: the association the objects go on is open already (C-GET: the
    requestor's own), so the first object is read while the transfer's audit commits (an fsync), not after: the
    first photo of a C-GET left ~1 ms sooner traced (the read and its hand-over to the reader's thread)."""
    with ThreadPoolExecutor(1, thread_name_prefix="dicom-retrieve") as reader:
        first: list[Future[Dataset]] = []

        def prefetch(objects: list[access.DicomObject]) -> None:
            if read_early and objects:
                first.append(reader.submit(_prepare, association(), objects[0]))

        try:
            objects, unreadable = _objects(gw, subject, event.identifier, str(event.request.AffectedSOPClassUID), what, prefetch,
                                           destination)
        except BadIdentifier as exc:
            access.refuse(gw, subject, what, Refused(Kind.BAD_REQUEST, str(exc)))
            yield from _refuse(event, IDENTIFIER_DOES_NOT_MATCH, str(exc))
            return
        except Refused as exc:
            yield from _refuse(event, NOT_AUTHORIZED, str(exc))
            return
        yield len(objects) + len(unreadable)
        yield from _send(objects, unreadable, lambda: event.is_cancelled, association, reader, first[0] if first else None)


def _refused_service(gw: Gateway, subject: Subject | None, service: str, to: str = "") -> None:
    """A peer asking for a retrieve its settings do not allow: the refusal on the trail, naming the peer."""
    if subject is not None and subject.peer is not None:
        access.refuse(gw, subject, f"C-{service.upper()} {subject.peer.ae_title}{to}",
                      Refused(Kind.FORBIDDEN, f"this AE may not retrieve here ({service} is not among its services)"))


def on_get(gw: Gateway, event: Any) -> Iterator[Any]:
    """pynetdicom's EVT_C_GET handler: the count of sub-operations, then each object."""
    subject: Subject | None = getattr(event.assoc, "clinphoto_subject", None)
    if subject is None or subject.peer is None or not peer_allows(subject, "get"):
        _refused_service(gw, subject, "get")
        yield from _refuse(event, NOT_AUTHORIZED, "this AE may not retrieve here")
        return
    yield from _retrieve(gw, subject, event, f"C-GET {subject.peer.ae_title}", lambda: event.assoc, read_early=True)


def on_move(gw: Gateway, event: Any) -> Iterator[Any]:
    """pynetdicom's EVT_C_MOVE handler: the destination (a configured peer with a port), the count, each object."""
    subject: Subject | None = getattr(event.assoc, "clinphoto_subject", None)
    destination = str(event.move_destination).strip()
    peer = next((p for p in dicom_peers(gw.settings) if p.ae_title == destination and p.port), None)
    if peer is None:
        yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown: only configured peers with a port
        return
    try:
        tls_args = tls.client_tls_args(cast(tls.TlsSettings, gw.settings), peer, peer.hosts[0])
    except tls.TlsSetupError as exc:  # a file changed since start-up, when each was loaded (listener.py)
        log.error("C-MOVE to %s: %s", destination, exc)
        yield None, None  # pynetdicom answers 0xA801: the destination cannot be reached
        return
    # pynetdicom opens the association to the destination itself: its handler hands it to us, for what it accepted
    opened: list[Any] = []
    # (Nagle off on it; a destination that stops reading times out, and its C-STOREs fail at once: sockets.py)
    yield peer.hosts[0], peer.port, {"evt_handlers": [(evt.EVT_ESTABLISHED, lambda e: opened.append(sockets.fails_fast_once_closed(e.assoc))),
                                                      sockets.CONNECTION_OPEN, sockets.CONNECTION_CLOSE],
                                     "tls_args": tls_args}
    if subject is None or subject.peer is None or not peer_allows(subject, "move"):
        _refused_service(gw, subject, "move", f" to {destination}")
        yield from _refuse(event, NOT_AUTHORIZED, "this AE may not retrieve here")
        return
    # the association to the destination opens after the count: the first object is read once it is open. The objects
    # go to the destination, so its own identity bounds them too (as routing sends it only what it may see)
    yield from _retrieve(gw, subject, event, f"C-MOVE {subject.peer.ae_title} to {destination}", lambda: opened[0],
                         read_early=False, destination=peer_subject(peer, peer.hosts[0]))
