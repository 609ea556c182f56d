"""Plain DB-API statements on a session's own connection, in as few round trips as the backend allows.

The hot writers (the HL7 group commit, the audit append) skip SQLAlchemy's statement compilation
(~100 us a statement) and talk to the driver. On PostgreSQL each statement executed on its own is
a round trip (~65 us here, half of it our own CPU); an ADT message made ~16 of them and one MLLP
connection stopped at ~300-400 msg/s. Pipelined, a message makes 3 (527 msg/s in the same bench run,
gateway/hl7/committer.py). On a connection in pipeline mode (store.db.Writer), statements
are only queued: `later()` and `run()` send them and return at once, and `sync()` waits once for
everything sent since the last sync. A result is read after the sync that carried it (reading it
earlier syncs first, so a forgotten sync costs a round trip, never a wrong answer).

Elsewhere (SQLite, which has no round trips, and ordinary PostgreSQL sessions) every statement runs
at once and `sync()` does nothing, so the same code runs unchanged on both.

Pipelined statements fail late: an error surfaces at the next sync, after later statements were
skipped by the server, so it cannot be pinned on the statement that caused it. `sync()` then
raises PipelineFailed and the transaction is lost; the caller redoes its work statement by
statement (gateway/hl7/committer.py), where a failure lands where it happens.

Statements are written with `?` placeholders; `%s` is substituted for psycopg.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

Params = Sequence[Any]
Row = tuple[Any, ...]
_TUPLES_OK = 2  # libpq ExecStatus.TUPLES_OK

# session.info keys: a session's Statements, and its Database's IdPool (PostgreSQL)
STATEMENTS = "clinphoto_statements"
IDS = "clinphoto_ids"


class PipelineFailed(Exception):
    """A statement sent ahead in a pipeline failed; the transaction is lost (the cause is chained)."""


class Pending:
    """One statement's result: there at once, or after the sync that carries it (pipeline mode)."""

    __slots__ = ("_statements", "_cursor", "_generation", "_rows", "_rowcount", "lastrowid")

    def __init__(self, statements: Statements, cursor: Any, generation: int) -> None:
        self._statements = statements
        self._cursor: Any = cursor  # None once read
        self._generation = generation
        self._rows: list[Row] = []
        self._rowcount = -1
        self.lastrowid: int | None = None

    @classmethod
    def read_now(cls, statements: Statements, cursor: Any) -> Pending:
        pending = cls(statements, None, 0)
        pending._take(cursor)
        return pending

    def _take(self, cursor: Any) -> None:
        self._rowcount = cursor.rowcount
        if self._statements.pg:
            # the result's status, not cursor.description, which builds a Column per column (~5 us a result)
            result = cursor.pgresult
            self._rows = cursor.fetchall() if result is not None and result.status == _TUPLES_OK else []
        else:
            self.lastrowid = cursor.lastrowid
            self._rows = cursor.fetchall() if cursor.description is not None else []

    def _settle(self) -> None:
        cursor = self._cursor
        if cursor is None:
            return
        statements = self._statements
        if self._generation >= statements.generation:
            statements.sync()
        self._cursor = None
        self._take(cursor)
        statements.cursors.append(cursor)  # read: free for the next statement

    def rows(self) -> list[Row]:
        self._settle()
        return self._rows

    def one(self) -> Row | None:
        self._settle()
        return self._rows[0] if self._rows else None

    @property
    def rowcount(self) -> int:
        self._settle()
        return self._rowcount


