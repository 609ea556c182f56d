"""Renditions made after the answer, for received DICOM objects (settings ingest.received_renditions).

A C-STORE or STOW-RS sender is answered once its object has passed every check that needs no decoding
(received.read and received.check_frame) and is durably stored; decoding the pixels for the preview and
thumbnail is what costs (a strict 1/2-scale decode of a 12-MP JPEG is 31-51 ms here, more than Orthanc's whole
~25 ms C-STORE), so it is done afterwards, the stored row marked `rendition_state = "due"` meanwhile.

Three ways a due photo gets its renditions, all through make():
- the Renderer thread `clinphoto serve` runs, woken by every ingest that leaves one due (and every few
  seconds, for what another process such as `clinphoto import` stored, or a killed process left);
- a reader asking for the preview or thumbnail first (access.image): made there and then, so nobody sees
  "not ready";
- a restart: the state is in the database, nothing is lost with the process.

A frame that does not decode (damage inside the entropy-coded data, which no header check can see) is marked
`failed`: the DICOM object stays as the sender sent it (DICOM retrieves serve it, as any archive would), there
is no preview or thumbnail, and the finding is audited (import, outcome serious failure) and logged without
patient data. Two processes may make the same photo's renditions at once: the bytes are the same, the row is
updated once (the update names the state it expects) and the loser's blobs are left to the winner. Every update
after the decode also names the stored object it decoded: a resend that corrected the photo meanwhile (pipeline
_replace: due again, with another object) is not given the verdict or the renditions of the object it superseded.

Each attempt is counted in the row (rendition_tries) before the decode. An attempt that ends without an answer,
because the process was killed during it (a native decoder crash, the OOM killer) or an unexpected error, stays
counted: past MAX_ATTEMPTS the photo is given up (failed, audited), where the gateway used to crash-loop on it at
every start. A fault of the host rather than the photo (the stored object missing from the blob store, the spool
unusable) is not counted: the photo stays due and the renderer leaves it until rendition_after, taking the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Row, case, or_, select, update

from gateway.core.context import Gateway
from gateway.core.ingest import received
from gateway.core.ingest.blob_writer import BlobWriter
from gateway.core.ingest.digests import sha1_base64
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.renditions import DUE, FAILED, Renditions
from gateway.core.ingest_settings import IngestSettings
from gateway.core.log_setup import configure_logging
from store import audit
from store.models import Asset

log = logging.getLogger("clinphoto.ingest")

RENDERER_NICE = 10
MAX_THREADS = 4
# the renderer starts no photo until senders have been quiet this long (no ingest under way, none ended since: a
# burst's photos come tens of ms apart), unless it has given way for MAX_DEFERRAL already (a sender that never pauses)
QUIET_SECONDS = 0.25
MAX_DEFERRAL = 10.0
# attempts that end without an answer (the process killed during the decode, or an error that is not the photo's
# refusal nor the host's fault) before the photo is given up: counted in its row, so restarts do not reset them
MAX_ATTEMPTS = 3
RETRY_PAUSE = timedelta(seconds=5)  # after an attempt ended in an unexpected error, times the attempts so far
HOST_FAULT_PAUSE = timedelta(minutes=1)  # after the blob store or spool failed: the renderer takes the others meanwhile
GAVE_UP = "gave-up"
_VERDICT = {False: "stored, but its pixels did not decode", True: "stored, but its renditions could not be made"}


@dataclass(frozen=True)
class Made:
    """A photo's rendition state after make(): its preview and thumbnail blobs, or why there are none."""

    state: str | None  # None: made; FAILED
    preview_sha256: str | None = None
    thumbnail_sha256: str | None = None
    reason: str | None = None


# How long a reader waits for the renderer's own attempt at a photo before making its renditions itself. The
# renderer's workers run at the idle policy: while senders keep both CPUs busy they may not run at all, and a viewer
# asking for a thumbnail waited out the whole of wait_seconds (120 s) for them, then was told there was none.
READER_PATIENCE = 2.0


@dataclass
class _Attempt:
    done: threading.Event
    background: bool  # the renderer's (its workers at the idle policy), or a reader's (on its own thread)
    # set by the one reader that stopped waiting for this background attempt and makes the renditions itself: other
    # readers wait for that one rather than each decoding the same pixels again
    overtaker: threading.Event | None = None


