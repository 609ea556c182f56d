"""A DIMSE message framed as P-DATA-TF PDUs in one piece, sent in one write.

pynetdicom sends a message as one P-DATA primitive per fragment: each is queued to the DUL thread, made a
P_DATA_TF object, encoded (the fragment copied three or four times on the way) and sent with its own send() call. A
12-MP photo to a peer taking 16 kB PDUs (pynetdicom's and dcmtk's default) is ~190 fragments: ~3 ms of Python per
object in a C-GET, where the whole C-GET of a photo costs Orthanc ~10 ms here. A C-FIND match goes as two sends
(command, identifier) of two queued primitives.

Here the association's DIMSE provider frames the whole message at once (PS3.8 9.3.5: a P-DATA-TF PDU per fragment,
each holding one presentation data value item of at most the peer's maximum length, command fragments first) as a
list of headers and views of the encoded data set (no copy), and queues it as a single primitive; the DUL thread
recognises it and hands the list to the kernel with sendmsg() (TLS: joined, then sendall()). The state machine sees one
P-DATA request, as it would for a one-fragment message. A C-GET of ten 12-MP photos: the gateway's CPU 128-138 ms ->
105-108 ms with sendmsg() (108-122 joined first; noisy machine, alternate runs).

The command set is written straight from the primitive (command.py): the bench's 10-photo C-GET 41-42 -> 28-31 ms of
gateway CPU, a C-FIND at 10,000 studies 2.7-2.9 -> 2.1-2.2 ms (bench/query_cpu.py, /proc).
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from io import BytesIO
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider  # the base class's own message tables
from pynetdicom.dimse_messages import _DATASET_KEYWORDS, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from gateway.core.objects.transcode import EncodedDataSet
from gateway.dicom.command import command_set, response_of
from gateway.dicom.pdu_in import P_DATA_TF
from gateway.dicom.pending import PendingThrottle
from gateway.dicom.spooled import SpooledDataSet, Unkept, part10_head

if TYPE_CHECKING:
    from store.spool import Spool

log = logging.getLogger("clinphoto.dicom")

_HEADER = struct.Struct(">BBLLBB")  # PDU type, reserved, PDU length, PDV item length, context id, control header
# message control header (PS3.8 E.2): bit 0 command (1) or data set (0), bit 1 last fragment
COMMAND, COMMAND_LAST, DATA, DATA_LAST = 0x01, 0x03, 0x00, 0x02
LAST_FRAGMENT = DATA_LAST  # the bit alone, of a command's fragment or a data set's


class Framed(bytes):
    """The encoded PDUs of one message, carried through pynetdicom's queue and state machine as the value of the
    P-DATA primitive's only presentation data value (P_DATA_TF keeps the object as it is). `pieces` makes them, in
    order, as they are sent: a peer taking tiny PDUs (8 bytes: 2 data bytes a fragment) would otherwise have every
    fragment's header and view held at once, ~60 bytes per byte of the object (300 MB for a 5 MB photo)."""

    _make: Callable[[], Iterator[bytes | memoryview]]
    after_send: Callable[[], None] | None = None  # called by the DUL once the message is written (or failed to be)

    @property
    def pieces(self) -> Iterator[bytes | memoryview]:
        return self._make()


def frame(context_id: int, command: bytes, data: memoryview | bytes | Sequence[memoryview | bytes] | None,
          max_pdu: int) -> Framed:
    """The message as P-DATA-TF PDUs, each no longer than `max_pdu` (0: no limit), as pynetdicom fragments it. The
    data set may come as several buffers, sent one after the other (a fragment spanning two holds a view of each)."""
    if 0 < max_pdu <= 6:
        # a peer's maximum PDU length with no room for a byte of a fragment (the PDV item's length, context id and
        # control header take 6): nothing can be sent to it (the loop below would never advance)
        raise ValueError(f"the peer's maximum PDU length ({max_pdu}) leaves no room for a fragment")
    data_parts = [data] if isinstance(data, (bytes, memoryview)) else list(data or ())
    messages = [([memoryview(p).cast("B") for p in parts if len(p)], more, last)
                for parts, more, last in (([command], COMMAND, COMMAND_LAST), (data_parts, DATA, DATA_LAST))]

    def pieces() -> Iterator[bytes | memoryview]:
        for views, more, last in messages:
            total = sum(len(v) for v in views)
            size = total if max_pdu == 0 else max_pdu - 6
            at, index, offset = 0, 0, 0  # the next fragment starts in views[index] at offset
            while at < total:
                length = min(size, total - at)
                yield _HEADER.pack(P_DATA_TF, 0, length + 6, length + 2, context_id, last if at + length >= total else more)
                want = length
                while want:
                    view = views[index]
                    take = min(want, len(view) - offset)
                    yield view[offset:offset + take]
                    want -= take
                    offset += take
                    if offset == len(view):
                        index, offset = index + 1, 0
                at += length

    framed = Framed()
    framed._make = pieces
    return framed


