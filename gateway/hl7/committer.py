"""Group commit: one writer thread applies every pending message in one transaction.

Each transaction has a fixed cost (the durable commit, 0.2-1 ms on SQLite
depending on the disk, plus opening it and appending to the audit chain), so
committing per message caps the gateway well below the ADT targets. The writer
takes everything queued (from all connections), applies each message inside its
own SAVEPOINT, appends the audit records, commits once, and only then releases
the ACKs.

The transaction runs on the Database's Writer: a kept connection, on PostgreSQL
in pipeline mode (store.statements.Wire). Every message of the batch asks for its
reads first (one round trip for all), then each is worked out and its writes
sent without waiting (the server runs them meanwhile); then the audit records, after the head this writer's last commit left,
behind a guarded head update, with COMMIT: two round trips a batch, whatever its
size (15.4 a message before, libpq trace). When another writer appended to the
audit trail meanwhile, the guard aborts the transaction (store.audit.HEAD) and
the batch is applied again reading the head first: three round trips. A message
that reads what an earlier one in its batch wrote reads it again
(gateway.core.patients.Change). bench/hl7_throughput.py, same runs, 2 shared cores:
PostgreSQL one connection 302 -> 527 msg/s, eight 394 -> 928 (SQLite 914 -> 981
and 1,502 -> 1,847) with psycopg's pipeline mode and three round trips.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

from gateway.hl7.ack import AckError, build_ack
from gateway.hl7.pipeline import Prepared, Processor, Result
from store import audit
from store.db import Database
from store.statements import statements_of

log = logging.getLogger("clinphoto.hl7")

_STOP = object()


class GroupCommitter:
    def __init__(self, db: Database, processor: Processor, batch_max: int = 1000) -> None:
        self.db = db
        self.processor = processor
        self.batch_max = batch_max
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # held while the writer thread has a transaction open (never taken on an event loop's thread)
        self._busy = threading.Lock()
        self.batches = 0
        self.messages = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hl7-committer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish everything queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self.db.writer().close()  # its kept connection back to the pool

    async def submit(self, prepared: Prepared) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((prepared, loop, future.set_result))
        return await future

    def submit_nowait(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, done: Callable[[Result], None]) -> None:
        """Queue a message; `done(result)` is called in `loop` after the commit (callbacks keep queue order)."""
        self._queue.put((prepared, loop, done))

    def apply_now(self, batch: list[Prepared]) -> list[Result]:
        """Apply and commit synchronously (tests, reprocessing)."""
        return self._commit(batch)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = _Batch(self._queue, self.batch_max, item)
            while batch.late_joiner() is not None:
                pass
            with self._busy:
                results = self._commit([p for p, _loop, _done in batch.items], more=batch.late_joiner)
            self._wake(batch.items, results)
            if batch.stopping:
                return

    @staticmethod
    def _wake(items: list, results: list[Result]) -> None:
        # one wake-up per event loop, not one per message
        by_loop: dict = {}
        for (_p, loop, done), result in zip(items, results):
            by_loop.setdefault(loop, []).append((done, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, pairs)
            except RuntimeError:  # that event loop has closed: its connections are gone
                log.warning("%d HL7 result(s) committed for a closed connection", len(pairs))

    def _commit(self, batch: list[Prepared], more: Callable[[], Prepared | None] | None = None) -> list[Result]:
        batch = list(batch)
        try:
            try:
                return self._apply(self.db.writer().transaction, batch, more)
            except audit.AuditHeadMoved:
                # another writer appended to the audit trail since our last commit: the same messages again on
                # the kept connection, reading the audit head this time (store.audit.HEAD)
                log.debug("audit head moved under the group commit; applying the batch again")
                return self._apply(self.db.writer().transaction, batch, None)
        except Exception:
            # On PostgreSQL a statement sent ahead failed and a pipeline cannot tell which (PipelineFailed), or
            # the kept connection broke: the same messages again on an ordinary transaction (a fresh pooled
            # connection), where each statement runs on its own, so a failure lands on its message (its
            # savepoint undone, AE) and the others commit.
            log.debug("group commit on the kept connection failed", exc_info=True)
        try:
            return self._apply(self.db.write, batch, None)
        except Exception as exc:
            return self._failed(batch, exc)

    def _apply(self, transaction: Callable[[], AbstractContextManager[Session]], batch: list[Prepared],
               more: Callable[[], Prepared | None] | None) -> list[Result]:
        """Apply the batch (and late joiners, appended to it) and its audit records in one transaction."""
        results: list[Result] = []
        with transaction() as session:
            todo = list(batch)
            while todo:
                # every message's reads first: on PostgreSQL they share one round trip, and the server runs the
                # writes of one message while the next is worked out here
                begun = [self.processor.begin(session, p) for p in todo]
                # each message's writes sent as soon as it is worked out (no wait), so the server runs them while
                # the next one is worked out here: 8 connections 1,062 / 1,099 -> 1,189 / 1,224 msg/s on PostgreSQL
                # (bench/hl7_throughput.py, alternate runs); one connection unchanged (sending the last message's
                # writes with the audit records and COMMIT instead was tried: no difference beyond the noise)
                push = statements_of(session).push
                for b in begun:
                    results.append(self.processor.finish(session, b))
                    push()
                todo = []  # then the messages that arrived meanwhile, together
                while more is not None and (late := more()) is not None:
                    batch.append(late)
                    todo.append(late)
            audit.append_many(session, [a for r in results for a in r.audit])
        self.batches += 1
        self.messages += len(batch)
        return results

    def _failed(self, batch: list[Prepared], exc: Exception) -> list[Result]:
        # exception texts may quote patient data (SQL parameters): the type above DEBUG, details at DEBUG
        log.debug("group commit failure", exc_info=True)
        if len(batch) > 1:
            log.warning("group commit of %d messages failed (%s); committing them one by one", len(batch),
                        type(exc).__name__)
            return [self._commit([p])[0] for p in batch]
        log.error("HL7 message %s could not be stored: %s", batch[0].control_id or "?", type(exc).__name__)
        p = batch[0]
        # nothing was stored: an AE (not AA) so the sender keeps the message and sends it again
        ack = build_ack(p.msg, "AE", [AckError("207", "application internal error: message not stored; send again")],
                        raw=p.raw, application=self.processor.settings.receiving_application,
                        facility=self.processor.settings.receiving_facility)
        return [Result(ack=ack, status="not-stored", code="AE")]


def _deliver(pairs: list[tuple[Callable[[Result], None], Result]]) -> None:
    for done, result in pairs:
        try:
            done(result)
        except asyncio.InvalidStateError:  # a waiter that was cancelled meanwhile
            pass
        except Exception:
            log.exception("delivering an HL7 result failed")


class _Batch:
    """The messages of one group commit: the first, those already queued, and those that arrive while it is
    worked out (late_joiner, called by the commit until it answers None)."""

    def __init__(self, source: queue.SimpleQueue, batch_max: int, first: Any) -> None:
        self.source, self.batch_max = source, batch_max
        self.items = [first]
        self.stopping = False  # the stop marker was taken from the queue: finish this batch, then stop

    def late_joiner(self) -> Prepared | None:
        if self.stopping or len(self.items) >= self.batch_max:
            return None
        try:
            nxt = self.source.get_nowait()
        except queue.Empty:
            return None
        if nxt is _STOP:
            self.stopping = True
            return None
        self.items.append(nxt)
        return nxt[0]
