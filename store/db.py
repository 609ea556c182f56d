"""Engine and transactions for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from store.audit_anchor import ANCHOR, AuditAnchor, anchor_path, install_hooks

SUPPORTED_DIALECTS = ("sqlite", "postgresql")


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
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: a deferred transaction that reads
        # and then writes can fail with SQLITE_BUSY when another writer got in between.
        mode = "IMMEDIATE" if conn.get_execution_options().get("clinphoto_write") else "DEFERRED"
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
        self._sessions = sessionmaker(self.engine, expire_on_commit=False,
                                      info={"audit_key": audit_key, ANCHOR: self.audit_anchor})
        if self.audit_anchor is not None:
            install_hooks(self._sessions)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads; whatever it did is rolled back at exit."""
        with self._sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction, committed (durably) on clean exit, rolled back on error."""
        with self._sessions() as session:
            session.connection(execution_options={"clinphoto_write": True})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        if self.audit_anchor is not None:
            self.audit_anchor.close()  # what was committed reaches the anchor file before we go
        self.engine.dispose()