_IN_FLIGHT: dict[str, _Attempt] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def available(asset: Asset) -> bool:
    """Whether the photo has (or will have, on first asking) a preview and thumbnail."""
    return bool(asset.preview_sha256) or asset.rendition_state == DUE


def due(gw: Gateway, limit: int = 8, *, ready: bool = False) -> list[str]:
    """Photos still waiting for their renditions, oldest first; `ready`: only those the renderer may take now (not
    paused after a failed attempt)."""
    query = select(Asset.id).where(Asset.rendition_state == DUE)
    if ready:
        query = query.where(or_(Asset.rendition_after.is_(None), Asset.rendition_after <= datetime.now(timezone.utc)))
    with gw.db.read() as session:
        return list(session.execute(query.order_by(Asset.created_at).limit(limit)).scalars())


Render = Callable[[Path, IngestSettings, Path], Renditions]  # read_and_render, here or elsewhere
Digest = Callable[[Path], str]  # sha1_base64, here or elsewhere
Worker = Callable[[received.Received, IngestSettings, Path], Renditions]  # received.renditions, or a test's


def read_and_render(stored: Path, settings: IngestSettings, tmp_dir: Path, worker: Worker | None = None) -> Renditions:
    """The stored object's header read (received.read) and its renditions made by `worker`: both in the process
    that runs this. The Renderer runs it in its workers, so the header's parse is not Python on the gateway's own
    threads, beside the photos being received (see _claim for what that and the claim in one statement saved)."""
    make_renditions = worker or received.renditions  # looked up at the call, not at import
    return make_renditions(received.read(stored, settings, check_limits=False), settings, tmp_dir)


def make(gw: Gateway, asset_id: str, wait_seconds: float = 120.0, render: Render | None = None,
         digest: Digest | None = None, *, background: bool = False) -> Made:
    """Make a due photo's renditions (or learn they were made, or failed), and the SHA-1 of its stored object if the
    ingest left it to be worked out here (FHIR Attachment.hash). One maker per photo in this process: a second caller
    waits for the first rather than decoding the same pixels again; a reader (not `background`) waits for the
    renderer's attempt READER_PATIENCE at most, then makes them itself beside it (the row is updated once, by the
    first to finish; the bytes are the same). `render` reads, decodes and encodes, `digest` hashes (read_and_render
    and sha1_base64 on this thread unless given: the Renderer gives its worker processes)."""
    make_here = render or read_and_render, digest or sha1_base64
    with _IN_FLIGHT_LOCK:
        running = _IN_FLIGHT.get(asset_id)
        if running is None:
            mine = _IN_FLIGHT[asset_id] = _Attempt(threading.Event(), background)
    if running is not None:
        if not running.background or background or running.done.wait(READER_PATIENCE):
            running.done.wait(wait_seconds)
            return _current(gw, asset_id)
        with _IN_FLIGHT_LOCK:
            overtaker, overtaking = running.overtaker, running.overtaker is None
            if overtaker is None:
                overtaker = running.overtaker = threading.Event()
        if not overtaking:
            overtaker.wait(wait_seconds)
            return _current(gw, asset_id)
        log.info("photo %s: its renditions made for a reader, the renderer's attempt not done in %.0f s", asset_id,
                 READER_PATIENCE)
        try:
            # not counted: the renderer's claim counted this round (counted again, a photo with two attempts ended
            # without an answer was given up by the reader while the renderer's third went on to succeed)
            return _make(gw, asset_id, *make_here, counted=False)
        finally:
            overtaker.set()
    try:
        return _make(gw, asset_id, *make_here)
    finally:
        with _IN_FLIGHT_LOCK:
            del _IN_FLIGHT[asset_id]
        mine.done.set()


def _names(dicom_sha256: str | None) -> ColumnElement[bool]:
    """The row still names the stored object this attempt read (not one a correction put in its place)."""
    return Asset.dicom_sha256.is_(None) if dicom_sha256 is None else Asset.dicom_sha256 == dicom_sha256


