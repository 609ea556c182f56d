"""The audit chain's reach, anchored outside the database: a small keyed file beside the audit key.

The head row catches records cut off the end of the chain, but whoever can write to the
database can also delete every audit row, head included, and the trail then looks never
started; or put back an older, consistent copy of the trail. The anchor file remembers,
outside the database, which trail this database had (its genesis id) and how far it
reached (last seq and hash), under an HMAC with the audit key; store.audit.verify()
compares the database with it.

- One file per database: its name carries a hash of the database URL without the
  password, so a data dir pointed at a new, empty database gets a new anchor (no false
  wipe), while the same database wiped finds its old one.
- Written only after the transaction that appended the records committed (session hooks,
  install_hooks below): an anchor ahead of the database would be a false alarm.
- Never backwards: under a file lock the writer reads the file and only writes a higher seq
  of the same trail, so the server and CLI processes sharing the data dir cannot rewind it.
  It never replaces a different trail's anchor either: that is the evidence of a wipe.
- Only onwards along the same chain: each appending transaction also reads the anchored
  record back (a subquery of the statement that locks the head, so no extra round trip) and
  hands the anchor that answer with its new head; the anchor moves only from the state that
  transaction saw intact. If the anchored record is gone or has another hash, the trail was
  cut back and appended to again, and the anchor stays put: otherwise a cut (to the genesis,
  or to a head row saved earlier) would be laundered once the gateway had appended past the
  anchored seq. A transaction that checked an older anchor than the file now holds (another
  process moved it meanwhile) does not move it; the next one checks against the new one.
  (Reading the record back on the writer thread's own connection instead measured ~15 %
  lower HL7 throughput.)
- Atomic: temp file, fsync, rename.
- Off the caller's thread: the commit hook only records the newest committed head (~1 us);
  a background thread writes it at most every INTERVAL seconds. Writing the file costs
  ~0.35 ms (lock, read, temp file, fsync, rename): written in the commit hook it cut
  bench/hl7_throughput.py from ~880 to ~600 msg/s on one connection and from ~2,050 to
  ~1,600 on eight. As built, the anchor costs ~5-10 us CPU per committing transaction in all
  (hooks, note, the writer thread's share), ~1 % of an ADT message. The anchor may lag the
  database by up to INTERVAL (after a crash, by the last unwritten INTERVAL): a lag is safe,
  it only narrows what the anchor can tell (records committed within it and then cut are
  not vouched for); flush() and close() write at once.

Someone who can write to DATA_DIR can read the audit key too; the anchor, like the key,
protects against those who can reach only the database.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

log = logging.getLogger("clinphoto.audit")

INTERVAL = 0.05  # seconds between anchor writes under load (the anchor's lag at most)

# session.info keys: the Database's anchor, and the head appended in the open transaction
ANCHOR = "audit_anchor"
PENDING = "audit_anchor_pending"


class AnchorState(NamedTuple):
    trail: str  # the trail's genesis id (the hash its first record chains from)
    seq: int
    hash: str


class AnchorError(Exception):
    """The anchor file exists but cannot be read, or does not match its keyed hash."""


class AnchorUpdate(NamedTuple):
    """A committed head, with what its transaction saw of the anchored record."""

    state: AnchorState
    base: AnchorState | None  # the anchored state the transaction checked against (None: none known)
    intact: bool  # base's record was in the transaction's view with base's hash


def database_id(url: str) -> str:
    """The database URL without its password (SQLite paths made absolute): what an anchor is kept per."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        database = str(Path(database).resolve())
    # rebuilt without the password: a new password is the same database
    return URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, database,
                      parsed.query).render_as_string(hide_password=False)


def anchor_path(directory: Path, url: str) -> Path:
    digest = hashlib.sha256(database_id(url).encode()).hexdigest()[:16]
    return Path(directory) / f"audit-anchor-{digest}.json"


def _mac(key: bytes, database: str, state: AnchorState) -> str:
    text = f"anchor:{database}:{state.trail}:{state.seq}:{state.hash}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


# every live anchor, so a process exiting or forking can flush or reset them
_ANCHORS: weakref.WeakSet[AuditAnchor] = weakref.WeakSet()