IOV_MAX = 1024  # buffers one sendmsg() takes (Linux)

# What pynetdicom gathers in memory, fragment by fragment, until a message is whole: past these the association is
# aborted. Without them one peer could send a command or an identifier without end and take the gateway's memory.
MAX_COMMAND_BYTES = 64 * 1024  # a command set is some hundred bytes (PS3.7 9.3, 10.3)
# a C-FIND/C-GET/C-MOVE identifier (a UID list of thousands), a storage commitment report: a C-STORE's data set goes
# to the spool instead (spooled.py), bounded by ingest.max_bytes
MAX_IN_MEMORY_DATA_SET = 8 * 1024 * 1024


def send_all(sock: Any, pieces: Iterable[bytes | memoryview]) -> None:
    """Write every piece, in order, taking them as they come: sendmsg() of up to IOV_MAX at a time, as many times as
    it takes (a socket with a timeout writes partly)."""
    source = iter(pieces)
    if isinstance(sock, ssl.SSLSocket):  # TLS has no scatter-gather write: joined a batch at a time
        while batch := list(islice(source, IOV_MAX)):
            sock.sendall(b"".join(batch))
        return
    pending: list[bytes | memoryview] = []
    while True:
        if len(pending) < IOV_MAX:
            pending.extend(islice(source, IOV_MAX - len(pending)))
        if not pending:
            return
        sent = sock.sendmsg(pending)
        done = 0
        while sent:
            size = len(pending[done])
            if sent < size:
                pending[done] = memoryview(pending[done])[sent:]
                break
            sent -= size
            done += 1
        del pending[:done]


def framed_of(pdu: Any) -> Framed | None:
    """The framed message a P_DATA_TF PDU carries, if it is one of ours."""
    items = getattr(pdu, "presentation_data_value_items", None)
    if items and len(items) == 1 and isinstance(items[0].presentation_data_value, Framed):
        return items[0].presentation_data_value
    return None


def _out_of_order(gathering: Any, items: Sequence[tuple[int, Any]]) -> str | None:
    """What breaks PS3.8 E.2's order (a message's command fragments, then its data set's) in these fragments, for
    the message being gathered; None if nothing does."""
    command_whole = gathering is not None and type(gathering) is not DIMSEMessage  # pynetdicom typed it on the command
    for _context_id, value in items:
        if not value:
            continue
        if value[0] & COMMAND:
            if command_whole:
                # pynetdicom decoded both commands as one and dropped the data set gathered so far, a spooled one
                # with its file open and on disk (a peer repeating it kept 200 MB of spool and 5,000 open files)
                return "command fragment after its command was complete"
            command_whole = value[0] & LAST_FRAGMENT != 0
        elif not command_whole:
            # pynetdicom took it for a message, failed to read it and logged the failure as its own, with a traceback
            return "data set fragment before its command"
        elif value[0] & LAST_FRAGMENT:
            command_whole = False  # that message is whole: what follows begins the next
    return None


class FramingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending each message framed in one piece (a data set read from a file, which
    pynetdicom streams, goes its way), and reading a response that comes whole in one fragment with no data set
    straight into its primitive (command.py).

    `encoded`, set by the association around its own send_c_store() of an already encoded data set, stands in for the
    data set of that C-STORE request (pynetdicom encoded only the UIDs naming the instance; reactor.py). `pending`
    holds back pending retrieve responses sent sooner than its interval after the last (pending.py)."""

    encoded: EncodedDataSet | None = None
    spool: Spool | None = None  # where C-STORE data sets are written as they arrive (None: kept in memory)
    data_set_limit: int | None = None  # bytes of a spooled Part 10 file kept (ingest.max_bytes): the rest only counted
    pending: PendingThrottle = PendingThrottle(0)  # the association sets its own; this class default sends every one
    _refused = False  # a message grew past the limits below: the association is being aborted
    # set by a retrieve refused before any sub-operation (retrieve.py): pynetdicom answers it as if the one it was
    # told of had failed, with an identifier holding an empty Failed SOP Instance UID List. dcmtk's getscu does not
    # read that data set, meets it during its release and aborts; the answer goes with none failed and no identifier
    refusing = False

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if self.refusing and isinstance(primitive, C_GET | C_MOVE) and primitive.MessageIDBeingRespondedTo is not None:
            self.refusing = False
            primitive.Identifier, primitive.NumberOfFailedSuboperations = None, 0
        if not self.pending.should_send(primitive):
            return
        if getattr(primitive, "_dataset_path", None):
            super().send_msg(primitive, context_id)
            return
        table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
        message_class = table[primitive.__class__]
        # written here unless someone listens for the message pynetdicom would build (its debug logging does)
        command = None if self.assoc.get_handlers(evt.EVT_DIMSE_SENT) else command_set(message_class.__name__, primitive)
        data: Sequence[memoryview | bytes] | memoryview | None
        if command is not None:
            keyword = _DATASET_KEYWORDS.get(message_class.__name__)
            data_set = getattr(primitive, keyword, None) if keyword else None
            data = data_set.getbuffer() if isinstance(data_set, BytesIO) else None
        else:
            msg = message_class()
            msg.primitive_to_message(primitive)
            msg.context_id = context_id
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": msg})
            # the pieces are views of the message's own data set: it is not written to again once handed to send_msg
            data = msg.data_set.getbuffer() if isinstance(msg.data_set, BytesIO) else None
            command = cast(bytes, encode(msg.command_set, True, True))  # None only for a data set pydicom cannot write
        encoded = self.encoded
        if encoded is not None and isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
            if primitive.AffectedSOPInstanceUID != encoded.SOPInstanceUID:
                raise ValueError("the encoded data set is not of the instance being sent")
            data = encoded.pieces
        framed = frame(context_id, command, data if data else None, self.maximum_pdu_size)
        if encoded is not None and data is encoded.pieces:
            framed.after_send = encoded.after_send
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, framed))
        self.dul.send_pdu(pdata)

    def receive_primitive(self, primitive: P_DATA) -> None:
        items = primitive.presentation_data_value_list
        # a whole response command in one fragment, nothing of another message pending, and nobody listening for
        # the message pynetdicom would build: read here
        if self.message is None and len(items) == 1 and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            context_id, fragment = items[0]
            if fragment and fragment[0] & COMMAND_LAST == COMMAND_LAST:
                response = response_of(bytes(fragment[1:]))
                if response is not None:
                    response._context_id = context_id
                    response._dataset_path = response._dataset_file = None
                    self.msg_queue.put((context_id, response))
                    return
        if self._refused:
            return  # the association is being aborted: nothing more is gathered
        out_of_order = _out_of_order(self.message, items)
        if out_of_order:
            self._abort_gathering(out_of_order)
            return
        super().receive_primitive(primitive)
        message, spool = self.message, self.spool
        if message is None:
            return
        if spool is not None and isinstance(message, C_STORE_RQ) and type(message.data_set) is BytesIO:
            try:
                self._spool_data_set(message, spool)
            except OSError as exc:  # no spool file to be had (the disk full): counted, not kept; answered 0xA700
                log.error("C-STORE data set not kept: the spool refused a file (%s)", type(exc).__name__)
                message.data_set = Unkept()
        self._check_gathered(message)

    def _check_gathered(self, message: Any) -> None:
        """A message still arriving whose command or in-memory data set has grown past what DIMSE needs: the
        association is aborted (as on a PDU that cannot be decoded), what was gathered dropped."""
        command = message.encoded_command_set.tell()
        data_set = message.data_set.tell() if type(message.data_set) is BytesIO else 0
        if command <= MAX_COMMAND_BYTES and data_set <= MAX_IN_MEMORY_DATA_SET:
            return
        if command > MAX_COMMAND_BYTES:
            self._abort_gathering(f"command set over {MAX_COMMAND_BYTES} bytes")
        else:
            self._abort_gathering(f"data set over {MAX_IN_MEMORY_DATA_SET} bytes")

    def _abort_gathering(self, why: str) -> None:
        """The message being gathered dropped (its spool file too) and the association aborted, as on a PDU that
        cannot be decoded: nothing more of it is gathered meanwhile."""
        log.warning("a DIMSE message's %s from %s (%s): association aborted", why, self.assoc.requestor.address,
                  self.assoc.requestor.ae_title)
        self._refused = True
        message = self.message
        if message is not None and isinstance(message.data_set, SpooledDataSet):
            message.data_set.discard()
        self.message = None
        self.dul.event_queue.put("Evt19")

    def _spool_data_set(self, message: C_STORE_RQ, spool: Spool) -> None:
        """A C-STORE request whose command has come and whose data set is coming: the rest of it to the spool as it
        arrives (spooled.py). Left in memory when the request names no instance or context (pynetdicom refuses it)."""
        command = message.command_set
        context = self.assoc._accepted_cx.get(cast(int, message.context_id))
        sop_class = getattr(command, "AffectedSOPClassUID", None)
        sop_instance = getattr(command, "AffectedSOPInstanceUID", None)
        if context is None or not context.transfer_syntax or not sop_class or not sop_instance:
            return
        head = part10_head(sop_class, sop_instance, context.transfer_syntax[0])
        fd, path = spool.new_file(prefix="cstore-", suffix=".dcm")
        spooled = SpooledDataSet(fd, path, head, self.data_set_limit)
        received = cast(BytesIO, message.data_set).getbuffer()
        try:
            spooled.write(received)  # a first data fragment that came in the command's PDU
        finally:
            received.release()
        message.data_set = spooled

    def discard_partial(self) -> None:
        """The association ended: the spool file of a data set still arriving goes."""
        message = self.message
        data_set = getattr(message, "data_set", None)
        if isinstance(data_set, SpooledDataSet):
            data_set.discard()