def _current(gw: Gateway, asset_id: str) -> Made:
    with gw.db.read() as session:
        row = session.execute(select(Asset.rendition_state, Asset.preview_sha256, Asset.thumbnail_sha256)
                              .where(Asset.id == asset_id)).one_or_none()
    if row is None:
        return Made(FAILED, reason="no such photo")
    return Made(row.rendition_state, row.preview_sha256, row.thumbnail_sha256)


def _make(gw: Gateway, asset_id: str, render: Render, digest: Digest, counted: bool = True) -> Made:
    """One attempt; `counted=False`: beside the renderer's, whose claim counted it (the row only read here)."""
    row = _claim(gw, asset_id) if counted else _due_row(gw, asset_id)
    if row is None:
        return _current(gw, asset_id)
    named, tries = row.dicom_sha256, row.rendition_tries
    if counted and tries > MAX_ATTEMPTS:
        return _failed(gw, asset_id, row, GAVE_UP, f"making its renditions ended without an answer {tries - 1} times "
                                                    "(the process stopped, or an unexpected error); not tried again")
    settings = gw.settings.ingest
    try:
        if not row.dicom_sha256:
            raise IngestRejected("invalid-object", "the photo has no stored DICOM object to render")
        stored = gw.blobs.path(row.dicom_sha256)
        rends = render(stored, settings, gw.spool.path)
        sha1 = row.sha1 or digest(stored)
    except IngestRejected as exc:
        return _failed(gw, asset_id, row, exc.code, exc.message)
    except OSError as exc:
        # the host's fault, not the photo's (the stored object missing from the blob store, the spool unusable): it
        # stays due, the attempt uncounted, and the renderer takes the others until the pause is over; unless a
        # correction replaced the object meanwhile (and deleted the one this attempt read): nothing to say then
        if not (_release if counted else _pause)(gw, asset_id, named, HOST_FAULT_PAUSE):
            return _current(gw, asset_id)
        if isinstance(exc, FileNotFoundError) and not gw.blobs.path(row.dicom_sha256 or "0" * 64).is_file():
            log.error("photo %s: its stored DICOM object is missing from the blob store; renditions wait for it (run "
                      "`clinphoto store check`)", asset_id)
        else:
            log.error("photo %s: renditions not made, the host failed (%s); tried again in %s", asset_id,
                      type(exc).__name__, HOST_FAULT_PAUSE)
        raise
    except Exception as exc:  # not a refusal of the photo nor the host's fault as far as we know: counted
        _pause(gw, asset_id, named, RETRY_PAUSE * tries)
        log.error("photo %s: making its renditions failed (%s), attempt %d of %d", asset_id, type(exc).__name__, tries,
                  MAX_ATTEMPTS)
        log.debug("rendition failure", exc_info=True)
        raise
    writer = BlobWriter(gw)
    try:
        preview, thumbnail = writer.put_bytes(rends.preview), writer.put_bytes(rends.thumbnail)
        with gw.db.write() as session:
            done = cast(CursorResult[Any], session.execute(
                update(Asset).where(Asset.id == asset_id, Asset.rendition_state == DUE, _names(named)).values(
                    preview_sha256=preview, thumbnail_sha256=thumbnail, preview_sha1=sha1_base64(rends.preview),
                    preview_size=len(rends.preview), sha1=sha1, rendition_state=None, updated_at=datetime.now(timezone.utc),
                )
            )).rowcount
    except BaseException:
        writer.remove_unreferenced()
        raise
    if not done:  # another process made them first (the row names its blobs, the same bytes), or a correction
        # replaced the object these were made from
        writer.remove_unreferenced()
        return _current(gw, asset_id)
    writer.release()
    return Made(None, preview, thumbnail)


_CLAIMED = (Asset.rendition_tries, Asset.dicom_sha256, Asset.patient_id, Asset.source, Asset.sop_instance_uid,
            Asset.study_uid, Asset.sha1)


