"""Engine and transactions for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from store import audit, audit_anchor
from store.audit_anchor import ANCHOR, AuditAnchor, anchor_path, install_hooks
from store.statements import IDS, STATEMENTS, IdPool, Statements, Wire

log = logging.getLogger("clinphoto.store")

# session.info key of Database.shared
SHARED = "clinphoto_shared"

SUPPORTED_DIALECTS = ("sqlite", "postgresql")
BUSY_TIMEOUT = 30.0  # seconds a SQLite writer waits for the write lock (PRAGMA busy_timeout, and the turnstile below)


class DatabaseUrlError(ValueError):
    pass


def check_url(url: str) -> str:
    """Return the dialect name of a supported database URL, or raise DatabaseUrlError."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a long text
        raise DatabaseUrlError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise DatabaseUrlError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///PATH or postgresql+psycopg://..."
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() not in ("psycopg",):
        raise DatabaseUrlError("PostgreSQL URLs must use the psycopg 3 driver: postgresql+psycopg://...")
    return parsed.get_backend_name()


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss before we acknowledge anything.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        options = conn.get_execution_options()
        if options.get("clinphoto_own_begin"):
            return  # a Writer's connection: it sends BEGIN IMMEDIATE itself, without SQLAlchemy's execution path
        # Writers take the write lock up front: a deferred transaction that reads
        # and then writes can fail with SQLITE_BUSY when another writer got in between.
        mode = "IMMEDIATE" if options.get("clinphoto_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_session_settings(dbapi_connection, _record) -> None:
    # JIT compilation costs more than it saves on our short policy-filtered queries
    # (measured: a count over 50,000 photos 261 ms with JIT, 48 ms without).
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET jit = off")
    dbapi_connection.commit()


class Database:
    def __init__(self, url: str, audit_key: bytes | None = None, audit_anchor_dir: Path | None = None) -> None:
        self.url = url
        # the audit trail's HMAC key; sessions carry it so store.audit can append and verify
        self.audit_key = audit_key
        self.dialect = check_url(url)
        # the chain's reach kept outside the database, in a keyed file per database beside the key
        # (store.audit_anchor); without a folder, a wiped trail cannot be told from a new one
        self.audit_anchor = (AuditAnchor(anchor_path(audit_anchor_dir, url), audit_key, url)
                             if audit_anchor_dir is not None and audit_key else None)
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(url)
        else:
            # hide_parameters: error texts must not quote patient identifiers into the logs
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)
            event.listen(self.engine, "connect", _postgres_session_settings)
        self.ids = IdPool() if self.dialect == "postgresql" else None
        # values the gateway sets once for helpers that are handed only a session (the core's patient references
        # read the trust's MRN system here); one dict, shared by reference, so a writer's kept session sees them too
        self.shared: dict[str, Any] = {}
        self._sessions = sessionmaker(self.engine, expire_on_commit=False,
                                      info={"audit_key": audit_key, ANCHOR: self.audit_anchor, IDS: self.ids,
                                            SHARED: self.shared})
        if self.audit_anchor is not None:
            install_hooks(self._sessions)
        self._writer: Writer | None = None
        self._audit_writer: Writer | None = None
        self._writer_lock = threading.Lock()
        # SQLite: this process's writers take turns here before BEGIN IMMEDIATE. Left to SQLite, a writer that
        # finds the lock held sleeps in its busy handler's steps (1, 2, 5, 10 ms...) however soon the lock is
        # free: a C-STORE's transaction waiting behind a rendition's commit lost up to 8 ms (py-spy: a tenth of
        # the association thread's samples in BEGIN). Here the next writer goes the moment the last commits (12-MP
        # C-STORE on one association, renditions made meanwhile: 38.0 against 36.0 files/s, mean of three noisy
        # runs each); other processes (the CLI) are still kept out by SQLite's own lock.
        self.turnstile = threading.Lock() if self.dialect == "sqlite" else None

    @contextmanager
    def writing_turn(self) -> Iterator[None]:
        """SQLite: this process's turn to write (see turnstile); PostgreSQL: nothing to wait for."""
        if self.turnstile is None:
            yield
            return
        if not self.turnstile.acquire(timeout=BUSY_TIMEOUT):
            raise OperationalError("BEGIN IMMEDIATE", None,
                                   sqlite3.OperationalError(f"database is locked (this process's writers, {BUSY_TIMEOUT:.0f} s)"))
        try:
            yield
        finally:
            self.turnstile.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads; whatever it did is rolled back at exit."""
        with self._sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A Core connection for reads that need no ORM objects, in one transaction (one snapshot), rolled back at
        exit. An ORM session's begin, rollback and close around a C-FIND's two statements cost ~0.2 ms of CPU,
        a third of the query's (SQLite, in process)."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction, committed (durably) on clean exit, rolled back on error."""
        with self.writing_turn(), self._sessions() as session:
            session.connection(execution_options={"clinphoto_write": True})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def writer(self) -> Writer:
        """The Database's kept-connection writer (one per Database; see Writer)."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = Writer(self)
            return self._writer

    def audit_writer(self) -> Writer:
        """A second kept-connection writer, for transactions that only append audit records (a query's, a read's):
        its own connection, so they never queue behind an HL7 group commit. A C-FIND's audit on it, SQLite, in
        process: ~0.08 ms less CPU than a transaction of its own (Database.write); on PostgreSQL one round trip
        (BEGIN, the guarded head, the records and COMMIT pipelined) instead of four."""
        with self._writer_lock:
            if self._audit_writer is None:
                self._audit_writer = Writer(self)
            return self._audit_writer

    def session(self, **kw: Any) -> Session:
        """A session of this Database's kind (its audit key, anchor hooks and id pool), e.g. bound to a Connection."""
        return self._sessions(**kw)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        for writer in (self._writer, self._audit_writer):
            if writer is not None:
                writer.close()
        if self.audit_anchor is not None:
            self.audit_anchor.close()  # what was committed reaches the anchor file before we go
        self.engine.dispose()