class AuditAnchor:
    def __init__(self, path: Path, key: bytes, url: str, interval: float = INTERVAL) -> None:
        self.path = Path(path)
        self._key = key
        self._database = database_id(url)
        self.interval = interval
        self._reset()
        _ANCHORS.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # guards _pending
        self._io = threading.Lock()  # one file update at a time in this process; flush() waits for it
        self._pending: AnchorUpdate | None = None
        # the anchored state as this process last saw the file: appenders check its record is intact
        try:
            self.known: AnchorState | None = self.read()
        except AnchorError:
            self.known = None  # the writer reports it and never overwrites it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()  # problems already logged (the writer retries every interval)

    # -- reading ------------------------------------------------------------

    def read(self) -> AnchorState | None:
        """The anchored state, None when there is no file yet; AnchorError when it cannot be trusted."""
        try:
            data = json.loads(self.path.read_text())
            state = AnchorState(str(data["trail"]), int(data["seq"]), str(data["hash"]))
            mac = str(data["mac"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"audit anchor {self.path} unreadable ({type(exc).__name__})") from None
        if not hmac.compare_digest(mac, _mac(self._key, self._database, state)):
            raise AnchorError(f"audit anchor {self.path} does not match its keyed hash (edited, or another key or database)")
        return state

    # -- writing ------------------------------------------------------------

    def note(self, update: AnchorUpdate) -> None:
        """A committed head; written soon by the background thread. Hot path: called after every commit
        that appended audit records (measured ~1 us: a lock, a comparison, an Event check)."""
        with self._lock:
            pending = self._pending
            if pending is None or update.state.seq > pending.state.seq or update.state.trail != pending.state.trail:
                self._pending = update
        if not self._wake.is_set():  # the writer is idle: start it (at most once per interval)
            self._start()
            self._wake.set()

    def flush(self) -> None:
        """Write the newest noted head now (and wait for a write under way)."""
        with self._io:
            with self._lock:
                update, self._pending = self._pending, None
            if update is not None:
                self._update(update)

    def close(self) -> None:
        """Stop the writer thread and write what is left; note() starts it again if needed."""
        thread = self._thread
        if thread is not None:
            self._stop.set()
            self._wake.set()
            thread.join(10)
            self._thread = None
            self._stop.clear()
            self._wake.clear()
        self.flush()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-anchor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # let the commits of the next interval pile up: one write for all of them
            if self._stop.wait(self.interval):
                return  # close() writes what is left
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the thread die: the next commit tries again
                log.exception("audit anchor update failed")

    def _update(self, update: AnchorUpdate) -> None:
        """Under the file lock: write the new head if it continues the anchored state (see the module docstring)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._report(f"audit anchor {self.path} not written: {exc}")
            return
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # other processes sharing the data dir
            try:
                current = self.read()
            except AnchorError as exc:
                self._report(f"{exc}; not overwritten")  # it is evidence, and verify reports it
                return
            if self._moves(current, update):
                self._replace(update.state)
                current = update.state
            self.known = current
        except OSError as exc:
            self._report(f"audit anchor {self.path} not written: {exc}")
        finally:
            os.close(lock_fd)  # releases the flock

    def _moves(self, current: AnchorState | None, update: AnchorUpdate) -> bool:
        state = update.state
        if current is None:
            return True  # the first anchor of this database
        if current.trail != state.trail:
            self._report(f"audit trail started afresh in {self._database.split('@')[-1]}: the anchor holds an "
                         f"earlier trail up to record {current.seq}, which was wiped; the anchor keeps it "
                         "(clinphoto audit verify reports it)")
            return False
        if current.seq >= state.seq:
            return False  # never backwards
        if update.base != current:
            return False  # another process moved it since: the next transaction checks against that
        if not update.intact:
            self._report(f"audit anchor not moved: record {current.seq} is no longer the anchored one, so the trail "
                         "was cut back and appended to again (clinphoto audit verify reports it)")
            return False
        return True

    def _report(self, problem: str) -> None:
        if problem not in self._reported:
            self._reported.add(problem)
            log.warning("%s", problem)

    def _replace(self, state: AnchorState) -> None:
        data = {"database": self._database.split("@")[-1], **state._asdict(),
                "mac": _mac(self._key, self._database, state)}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (json.dumps(data) + "\n").encode())
            # fsync: the rename must never leave an empty anchor after a power cut (a false alarm);
            # no fsync of the folder: losing the rename only leaves the older, lower anchor
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# -- session hooks: the anchor moves only after a commit ------------------------


def _after_commit(session: Session) -> None:
    update = session.info.pop(PENDING, None)
    if update is not None:
        session.info[ANCHOR].note(update)


def committed(session: Session) -> None:
    """The after_commit hook, for a transaction committed outside SQLAlchemy's session (store.db.Writer)."""
    _after_commit(session)


def rolled_back(session: Session) -> None:
    """The rollback hook, for a transaction rolled back outside SQLAlchemy's session (store.db.Writer)."""
    _forget(session)


def _forget(session: Session, *_args) -> None:
    # rolled back (a savepoint too: its records are gone, and the transaction's head may be
    # among them): the anchor stays where it was; the next commit moves it
    session.info.pop(PENDING, None)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # however the transaction ended (Session.close without commit or rollback too), its head is
    # not carried into the session's next transaction
    if transaction.parent is None:
        session.info.pop(PENDING, None)


def install_hooks(sessions: sessionmaker) -> None:
    """Hand the head appended in a transaction to the anchor when, and only when, it commits."""
    event.listen(sessions, "after_commit", _after_commit)
    event.listen(sessions, "after_rollback", _forget)
    event.listen(sessions, "after_soft_rollback", _forget)
    event.listen(sessions, "after_transaction_end", _after_transaction_end)


def _flush_all() -> None:
    for anchor in list(_ANCHORS):
        try:
            anchor.close()
        except Exception:  # exiting: report, do not mask the exit
            log.exception("audit anchor flush at exit failed")


def _after_fork() -> None:
    # the writer thread does not exist in a child, and a lock may have been held at the fork
    for anchor in list(_ANCHORS):
        anchor._reset()


atexit.register(_flush_all)
os.register_at_fork(after_in_child=_after_fork)