def _claim(gw: Gateway, asset_id: str) -> Row[int, str | None, int, str, str, str, str | None] | None:
    """Count an attempt in the row, durably, before the decode (a process killed by it leaves it counted): what the
    attempt needs of the row, the attempts so far with this one among it, or None when the photo is not due. One
    statement (UPDATE ... RETURNING), so the object named is the one the attempt is counted for. A read, then the
    claim as an update and a select, and the header read on this thread besides (now in the worker: read_and_render)
    cost make() on the renderer's thread 5.7-6.0 ms of CPU a photo; 4.0-4.2 ms with both changes (12-MP photos, the
    worker's output stubbed, measured with time.thread_time)."""
    claim = update(Asset).where(Asset.id == asset_id, Asset.rendition_state == DUE).values(
        rendition_tries=Asset.rendition_tries + 1)
    with gw.db.write() as session:
        if gw.db.engine.dialect.update_returning:
            return session.execute(claim.returning(*_CLAIMED)).one_or_none()
        # SQLite before 3.35 has no RETURNING (SQLAlchemy says so): the row read back in the same write transaction
        if not cast(CursorResult[Any], session.execute(claim)).rowcount:
            return None
        return session.execute(select(*_CLAIMED).where(Asset.id == asset_id)).one()


def _due_row(gw: Gateway, asset_id: str) -> Row[int, str | None, int, str, str, str, str | None] | None:
    """What an attempt needs of the row, None when the photo is not due; nothing counted."""
    with gw.db.read() as session:
        return session.execute(select(*_CLAIMED).where(Asset.id == asset_id, Asset.rendition_state == DUE)).one_or_none()


def _release(gw: Gateway, asset_id: str, named: str | None, pause: timedelta) -> bool:
    """An attempt that was not the photo's fault: uncounted, and the renderer leaves the photo for `pause`; False
    when the photo no longer names the object the attempt read (a correction replaced it: nothing to undo)."""
    with gw.db.write() as session:  # one statement: the attempt uncounted and the pause set together
        done = cast(CursorResult[Any], session.execute(
            update(Asset).where(Asset.id == asset_id, Asset.rendition_state == DUE, _names(named))
            .values(rendition_tries=case((Asset.rendition_tries > 0, Asset.rendition_tries - 1), else_=Asset.rendition_tries),
                    rendition_after=datetime.now(timezone.utc) + pause))).rowcount
    return bool(done)


def _pause(gw: Gateway, asset_id: str, named: str | None, pause: timedelta) -> bool:
    with gw.db.write() as session:
        done = cast(CursorResult[Any], session.execute(
            update(Asset).where(Asset.id == asset_id, Asset.rendition_state == DUE, _names(named))
            .values(rendition_after=datetime.now(timezone.utc) + pause))).rowcount
    return bool(done)


def _object_sha1(gw: Gateway, row: object) -> dict[str, str]:
    """The stored object's SHA-1 for the row, if the ingest left it to be worked out after the answer and the object
    can be read (a photo whose pixels do not decode is still served as sent, hash and all)."""
    stored = getattr(row, "dicom_sha256", None)
    if getattr(row, "sha1", None) or not stored:
        return {}
    try:
        return {"sha1": sha1_base64(gw.blobs.path(stored))}
    except OSError:
        return {}


def _failed(gw: Gateway, asset_id: str, row: object, code: str, message: str) -> Made:
    """The pixels did not decode: marked, audited in the same transaction, logged without patient data."""
    sha1 = _object_sha1(gw, row)
    with gw.db.write() as session:
        done = cast(CursorResult[Any], session.execute(
            update(Asset).where(Asset.id == asset_id, Asset.rendition_state == DUE,
                                _names(getattr(row, "dicom_sha256", None)))
            .values(rendition_state=FAILED, updated_at=datetime.now(timezone.utc), **sha1))).rowcount
        if done:
            audit.append(session, audit.AuditEntry(
                type_code=audit.IMPORT, action="U", subtype=getattr(row, "source", None), outcome=audit.SERIOUS_FAILURE,
                outcome_desc=f"{_VERDICT[code == GAVE_UP]}: {message}"[:500], agent_who="clinphoto",
                agent_role="system", patient_id=getattr(row, "patient_id", None),
                entities=[{"type": "asset", "id": asset_id, "role": "stored",
                           "sop_instance_uid": getattr(row, "sop_instance_uid", None),
                           "study_uid": getattr(row, "study_uid", None)}],
                detail={"code": code, "message": message, "stage": "renditions after the answer"},
            ))
    if not done:
        return _current(gw, asset_id)
    log.warning("photo %s: %s (%s); it has no preview or thumbnail", asset_id, _VERDICT[code == GAVE_UP], code)
    return Made(FAILED, reason=message)


