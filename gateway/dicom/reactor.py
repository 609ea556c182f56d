"""Event-driven reactors for the associations our SCP accepts.

pynetdicom (3.0) runs two polling loops per association: the DUL thread sleeps 1 ms whenever it found nothing to do
(so a request read from the socket, and each response queued to be sent, wait up to a millisecond), and the
association's reactor sleeps 1 ms before every look at the DIMSE queue: ~1.5 ms a request on our side alone. C-ECHO round
trip from a pynetdicom client (whose own loops still poll), 500 each, alternating, loaded 2-core machine: p50 4.7-5.1 ms
with pynetdicom's loops, 3.1-3.9 ms with these (p95 6-12 against 5-7). Shortening the sleeps makes them busy loops that
take the CPU from the handlers (C-FIND p50 17.8 ms against 10.8 with 0.1 ms).

Here both threads block until there is work instead:
- the DUL waits (poll) on its socket and on a wake-up socket pair that is written when a primitive is queued for it
  to send (or it is told to stop); pynetdicom's loop is kept as it is, only the pause is replaced (`_run_loop_delay`
  is what it sleeps when idle, read once per idle turn);
- the association's reactor waits on an event set when a DIMSE message or an ACSE primitive (release, abort) is
  queued for it, or when the DUL stops.
Both still wake every IDLE_WAIT seconds to see the ARTIM and network (idle) timers, as pynetdicom's loops do every
millisecond. Installed through pynetdicom's own hook for servers (make_server's request_handler).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

from gateway.core.objects.transcode import EncodedDataSet
from gateway.dicom import sockets, tls
from gateway.dicom.pdata import LAST_FRAGMENT, FramingDIMSE, framed_of, send_all
from gateway.dicom.pdu_in import P_DATA_TF, PDU_TYPES, ConnectionEnded, PduTooLong, pdata_values, read_pdu
from gateway.dicom.pending import DEFAULT_INTERVAL, PendingThrottle
from gateway.dicom.spooled import SpooledDataSet

log = logging.getLogger("clinphoto.dicom")

MAX_REPORTS_AT_ONCE = 4  # N-EVENT-REPORTs one association may have served at once (EventAssociation._serve_request)
_REPORTS_LOCK = threading.Lock()
# seconds a killed association lets its DUL sit in one blocked read or write before shutting the connection down
KILL_GRACE = 1.0
IDLE_WAIT = 0.02  # seconds: how late the ARTIM and idle timers may be seen (their timeouts are tens of seconds)
# Requests received and not yet taken up by the association's thread, past which the DUL reads nothing more from the
# peer until one is: TCP then holds the peer back. A peer may have one request outstanding (no asynchronous operations
# are negotiated); pipelined regardless, each waited in memory: 60 C-FINDs of 6.9 MiB identifiers, 1.4 s each to
# serve, took the gateway to 831 MB (found by the review of 3133a5b).
MAX_QUEUED_REQUESTS = 2


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls `wake` after each put (put_nowait included: it calls put), and `taken` after each get."""

    def __init__(self, wake: Callable[[], None], taken: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._wake = wake
        self._taken = taken

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = super().get(block, timeout)
        if self._taken is not None:
            self._taken()
        return item


class EventDUL(DULServiceProvider):
    """The DUL service provider, blocking on its socket and its outgoing queue when idle instead of sleeping 1 ms."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._waker, self._wakee = socket.socketpair()
        self._waker.setblocking(False)
        self._wakee.setblocking(False)
        self._idle = False  # waiting in poll (or about to): only then is a wake-up byte needed
        self._read_before_send = False  # the last turn read what was waiting instead of sending: this one sends
        self.to_provider_queue = _WakingQueue(self.wake)
        self.io_started: float | None = None  # when the read or write the DUL is in began (None: in none)

    def wake(self) -> None:
        # a syscall per queued primitive was 4% of a C-FIND's CPU (py-spy): skipped while the DUL is busy, which it
        # sees by checking the queue after setting _idle (the GIL orders the two threads' steps)
        if not self._idle:
            return
        try:
            self._waker.send(b"\0")
        except OSError:  # a full pair already wakes it; a closed one belongs to a DUL that has ended
            pass

    @property
    def _run_loop_delay(self) -> float:
        """What pynetdicom's loop sleeps when it found nothing to do: on the DUL's own thread, the time spent here
        waiting for work, then nothing; on another thread (stop_dul waiting for this one to end), 1 ms as before."""
        if threading.current_thread() is self:
            self._wait_for_work()
            return 0.0
        return 0.001

    @_run_loop_delay.setter
    def _run_loop_delay(self, _value: float) -> None:
        pass  # the base class sets its 1 ms here

    def _wait_for_work(self) -> None:
        self._idle = True
        try:
            self._poll()
        finally:
            self._idle = False

    def _poll(self) -> None:
        if not self.to_provider_queue.empty() or not self.event_queue.empty() or self._kill_thread:
            return
        wait = select.poll()
        wait.register(self._wakee, select.POLLIN)
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0 and not self._held_back():  # held back: woken when one is taken
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already read from the kernel: poll would not see them
            wait.register(sock, select.POLLIN)
        try:
            wait.poll(IDLE_WAIT * 1000)
        except OSError:
            return
        try:
            while self._wakee.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError)
            pass

    def _held_back(self) -> bool:
        """Requests enough are waiting for the association's thread: nothing more is read from the peer for now."""
        return (self.state_machine.current_state == "Sta6"
                and self.assoc.dimse.msg_queue.qsize() >= MAX_QUEUED_REQUESTS)

    def _is_transport_event(self) -> bool:
        if self._held_back():
            self._idle_timer.restart()  # not idle: the peer's requests are being served, the rest waits in TCP
            return False
        return cast(bool, super()._is_transport_event())

    def _read_pdu_data(self) -> None:
        """pynetdicom's, with the PDU read in one go (pdu_in.py). A P-DATA-TF on an established association goes
        straight to the DIMSE provider as views of what was read, as the state machine's DT-2 action takes it (Sta6
        + Evt10 -> Sta6), unless a handler listens for the events that way fires; any other PDU goes pynetdicom's
        way (decoded, its event queued for the state machine)."""
        sock = self.socket
        if sock is None or sock.socket is None:
            self.event_queue.put("Evt17")
            return
        try:
            # a PDU is whole within the network timeout of its first byte: one trickled a byte at a time, each
            # within the kernel's read timeout (sockets.py), would hold the DUL without end
            timeout = self.assoc.network_timeout
            self.io_started = now = time.monotonic()
            deadline = now + timeout if timeout else None
            try:
                pdu_type, header, body = read_pdu(sock.socket, self.assoc.acceptor.maximum_length or 0, deadline)
            finally:
                self.io_started = None
        except ConnectionEnded as exc:
            log.debug("DICOM connection ended mid-PDU: %s", exc)
            self.event_queue.put("Evt17")
            return
        except PduTooLong as exc:
            log.warning("%s from %s: association aborted", exc, self.assoc.requestor.address)
            self.event_queue.put("Evt19")
            return
        if pdu_type not in PDU_TYPES:
            log.warning("unknown PDU type 0x%02X received: association aborted", pdu_type)
            self.event_queue.put("Evt19")
            return
        if pdu_type == P_DATA_TF and self.state_machine.current_state == "Sta6" and not self._pdu_watched():
            values = pdata_values(body)
            if values is None:
                log.warning("a P-DATA-TF whose items do not add up to its length: association aborted")
                self.event_queue.put("Evt19")
                return
            # one primitive per message a PDU ends (pynetdicom reads a primitive up to the first last fragment and
            # drops the rest: a peer that packs the next request in with the end of one got no answer)
            start = 0
            for at, (_context_id, value) in enumerate(values):
                if value[0] & LAST_FRAGMENT or at == len(values) - 1:
                    primitive = P_DATA()
                    primitive._presentation_data_value_list = values[start:at + 1]  # type: ignore[assignment]  # views
                    self.assoc.dimse.receive_primitive(primitive)
                    start = at + 1
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception:
            log.warning("a PDU that could not be decoded: association aborted")
            log.debug("PDU decoding", exc_info=True)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _pdu_watched(self) -> bool:
        assoc = self.assoc
        return bool(assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV)
                    or assoc.get_handlers(evt.EVT_FSM_TRANSITION))

    def _process_recv_primitive(self) -> bool:
        """pynetdicom's loop sends whatever is queued before it reads anything (a send and a read are each one turn,
        the send first). A C-FIND streaming 3,000 matches, queued faster than they went, read the requestor's
        C-CANCEL only once all were sent. Here, with the association established, a PDU waiting to be read is read
        before the next send (False: the loop reads this turn instead), one read before each send at most: a peer
        sending without reading what comes back (requests pipelined, never a response read) kept the DUL reading
        and never sending, every response queued in memory (16,000 in 8 s of C-ECHO), where a send it does not read
        blocks the DUL, and the peer, as TCP holds it back."""
        if not self._read_before_send and not self.to_provider_queue.empty() and self.state_machine.current_state == "Sta6":
            sock = self.socket
            if sock is not None and not self._held_back() and sock.ready:
                self._read_before_send = True
                return False
        self._read_before_send = False
        return cast(bool, super()._process_recv_primitive())

    def _send(self, pdu: Any) -> None:
        framed = framed_of(pdu)
        if framed is None:
            self.io_started = time.monotonic()
            try:
                super()._send(pdu)
            finally:
                self.io_started = None
            return
        sock = self.socket
        if sock is None:
            log.warning("a DIMSE message was to be sent over a closed connection")
            return
        self.io_started = time.monotonic()
        try:
            # the whole message in as few writes as the kernel takes (gateway/dicom/pdata.py)
            send_all(sock.socket, framed.pieces)
        except OSError:
            sock.event_queue.put("Evt17")  # as pynetdicom's send(): the transport connection closed
            return
        finally:
            self.io_started = None
            if framed.after_send is not None:
                framed.after_send()
        # sending is not idle: 1,500 C-FIND matches still going to a slow reader when the request's handler had
        # finished were cut off at the idle timeout, the final response never sent
        self._idle_timer.restart()
        evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            if not self.assoc.is_established and self.assoc.requestor.primitive is None:
                # The connection ended before an A-ASSOCIATE-RQ came (a load balancer's or a monitor's TCP probe):
                # the acceptor waiting for that request is told at once, as on its ACSE timeout (None), where
                # pynetdicom left it waiting 30 s, a thread a probe, and a stopping gateway waited 15 s for it.
                cast(Any, self.to_user_queue).put(None)  # pynetdicom's annotation leaves out the None it reads as a timeout
            self.assoc_wake()
            self._waker.close()
            self._wakee.close()

    def assoc_wake(self) -> None:
        wake = getattr(self.assoc, "wake", None)
        if wake is not None:
            wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True  # as the base class does next, so the woken loop finds it set
            self.wake()
        return cast(bool, super().stop_dul())


