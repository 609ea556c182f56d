"""Plain DB-API statements on a session's own connection, in as few round trips as the backend allows.

The hot writers (the HL7 group commit, the audit append) skip SQLAlchemy's statement compilation
(~100 us a statement) and talk to the driver. On PostgreSQL each statement executed on its own is
a round trip (~65 us here, half of it our own CPU); an ADT message made ~16 of them and one MLLP
connection stopped at ~300-400 msg/s. Pipelined, a group commit makes 2 or 3 (gateway/hl7/committer.py).
On a connection in pipeline mode (store.db.Writer, through `Wire`), statements are only queued:
`later()` and `run()` return at once, and `sync()` sends everything queued since the last sync and
waits once for all of it. A result is read after the sync that carried it (reading it earlier syncs
first, so a forgotten sync costs a round trip, never a wrong answer).

Elsewhere (SQLite, which has no round trips, and ordinary PostgreSQL sessions) every statement runs
at once and `sync()` does nothing, so the same code runs unchanged on both.

Pipelined statements fail late: an error surfaces at the next sync, after later statements were
skipped by the server, so it cannot be pinned on the statement that caused it. `sync()` then
raises PipelineFailed and the transaction is lost; the caller redoes its work statement by
statement (gateway/hl7/committer.py), where a failure lands where it happens. A `guard` is a
statement whose failure means something known (store.audit: the audit head moved), raised as such.

Statements are written with `?` placeholders; `%s` (psycopg's cursors) or `$n` (Wire) is substituted.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Generator, Sequence
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

    __slots__ = ("_statements", "_generation", "_result", "_waiting", "_rows", "_rowcount", "lastrowid", "failure")

    def __init__(self, statements: Statements, generation: int, waiting: bool) -> None:
        self._statements = statements
        self.failure: type[PipelineFailed] | None = None  # what its failing means, raised by its sync (guard)
        self._generation = generation
        self._waiting = waiting  # sent on a Wire, its result not read yet
        self._result: Any = None  # the libpq result a Wire's sync handed in, decoded on first read
        self._rows: list[Row] = []
        self._rowcount = -1
        self.lastrowid: int | None = None

    @classmethod
    def read_now(cls, statements: Statements, cursor: Any) -> Pending:
        pending = cls(statements, 0, False)
        pending._rowcount = cursor.rowcount
        if statements.pg:
            # the result's status, not cursor.description, which builds a Column per column (~5 us a result)
            result = cursor.pgresult
            pending._rows = cursor.fetchall() if result is not None and result.status == _TUPLES_OK else []
        else:
            pending.lastrowid = cursor.lastrowid
            pending._rows = cursor.fetchall() if cursor.description is not None else []
        return pending

    def _settle(self) -> None:
        if not self._waiting:
            return
        statements = self._statements
        if self._generation >= statements.generation:
            statements.sync()
        self._waiting = False
        result, self._result = self._result, None
        if result is not None:
            self._rowcount, self._rows = statements.wire.decode(result)  # type: ignore[union-attr]

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


_WIRES = itertools.count(1)


class Wire:
    """A PostgreSQL connection (psycopg's) driven through libpq's pipeline mode directly: store.db.Writer's.

    psycopg's own pipeline mode polls the socket and sends on every execute() and matches each result to its
    cursor in Python: ~80 us of the writer thread's CPU a statement (cProfile: 1.06 of 1.48 ms a message in a
    group commit of 8), and the server, woken for each statement, spent more too. In process (replaying the
    bench's messages, same machine, one after the other): the group commit's CPU a message 0.99 -> 0.51 ms in
    batches of one, 0.66 -> 0.25 ms in batches of eight. Here a statement is dumped (psycopg's C Transformer,
    the same adaptation psycopg makes) and appended to libpq's output buffer, and `sync()` sends everything
    and reads every result in one wait.
    Statements that recur are prepared (named per connection, as psycopg does after a few uses), so the
    server does not parse and plan them again each time.

    Between transactions the connection is out of pipeline mode, an ordinary idle psycopg connection.
    """

    PREPARE_AFTER = 2  # executions of a statement (with the same parameter types) before it is prepared
    PREPARED_MAX = 500  # prepared statements per connection; rarer shapes beyond run unprepared

    def __init__(self, dbapi_connection: Any) -> None:
        from psycopg.adapt import PyFormat, Transformer

        self.dbapi = dbapi_connection
        self.pgconn = dbapi_connection.pgconn
        self._dumper = Transformer(dbapi_connection)
        self._loader = Transformer(dbapi_connection)
        self._auto = PyFormat.AUTO
        self._queries: dict[str, bytes] = {}  # '?' statements as libpq's '$n' ones
        self._prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._seen: dict[tuple[str, tuple[int, ...]], int] = {}
        # names of its own: a connection given back to the pool keeps what it prepared, and may come back
        self._prefix = b"clinphoto_%d_" % next(_WIRES)
        self._names = 0
        # what each statement sent since the last sync answers to: its Pending, None (nobody reads it), or the
        # key of a statement being prepared
        self._slots: list[Any] = []

    @property
    def sent(self) -> int:
        return len(self._slots)

    def begin(self) -> None:
        self.pgconn.enter_pipeline_mode()

    def end(self) -> None:
        """Out of pipeline mode (everything sent must have been synced)."""
        self.pgconn.exit_pipeline_mode()

    def abort(self) -> None:
        """After a failure: read whatever is outstanding and leave pipeline mode, so psycopg can roll back."""
        from psycopg import pq

        if self.pgconn.pipeline_status == pq.PipelineStatus.OFF:
            return
        if self._slots:
            try:
                self.sync()
            except PipelineFailed:
                pass
        self.pgconn.exit_pipeline_mode()

    def send(self, sql: str, params: Params, pending: Pending | None) -> None:
        query = self._queries.get(sql)
        if query is None:
            parts = sql.split("?")
            query = "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)).encode() + parts[-1].encode()
            if len(self._queries) < 4 * self.PREPARED_MAX:
                self._queries[sql] = query
        pgconn = self.pgconn
        types: tuple[int, ...] = ()
        values, formats = None, None
        if params:
            dumper = self._dumper
            values = dumper.dump_sequence(params, [self._auto] * len(params))
            types, formats = dumper.types or (), dumper.formats
        key = (sql, types)
        name = self._prepared.get(key)
        if name is None:
            seen = self._seen.get(key, 0) + 1
            if seen >= self.PREPARE_AFTER and len(self._prepared) < self.PREPARED_MAX:
                self._names += 1
                name = self._prefix + b"%d" % self._names
                pgconn.send_prepare(name, query, param_types=types)
                self._prepared[key] = name
                self._slots.append(key)
                self._seen.pop(key, None)
            elif len(self._seen) < 4 * self.PREPARED_MAX:
                self._seen[key] = seen
        if name is not None:
            pgconn.send_query_prepared(name, values, param_formats=formats)
        else:
            pgconn.send_query_params(query, values, param_types=types, param_formats=formats)
        self._slots.append(pending)

    def push(self) -> None:
        """Send what is queued so far without waiting for it: the server works on it meanwhile."""
        if self._slots:
            self.pgconn.flush()

    def sync(self) -> None:
        """Send everything queued with a Sync and read every result: one round trip. Raises PipelineFailed when
        a statement failed (the ones after it were skipped by the server)."""
        from psycopg import errors, pq

        slots, self._slots = self._slots, []
        pgconn = self.pgconn
        try:
            pgconn.pipeline_sync()
            answers = self.dbapi.wait(_exchange(pgconn))
        except Exception as exc:  # the connection broke
            raise PipelineFailed(f"the pipeline could not be synced ({type(exc).__name__})") from exc
        failure, culprit = None, None
        fatal = pq.ExecStatus.FATAL_ERROR
        for slot, results in zip(slots, answers):
            result = results[-1] if results else None
            ok = result is not None and result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
            if type(slot) is Pending:
                slot._result = result if ok else None
            elif type(slot) is tuple and not ok:
                self._prepared.pop(slot, None)  # skipped or refused: not prepared on the server
            if not ok and failure is None and result is not None and result.status == fatal:
                failure, culprit = errors.error_from_result(result, encoding=pgconn._encoding), slot
        if len(answers) != len(slots):
            failure = failure or errors.InternalError(f"{len(answers)} results for {len(slots)} statements")
        if failure is not None:
            kind = (culprit.failure if type(culprit) is Pending else None) or PipelineFailed
            raise kind(f"a pipelined statement failed ({type(failure).__name__})") from failure

    def decode(self, result: Any) -> tuple[int, list[Row]]:
        """A statement's row count and rows."""
        if result.status != _TUPLES_OK:
            count = result.command_tuples
            return (count if count is not None else -1), []
        loader = self._loader
        loader.set_pgresult(result)
        return result.ntuples, loader.load_rows(0, result.ntuples, tuple)


def _exchange(pgconn: Any) -> Generator[Any, Any, list[list[Any]]]:
    """psycopg wait generator: flush what is queued, then every result up to the pipeline's Sync, a list of
    results per statement (the socket is waited on in C, without the GIL)."""
    from psycopg import pq
    from psycopg.waiting import READY_R, Wait

    while pgconn.flush():
        ready = yield Wait.RW
        if ready & READY_R:
            pgconn.consume_input()
    sync = pq.ExecStatus.PIPELINE_SYNC
    answers: list[list[Any]] = []
    current: list[Any] = []
    while True:
        while pgconn.is_busy():
            if (yield Wait.R):
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            answers.append(current)
            current = []
        elif result.status == sync:
            return answers
        else:
            current.append(result)


ROWS_AT_ONCE = 16  # rows of one multi-row INSERT (Statements.insert_rows): 16 shapes to prepare at most
_MULTI_ROW: dict[tuple[str, int, int], str] = {}


class Statements:
    """The statements of one transaction on one DB-API connection; counts statements and round trips."""

    def __init__(self, dbapi_connection: Any, pg: bool, wire: Wire | None = None, pinned: bool = False,
                 cursor: Any | None = None) -> None:
        self.dbapi_connection = dbapi_connection
        self.pg = pg
        self.pinned = pinned  # a Writer's: its session never changes connection
        self.wire = wire  # the connection is in pipeline mode, driven by this
        # a Writer lends its kept cursor (a psycopg cursor costs ~10 us to make); otherwise one of our own
        self._own_cursor = cursor is None and wire is None
        self._cursor: Any = dbapi_connection.cursor() if self._own_cursor else cursor
        self.generation = 0  # syncs so far
        self.statements = 0
        self.round_trips = 0  # PostgreSQL: waits for the server (SQLite has none: count statements)

    @property
    def pipelined(self) -> bool:
        return self.wire is not None

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def later(self, sql: str, params: Params = ()) -> Pending:
        """A statement whose result (rows, rowcount) is wanted: read it from the Pending."""
        self.statements += 1
        wire = self.wire
        if wire is None:
            self.round_trips += self.pg
            self._cursor.execute(self._q(sql), params)
            return Pending.read_now(self, self._cursor)
        pending = Pending(self, self.generation, True)
        wire.send(sql, params, pending)
        return pending

    def run(self, sql: str, params: Params = ()) -> None:
        """A statement whose result nobody reads (most writes)."""
        self.statements += 1
        wire = self.wire
        if wire is None:
            self.round_trips += self.pg
            self._cursor.execute(self._q(sql), params)
        else:
            wire.send(sql, params, None)

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        """One statement for many parameter rows (pipelined: sent once per row, with no wait between)."""
        self.statements += 1
        wire = self.wire
        if wire is None:
            self.round_trips += self.pg
            self._cursor.executemany(self._q(sql), rows)
        else:
            for params in rows:
                wire.send(sql, params, None)

    def insert_rows(self, head: str, rows: Sequence[Params]) -> None:
        """`head` ("INSERT INTO t (a, b)") with many rows. PostgreSQL: multi-row INSERTs of up to ROWS_AT_ONCE
        rows, each one statement for the server to plan-check, lock and run instead of one per row (a group
        commit of eight ADT messages sent ~12 audit inserts); rows keep their order. SQLite: executemany."""
        if not rows:
            return
        if not self.pg:
            self.many(f"{head} VALUES ({', '.join('?' * len(rows[0]))})", rows)
            return
        width = len(rows[0])
        for at in range(0, len(rows), ROWS_AT_ONCE):
            chunk = rows[at:at + ROWS_AT_ONCE]
            sql = _MULTI_ROW.get((head, width, len(chunk)))
            if sql is None:
                one = f"({', '.join('?' * width)})"
                sql = _MULTI_ROW[(head, width, len(chunk))] = f"{head} VALUES {', '.join([one] * len(chunk))}"
            self.run(sql, [x for row in chunk for x in row])

    def guard(self, sql: str, params: Params, failure: type[PipelineFailed]) -> None:
        """A pipelined statement whose failure means `failure`, which the sync that carries it raises (instead of
        PipelineFailed): a check sent ahead that aborts the transaction when a condition does not hold."""
        pending = self.later(sql, params)
        pending.failure = failure

    def done(self) -> None:
        """The transaction is over."""
        if self._own_cursor:
            self._cursor.close()

    def now(self, sql: str, params: Params = ()) -> Pending:
        """A statement read at once: one round trip, carrying whatever was queued before it."""
        pending = self.later(sql, params)
        self.sync()
        return pending

    def push(self) -> None:
        """Pipelined: send what is queued without waiting for it (nothing to do otherwise)."""
        if self.wire is not None:
            self.wire.push()

    def sync(self) -> None:
        """Wait for everything sent since the last sync: one round trip (nothing to do when not pipelined)."""
        wire = self.wire
        if wire is None or not wire.sent:
            return
        self.generation += 1
        self.round_trips += 1
        wire.sync()


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