class Renderer:
    """The threads `clinphoto serve` runs: make due renditions, oldest first, as soon as an ingest leaves some.

    One thread per CPU (at most `threads`), each handing the decode and the encoding to a worker process of its own
    pool (as many processes), at the lowest priority (SCHED_IDLE), while the thread does the rest (the rows, the blobs).
    Decoded on the gateway's own threads, niced, a burst's renditions still took the GIL from answering senders:
    C-STORE of 12-MP photos answered 21.3 files/s, against 23.8 with worker processes (A/B in one run; 31.8 with no
    renditions at all, in another). A decoder that crashes takes its worker with it, not the gateway: the attempt is counted
    (MAX_ATTEMPTS) and the pool started again.

    Senders first: while photos are arriving (an ingest in this process under way, or ended within `quiet_seconds`),
    no photo is started, for `max_deferral` at most; what is in hand is finished. Workers at the idle policy still took a fifth of the
    answering rate: 12-MP C-STORE on one association, 6 batches of 40 in turns, 49.4 files/s with the renderer at
    work, 60.8 without it. It is the decode's CPU, not the renderer's rows, blobs or GIL: two idle-policy processes
    decoding the same JPEG in a loop took as much (62.0 -> 52.3 files/s, 5 batches each in turns), and the rows' and
    blobs' writes moved into the workers took nothing back (40.4 against 39.4). A burst's renditions are made once it
    ends, on every CPU (until the last was made: 24.4 -> 18.4 files/s, the price); a reader asking meanwhile gets them
    made there and then."""

    def __init__(self, gw: Gateway, poll_seconds: float = 5.0, threads: int | None = None,
                 worker: Worker = received.renditions, quiet_seconds: float = QUIET_SECONDS,
                 max_deferral: float = MAX_DEFERRAL) -> None:
        self.gw = gw
        self.poll_seconds = poll_seconds
        self.quiet_seconds = quiet_seconds
        self.max_deferral = max_deferral
        self._giving_way_since: float | None = None  # time.monotonic() this spell of giving way to senders began
        gw.ingest_quiet_seconds = quiet_seconds  # what a pause is, to the ingests that mark one
        self.threads = max(1, threads or min(MAX_THREADS, os.cpu_count() or 1))
        self.worker = worker  # what the worker processes run: importable by name (they are started apart)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._taken: set[str] = set()  # in hand in this process: each thread takes another
        self._workers: list[threading.Thread] = []
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def start(self) -> None:
        self._workers = [threading.Thread(target=self._run, name=f"renderer-{i}", daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        """Finish the photos in hand and stop; what is still due stays due for the next start."""
        self._stop.set()
        self.gw.renditions_wanted.set()
        for worker in self._workers:
            worker.join(60)
        self._workers = []
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _render(self, stored: Path, settings: IngestSettings, tmp_dir: Path) -> Renditions:
        """read_and_render in a worker process, with this renderer's worker."""
        return cast(Renditions, self._in_worker(read_and_render, stored, settings, tmp_dir, self.worker))

    def _digest(self, path: Path) -> str:
        """sha1_base64 in a worker process: at the idle policy, as the decode, not on the gateway's CPU time."""
        return cast(str, self._in_worker(sha1_base64, path))

    def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker process; a worker that died (a decoder crash, the OOM killer) breaks the pool: this
        attempt fails (counted by make()) and the next one gets a new pool."""
        with self._pool_lock:
            if self._pool is None:
                # spawn: workers are not forked from this process's threads (~0.5 s to start each, once), and are
                # its children, so they see it go (a forkserver's workers outlived a gateway killed -9)
                # the workers log as the gateway does (a worker's pydicom warnings quoted a PatientID to stderr)
                logs = (getattr(self.gw.settings, "log_format", "text"), getattr(self.gw.settings, "log_level", "INFO"))
                self._pool = ProcessPoolExecutor(self.threads, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_start, initargs=(os.getpid(), *logs))
            pool = self._pool
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            with self._pool_lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    @property
    def running(self) -> bool:
        return any(w.is_alive() for w in self._workers)

    def _give_way(self) -> float:
        """Seconds to wait before taking a photo: until senders have been quiet for `quiet_seconds`, unless this
        spell of giving way has lasted `max_deferral` (then photos are taken as they come, until senders pause).
        A pause no thread saw (each rendering, or waiting for work) ends the spell as one seen does: kept, a spell
        past max_deferral left every later burst without giving way."""
        now = time.monotonic()
        quiet_for = 0.0 if self.gw.ingests_running else now - self.gw.ingest_seen_at
        with self._lock:
            since = self._giving_way_since
            if quiet_for >= self.quiet_seconds or (since is not None and self.gw.ingest_paused_at > since):
                self._giving_way_since = None
                return 0.0
            if self._giving_way_since is None:
                self._giving_way_since = now
            if now - self._giving_way_since >= self.max_deferral:
                return 0.0
            return min(self.quiet_seconds - quiet_for, self.max_deferral - (now - self._giving_way_since))

    def _take(self) -> str | None:
        """The oldest due photo no other thread here has in hand; wakes another thread when more wait."""
        wanted = self.gw.renditions_wanted
        with self._lock:
            wanted.clear()  # before looking: an ingest committing meanwhile sets it again
            free = [i for i in due(self.gw, limit=len(self._taken) + self.threads + 1, ready=True) if i not in self._taken]
            if not free:
                return None
            self._taken.add(free[0])
            if len(free) > 1:
                wanted.set()
            return free[0]

    def _run(self) -> None:
        try:
            # background work gives way to answering senders and readers when the CPUs are busy (on Linux a
            # thread has its own nice value); idle CPUs still run it at full speed
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDERER_NICE)
        except (AttributeError, OSError):  # not Linux, or not allowed: it runs at the process's priority
            pass
        while not self._stop.is_set():
            wait = self._give_way()
            if wait > 0:
                self._stop.wait(wait)
                continue
            try:
                asset_id = self._take()
            except Exception as exc:  # the database away: try again after a pause
                log.error("rendition round failed: %s", type(exc).__name__)
                log.debug("rendition round failure", exc_info=True)
                asset_id = None
            if asset_id is None:
                self.gw.renditions_wanted.wait(self.poll_seconds)
                continue
            try:
                make(self.gw, asset_id, render=self._render, digest=self._digest, background=True)
            except Exception as exc:  # the decoder (counted in make()) or the database away: again after a pause
                log.warning("photo %s: renditions not made this round (%s); trying again", asset_id, type(exc).__name__)
                self._stop.wait(1.0)
            finally:
                with self._lock:
                    self._taken.discard(asset_id)


def _worker_start(gateway_pid: int, log_format: str = "text", log_level: str = "INFO") -> None:
    """A worker process's start: it runs when answering senders and readers leaves a CPU free, and ends once the
    gateway is gone (a gateway killed -9 left its workers waiting for work for good). It watches for that itself:
    a signal on its parent thread's exit (PR_SET_PDEATHSIG) also came when the renderer thread that started it
    stopped, killing it while it held the pool's queue lock, and the pool's shutdown then waited for good.

    SCHED_IDLE rather than nice 19: Linux's scheduler lets a running nice-19 task finish its slice (up to ~3 ms)
    before a woken gateway thread gets the CPU, and a C-STORE wakes several per photo; an idle-policy task is
    preempted at once. A/B, 12-MP C-STORE on one association, 8 batches of 15 in turns: 33.8 files/s niced, 37.0
    SCHED_IDLE, 39.1 with no renditions at all; renditions were made as fast (20.8 files/s until the last)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the lowest nice value instead
        try:
            os.nice(19)
        except OSError:
            pass
    threading.Thread(target=_end_with, args=(gateway_pid,), name="gateway-watch", daemon=True).start()
    configure_logging(log_format, log_level)


def _end_with(gateway_pid: int) -> None:
    while os.getppid() == gateway_pid:
        time.sleep(WATCH_SECONDS)
    os._exit(0)


WATCH_SECONDS = 1.0  # how long a worker may outlive its gateway