class WriterBusy(Exception):
    """Writer.transaction(wait=False): another thread's transaction holds the kept connection."""


class Writer:
    """A writer thread's own connection, kept between its transactions (the HL7 group commit).

    Each group commit used to check a connection out of the pool and back: SQLAlchemy's pre-ping (a
    round trip) and the pool's bookkeeping, for every batch. Here the connection stays. On PostgreSQL
    it has autocommit on and each transaction runs in libpq's pipeline mode (store.statements.Wire), with
    BEGIN and COMMIT ours, queued with the statements: BEGIN rides with the first statements and COMMIT
    with the last (its sync returns when the commit is durable). A transaction that fails is rolled
    back; a connection found broken is dropped and the next transaction checks out a fresh one
    (pre-pinged by the pool).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pg = db.dialect == "postgresql"
        self._lock = threading.Lock()  # one transaction at a time (the writer thread; tests call in directly)
        self._conn: Connection | None = None
        self._wire: Wire | None = None  # PostgreSQL: the kept connection's pipeline (store.statements)
        self._cursor: Any = None  # SQLite: the kept connection's cursor
        self._session: Session | None = None
        self.transactions = 0
        self.statements = 0  # totals over committed transactions, for benches and tests
        self.round_trips = 0

    def _connect(self) -> Connection:
        conn = self._db.engine.connect()
        dbapi: Any = conn.connection.dbapi_connection
        if self._pg:
            dbapi.autocommit = True
            # Every statement of the writer is a keyed look-up or write. A prepared statement keeps the generic plan
            # it got when first planned until its tables are analysed again: planned on a young table (a fresh
            # store, a page or two) that is a sequential scan, and the identifier look-up read every identifier
            # of the store per message until autovacuum came by (bench/hl7_throughput.py on a fresh store:
            # 2,552 scans of patient_identifiers reading 3.25 million rows in 3,000 messages). Index plans only.
            dbapi.execute("SET enable_seqscan = off")
            self._wire = Wire(dbapi)
            return conn
        self._cursor = dbapi.cursor()
        return conn.execution_options(clinphoto_own_begin=True)  # SQLite: our BEGIN IMMEDIATE, see transaction()

    @contextmanager
    def transaction(self, *, wait: bool = True) -> Iterator[Session]:
        """One transaction on the kept connection, committed durably on clean exit, rolled back on error.
        wait=False: WriterBusy at once when another thread's transaction holds the connection."""
        if not self._lock.acquire(blocking=wait):
            raise WriterBusy
        try:
            if self._conn is None or self._conn.invalidated or self._conn.closed:
                self._drop()
                self._conn = self._connect()
            conn, wire = self._conn, self._wire
            statements = Statements(conn.connection.dbapi_connection, self._pg, wire, pinned=True, cursor=self._cursor)
            session = self._session_for(conn)
            session.info[STATEMENTS] = statements
            try:
                if wire is not None:
                    # PostgreSQL: BEGIN and COMMIT are ours and the session only carries the transaction's state
                    # (session.info); SQLAlchemy's begin and commit around it cost ~60 us of CPU a transaction
                    # (128 -> 55 us for BEGIN, SELECT 1, COMMIT), so its commit hook is called directly
                    wire.begin()
                    statements.run("BEGIN")
                    yield session
                    statements.run("COMMIT")
                    statements.sync()
                    wire.end()
                    audit_anchor.committed(session)
                else:
                    with self._db.writing_turn():
                        session.connection()  # SQLAlchemy's own transaction state; it sends nothing (see _on_begin)
                        statements.run("BEGIN IMMEDIATE")  # the write lock up front, as Database.write() takes it
                        yield session
                        session.commit()  # sqlite3's COMMIT, and the session's hooks (audit anchor)
                audit.transaction_ended(session, committed=True)
            except BaseException as exc:
                self._abandon(session, isinstance(exc, audit.AuditHeadMoved))
                raise
            finally:
                statements.done()
                session.info.pop(STATEMENTS, None)
            self.transactions += 1
            self.statements += statements.statements
            self.round_trips += statements.round_trips
        finally:
            self._lock.release()

    def _session_for(self, conn: Connection) -> Session:
        """One session for the kept connection, across its transactions (~30 us a transaction saved)."""
        if self._session is None or self._session.bind is not conn:
            if self._session is not None:
                self._session.close()
            self._session = self._db.session(bind=conn)
        return self._session

    def _abandon(self, session: Session, head_moved: bool = False) -> None:
        audit.transaction_ended(session, committed=False, moved=head_moved)
        try:
            if self._wire is not None and self._conn is not None:
                audit_anchor.rolled_back(session)
                self._wire.abort()  # out of pipeline mode, where psycopg can send its ROLLBACK
                self._conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]  # if one is open
            else:
                session.rollback()
            healthy = self._healthy()
        except Exception:
            log.debug("writer connection rollback failed", exc_info=True)
            healthy = False
        if not healthy:
            self._drop()

    def _healthy(self) -> bool:
        conn = self._conn
        if conn is None or conn.invalidated or conn.closed:
            return False
        if not self._pg:
            return True
        dbapi: Any = conn.connection.dbapi_connection
        return not dbapi.closed and dbapi.info.transaction_status == 0  # psycopg TransactionStatus.IDLE

    def _detach(self) -> Connection | None:
        """Let go of the kept session, connection, pipeline and cursor; the connection."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
        conn, self._conn = self._conn, None
        self._wire, self._cursor = None, None
        return conn

    def _drop(self) -> None:
        conn = self._detach()
        if conn is None:
            return
        try:
            conn.invalidate()
        except Exception:
            log.debug("dropping the writer connection", exc_info=True)

    def close(self) -> None:
        """Give the connection back (the Database is closing, or the writer thread stopped)."""
        with self._lock:
            pg = self._pg
            conn = self._detach()
            if conn is None:
                return
            try:
                if pg:
                    dbapi: Any = conn.connection.dbapi_connection
                    dbapi.execute("RESET enable_seqscan")  # the pool's other users plan as usual
                    dbapi.autocommit = False
                conn.close()
            except Exception:
                log.debug("closing the writer connection", exc_info=True)
                conn.invalidate()