class EventAssociation(Association):
    """An acceptor association whose reactor waits for a DIMSE message or an ACSE primitive instead of polling."""

    _work: threading.Event
    # set by close_gracefully(): the request being served is finished and answered, then the association aborted
    _closing: bool = False
    _reports_served: int = 0  # N-EVENT-REPORTs being served (each on a thread of pynetdicom's)

    @classmethod
    def adopt(cls, assoc: Association) -> EventAssociation:
        """`assoc` (a new acceptor pynetdicom configured, its DUL not started) made one of these, with an EventDUL on
        its socket: pynetdicom's server builds the Association itself, so the class is changed rather than the
        configuration repeated."""
        assoc.__class__ = cls
        adopted = cast(EventAssociation, assoc)
        adopted._work = threading.Event()
        dul = EventDUL(adopted)
        # the socket, and its connection indication (Evt5, queued when the socket was made) move to this DUL
        dul.socket, dul.event_queue, adopted.dul = assoc.dul.socket, assoc.dul.event_queue, dul
        # the timeout setters set the DUL's ARTIM and idle timers: again, for this DUL
        adopted.acse_timeout, adopted.network_timeout = assoc.acse_timeout, assoc.network_timeout
        adopted.dimse.__class__ = FramingDIMSE  # each message framed and written in one piece
        # the listener's AE carries the setting (gateway/dicom/listener.py)
        cast(FramingDIMSE, adopted.dimse).pending = PendingThrottle(getattr(assoc.ae, "pending_interval", DEFAULT_INTERVAL))
        cast(FramingDIMSE, adopted.dimse).spool = getattr(assoc.ae, "data_set_spool", None)
        cast(FramingDIMSE, adopted.dimse).data_set_limit = getattr(assoc.ae, "data_set_limit", None)
        adopted.dimse.msg_queue = _WakingQueue(adopted.wake, dul.wake)  # a request taken: the DUL may read on
        dul.to_user_queue = _WakingQueue(adopted.wake)
        return adopted

    def wake(self) -> None:
        self._work.set()

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom's, with the event reports served at once bounded: pynetdicom serves each N-EVENT-REPORT on a
        thread of its own as it arrives (not through the one-at-a-time queue MAX_QUEUED_REQUESTS bounds), so a peer
        pipelining them had a thread and a data set in memory each. Past MAX_REPORTS_AT_ONCE the association is
        aborted: a Storage Commitment destination sends one report per transaction."""
        if not isinstance(msg, N_EVENT_REPORT):
            super()._serve_request(msg, context_id)
            return
        with _REPORTS_LOCK:
            busy = self._reports_served
            if busy < MAX_REPORTS_AT_ONCE:
                self._reports_served = busy + 1
        if busy >= MAX_REPORTS_AT_ONCE:
            log.warning("DICOM association from %s (%s): more than %d event reports at once, aborted", self.requestor.address,
                        self.requestor.ae_title, MAX_REPORTS_AT_ONCE)
            self.abort()
            return
        try:
            super()._serve_request(msg, context_id)
        finally:
            with _REPORTS_LOCK:
                self._reports_served -= 1

    def send_c_store(self, dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Any:
        """pynetdicom's send_c_store(), also taking an EncodedDataSet (the C-GET SCP's objects as stored), sent in the
        presentation context of its stored transfer syntax: the request is built from the UIDs it carries, and the
        DIMSE provider sends its bytes as the data set. pynetdicom's own would look each UID up in a pydicom Dataset
        and write one of two elements to be thrown away: ~0.3 ms a photo traced, between a photo's response and the
        next photo, while the peer waits."""
        if sockets.connection_ended(self):
            # the connection ended under a C-GET (the peer stopped reading, its sends timed out): each object left
            # would be queued to a DUL that is gone and wait out the DIMSE timeout (30 s) for its response
            raise ConnectionError("the association has ended")
        if not isinstance(dataset, EncodedDataSet):
            return super().send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        if not self.is_established:
            raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")
        # only the stored syntax (no conversion: the bytes are sent as they lie); none accepted raises, as
        # pynetdicom does, and its C-GET/C-MOVE SCP counts that sub-operation failed
        context = self._get_valid_context(dataset.sop_class_uid, dataset.transfer_syntax, "scu", allow_conversion=False)
        request = C_STORE()
        request.MessageID, request.Priority = msg_id, priority
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = originator_aet, originator_id
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = dataset.sop_class_uid, dataset.sop_instance_uid
        request.DataSet = BytesIO()  # says a data set follows; FramingDIMSE sends the encoded one in its place
        dimse = cast(FramingDIMSE, self.dimse)
        # as pynetdicom's send_*(): the reactor paused (it is, when its own handler sends this) so it does not take
        # the response; let go again whatever happens (a send that raises would have left it waiting for good)
        self._reactor_checkpoint.clear()
        try:
            while not self._is_paused:
                time.sleep(0.0001)
            dimse.encoded = dataset
            try:
                dimse.send_msg(request, cast(int, context.context_id))
            finally:
                dimse.encoded = None
            _context_id, response = dimse.get_msg(block=True)
        finally:
            self._reactor_checkpoint.set()
        if response is None:  # the DIMSE timeout, or the association ended
            self._handle_no_response()
            return Dataset()
        return self._check_received_status(response)

    def close_gracefully(self) -> None:
        """The gateway is stopping: end this association once the request it may be serving is answered (an
        association still negotiating, or idle, ends at once)."""
        self._closing = True
        if not self.is_established:
            self.abort()
        self.wake()

    def kill(self) -> None:
        self._kill = True
        self.wake()
        # a send_*() waiting for its response (a C-GET's C-STORE, the reactor's own thread) gets none: it returns
        # now, as when the peer aborts (pynetdicom queues the same), where a local abort (the gateway stopping mid-
        # retrieve) left it waiting out its DIMSE timeout (30 s), the association's thread and the retrieve's with it
        self.dimse.msg_queue.put((None, None))
        # pynetdicom's kill(), but its wait for the DUL bounded: a DUL blocked in one write to a peer that reads
        # nothing (or one read of a PDU it never finishes) for KILL_GRACE gets its connection shut down under it, where
        # the kernel timeouts (sockets.py) alone would leave it up to the network timeout more. Only a blocked call:
        # a DUL merely slow to run (a loaded machine) still sends the A-RELEASE-RP or A-ASSOCIATE-RJ queued before
        self._reactor_checkpoint.set()
        self._kill, self.is_established, self._is_paused = True, False, True
        dul = cast(EventDUL, self.dul)
        cut = False
        while dul.is_alive() and not dul.stop_dul():
            started = dul.io_started
            if not cut and started is not None and time.monotonic() - started > KILL_GRACE and dul.socket is not None:
                sockets.cut(dul.socket.socket)
                cut = True
            time.sleep(0.01)
        cast(FramingDIMSE, self.dimse).discard_partial()  # a C-STORE data set cut off: its spool file

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, each turn started by work (or IDLE_WAIT) rather than a 1 ms sleep: serve a
        DIMSE request, answer a release, end on an abort, a dead DUL or the network timeout. However it ends (the DUL
        may have stopped it on an exception of its own, without kill()), no spooled data set outlives it."""
        try:
            self._serve_until_ended()
        finally:
            self._discard_spooled()

    def _serve_until_ended(self) -> None:
        self._is_paused = False
        while not self._kill:
            # paused while waiting, as pynetdicom's reactor is at its checkpoint: a send_*() from another thread
            # need not wait for a turn (it pauses the reactor so the reactor does not take that service's responses)
            self._is_paused = True
            self._work.clear()
            if self.dimse.msg_queue.empty() and self.dul.to_user_queue.empty() and self.dul.is_alive():
                self._work.wait(IDLE_WAIT)
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._kill:
                return
            if self._closing:
                self._close_for_stop()
                return
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                cast(FramingDIMSE, self.dimse).pending.started(msg)
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    # the C-STORE handler took the file, or pynetdicom refused the request without calling it (no
                    # Message ID, a context not accepted...): either way it goes now (done twice, nothing happens)
                    _discard_if_spooled(msg)
                # idle from the answer on: the DUL restarts the timer only on what it receives, so a C-MOVE's
                # requestor, silent while a slow destination took the photos, was aborted right after its answer
                self.dul._idle_timer.restart()
            if self._finished():
                return
            if self._closing:
                self._close_for_stop()
                return

    def _discard_spooled(self) -> None:
        """The data set still arriving, and those of requests received but never served, removed from the spool."""
        dimse = cast(FramingDIMSE, self.dimse)
        dimse.discard_partial()
        while True:
            try:
                _context_id, msg = dimse.msg_queue.get_nowait()
            except queue.Empty:
                return
            _discard_if_spooled(msg)

    def _close_for_stop(self) -> None:
        # A-ABORT, as archives do when they stop: the peer sees its association end, and a request it sent after
        # the last answer is not acknowledged, so it sends that one again to whoever answers next
        log.info("DICOM association from %s (%s) ended: the gateway is stopping", self.requestor.address,
                 self.requestor.ae_title)
        self.abort()
        self.kill()

    def _finished(self) -> bool:
        """What pynetdicom's loop checks after each turn, done as it does: a release asked for (answered), an abort,
        the DUL gone, the network (idle) timeout."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.debug("association released by the peer")
            self.is_released, self.is_established = True, False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
            self.is_aborted, self.is_established = True, False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.warning("DICOM association from %s (%s): nothing received for %s s, aborted (DUL %s)", self.requestor.address,
                        self.requestor.ae_title, self.network_timeout, self.dul.state_machine.current_state)
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True  # release() waits for the reactor (this thread) to be paused
                self.release()
            else:
                self.abort()
            self.kill()
            return True
        return False


def _discard_if_spooled(msg: Any) -> None:
    data_set = getattr(msg, "DataSet", None)
    if isinstance(data_set, SpooledDataSet):
        data_set.discard()


class EventRequestHandler(RequestHandler):
    """pynetdicom's request handler, making an EventAssociation: configured by the base class as any acceptor."""

    def _create_association(self) -> Association:
        return EventAssociation.adopt(super()._create_association())

    def handle(self) -> None:
        if tls.handshake(self.request, self.client_address, getattr(self.server, "handshakes", None)):  # on this thread (tls.py)
            super().handle()