class Statements:
    """The statements of one transaction on one DB-API connection; counts statements and round trips."""

    def __init__(self, dbapi_connection: Any, pg: bool, pipeline: Any | None = None, pinned: bool = False,
                 cursors: list[Any] | None = None) -> None:
        self.dbapi_connection = dbapi_connection
        self.pg = pg
        self.pinned = pinned  # a Writer's: its session never changes connection
        self._pipeline = pipeline  # a psycopg Pipeline the connection is in, or None
        # cursors of this connection free for a statement (kept by a Writer across its transactions: a psycopg
        # cursor costs ~10 us to make)
        self.cursors: list[Any] = cursors if cursors is not None else []
        self._cursor: Any = self._free_cursor()  # statements whose result nobody reads
        self.generation = 0  # syncs so far
        self._sent = 0  # statements sent since the last sync
        self.statements = 0
        self.round_trips = 0  # PostgreSQL: waits for the server (SQLite has none: count statements)

    @property
    def pipelined(self) -> bool:
        return self._pipeline is not None

    def _free_cursor(self) -> Any:
        return self.cursors.pop() if self.cursors else self.dbapi_connection.cursor()

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def later(self, sql: str, params: Params = ()) -> Pending:
        """A statement whose result (rows, rowcount) is wanted: read it from the Pending."""
        self.statements += 1
        if self._pipeline is None:
            self.round_trips += self.pg
            self._cursor.execute(self._q(sql), params)
            return Pending.read_now(self, self._cursor)
        cursor = self._free_cursor()  # its own cursor: results stay apart until read
        cursor.execute(self._q(sql), params)
        self._sent += 1
        return Pending(self, cursor, self.generation)

    def run(self, sql: str, params: Params = ()) -> None:
        """A statement whose result nobody reads (most writes)."""
        self.statements += 1
        if self._pipeline is None:
            self.round_trips += self.pg
        else:
            self._sent += 1
        self._cursor.execute(self._q(sql), params)

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        """One statement for many parameter rows (psycopg sends them in one pipeline either way)."""
        self.statements += 1
        if self._pipeline is None:
            self.round_trips += self.pg
        else:
            self._sent += 1
        self._cursor.executemany(self._q(sql), rows)

    def done(self) -> None:
        """The transaction is over: its write cursor goes back to the free ones."""
        self.cursors.append(self._cursor)

    def now(self, sql: str, params: Params = ()) -> Pending:
        """A statement read at once: one round trip, carrying whatever was queued before it."""
        pending = self.later(sql, params)
        self.sync()
        return pending

    def sync(self) -> None:
        """Wait for everything sent since the last sync: one round trip (nothing to do when not pipelined)."""
        if self._pipeline is None or not self._sent:
            return
        self._sent = 0
        self.generation += 1
        self.round_trips += 1
        try:
            self._pipeline.sync()
        except Exception as exc:
            raise PipelineFailed(f"a pipelined statement failed ({type(exc).__name__})") from exc


class IdPool:
    """Ids drawn ahead from PostgreSQL sequences, so a row's id is known before its INSERT is sent.

    With `INSERT ... RETURNING id` every insert whose id a later statement needs (a patient's
    identifiers and encounter, the audit record) would wait for the server. Ids are drawn 64 at a time
    (one round trip per 64 rows) and shared by the threads of one Database. Unused ids are gaps, as after
    any rolled-back insert; rows from two processes interleave by blocks, not one by one."""

    BLOCK = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, list[int]] = {}

    def take(self, statements: Statements, table: str) -> int:
        with self._lock:
            free = self._free.setdefault(table, [])
            if not free:
                rows = statements.now("SELECT nextval(pg_get_serial_sequence(?, 'id')) FROM generate_series(1, ?)",
                                      (table, self.BLOCK)).rows()
                free.extend(sorted((r[0] for r in rows), reverse=True))
            return free.pop()


def statements_of(session: Session) -> Statements:
    """The Statements of the session's current transaction (made on first use, on its own connection)."""
    statements: Statements | None = session.info.get(STATEMENTS)
    if statements is not None and statements.pinned:
        return statements
    conn = session.connection()
    dbapi = conn.connection.dbapi_connection
    if statements is None or statements.dbapi_connection is not dbapi:
        statements = session.info[STATEMENTS] = Statements(dbapi, conn.dialect.name == "postgresql")
    return statements
