"""A started audit trail cannot be made to look empty, shorter or new without the audit key.

The database holds the chain, its keyed head and its keyed genesis record; the anchor file
beside the audit key (outside the database) remembers which trail this database had and
how far it reached. Each test wipes or cuts the trail the way someone with only database
access could, and `verify` must call it broken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import delete, update

from gateway.core.context import Gateway
from gateway.settings import Settings
from store import audit
from store.audit_anchor import AnchorUpdate, AuditAnchor, anchor_path
from store.db import Database
from store.models import AuditEvent, AuditHead
from tests.conftest import _PgSchema, postgres_url

REPO = Path(__file__).resolve().parent.parent


def _fill(db: Database, n: int = 10, who: str = "user") -> None:
    with db.write() as s:
        audit.append_many(s, [audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who=f"{who}{i}", detail={"i": i})
                              for i in range(n)])
    # what a clean shutdown does (Database.dispose): the anchor holds every committed record
    db.audit_anchor.flush()


def _verify(db: Database) -> audit.VerifyReport:
    with db.read() as s:
        return audit.verify(s)


def _wipe(db: Database) -> None:
    with db.write() as s:
        s.execute(delete(AuditEvent))
        s.execute(delete(AuditHead))


def _anchored(db: Database) -> audit.AnchorState | None:
    return AuditAnchor(db.audit_anchor.path, db.audit_key, db.url).read()


def test_intact_trail_is_anchored(db):
    _fill(db)
    report = _verify(db)
    assert report.ok and report.checked == 10 and report.anchored_seq == 10


def test_wipe_of_events_and_head_detected(db):
    _fill(db)
    _wipe(db)
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 1
    assert "records 1..10 missing" in report.reason and "wiped" in report.reason


@pytest.mark.parametrize("rows", ["head row", "every head-table row"])
def test_wipe_with_head_reset_to_initial_values_detected(db, rows):
    _fill(db)
    with db.write() as s:
        s.execute(delete(AuditEvent))
        reset = update(AuditHead).values(seq=0, hash=audit.GENESIS_HASH, mac="")
        s.execute(reset.where(AuditHead.id == 1) if rows == "head row" else reset)
    report = _verify(db)
    assert not report.ok and "records 1..10 missing" in report.reason


def test_head_reset_detected_without_an_anchor(db, database_url, audit_key):
    """Even where no anchor is configured, a reset head is not a never-started trail."""
    _fill(db)
    with db.write() as s:
        s.execute(delete(AuditEvent))
        s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=0, hash=audit.GENESIS_HASH, mac=""))
    bare = Database(database_url, audit_key=audit_key)
    with bare.read() as s:
        report = audit.verify(s)
    bare.dispose()
    assert not report.ok and "head" in report.reason


def test_genesis_record_deleted_detected(db):
    _fill(db, 3)
    with db.write() as s:
        s.execute(delete(AuditHead).where(AuditHead.id == 0))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 1 and "genesis" in report.reason


@pytest.mark.parametrize("again", [3, 15])
def test_restart_after_wipe_stays_broken(db, settings, again):
    """The gateway restarting on the wiped database starts a new trail; it must not pass for the old one,
    neither while shorter than the anchored trail nor once longer."""
    _fill(db)
    _wipe(db)
    restarted = Gateway.open(settings)
    try:
        _fill(restarted.db, again, who="after")
        report = _verify(restarted.db)
    finally:
        restarted.close()
    assert not report.ok and report.first_bad_seq == 1
    assert "started afresh" in report.reason and "wiped" in report.reason
    # the anchor still names the trail that was wiped
    assert _anchored(db).seq == 10


def test_old_consistent_state_restored_detected(db):
    """Records cut off the end with the head put back to a keyed value it once had (a restored
    backup, or a head row saved earlier): head and chain agree, only the anchor knows better."""
    _fill(db, 5)
    with db.read() as s:
        saved = s.get(AuditHead, 1)
        s.expunge(saved)
    _fill(db, 5)
    with db.write() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq > 5))
        s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=saved.seq, hash=saved.hash, mac=saved.mac))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 6 and "records 6..10 missing" in report.reason


def _cut_back_to_genesis(db: Database) -> None:
    """Every record deleted, the genesis record kept, the head reset: the appender continues the same trail id."""
    with db.write() as s:
        s.execute(delete(AuditEvent))
        s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=0, hash=audit.GENESIS_HASH, mac=""))


def _cut_back_to_a_saved_head(db: Database, saved: AuditHead) -> None:
    with db.write() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq > saved.seq))
        s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=saved.seq, hash=saved.hash, mac=saved.mac))


@pytest.mark.parametrize("cut", ["to the genesis record", "to a saved head"])
def test_cut_trail_appended_past_the_anchor_stays_broken(db, settings, cut):
    """A trail cut back and appended to again by the gateway, until it is longer than the anchored one:
    the anchor must not move on to the new records, or the cut would be laundered."""
    _fill(db, 5)
    with db.read() as s:
        saved = s.get(AuditHead, 1)
        s.expunge(saved)
    _fill(db, 5)
    if cut == "to the genesis record":
        _cut_back_to_genesis(db)
    else:
        _cut_back_to_a_saved_head(db, saved)
    restarted = Gateway.open(settings)
    try:
        for _ in range(3):
            _fill(restarted.db, 4, who="after")
        report = _verify(restarted.db)
    finally:
        restarted.close()
    assert not report.ok and report.first_bad_seq == 10
    assert "record 10 is not the anchored one" in report.reason
    assert _anchored(db).seq == 10


def test_edited_anchor_detected(db):
    _fill(db, 4)
    path = db.audit_anchor.path
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, seq=2)))
    report = _verify(db)
    assert not report.ok and "anchor" in report.reason


def test_new_empty_database_with_the_same_data_dir_is_fine(db, settings, backend, tmp_path):
    """The data dir pointed at another, empty database: no wipe, a new trail with its own anchor."""
    _fill(db)
    schema = _PgSchema(postgres_url()) if backend == "postgresql" else None
    other_url = (f"{schema.url}{'&' if '?' in schema.url else '?'}options=-csearch_path%3D{schema.name}" if schema
                 else f"sqlite:///{tmp_path / 'other.db'}")
    try:
        other = Gateway.open(Settings(data_dir=settings.data_dir, database_url=other_url))
        try:
            empty = _verify(other.db)
            _fill(other.db, 2)
            started = _verify(other.db)
        finally:
            other.close()
    finally:
        if schema is not None:
            schema.drop()
    assert empty.ok and empty.checked == 0
    assert started.ok and started.checked == 2 and started.anchored_seq == 2
    assert other.db.audit_anchor.path != db.audit_anchor.path
    assert _verify(db).ok  # the first database's anchor is untouched


def test_anchor_name_keyed_by_database_not_password(tmp_path):
    a = anchor_path(tmp_path, "postgresql+psycopg://u:secret@db.example/clin")
    assert a == anchor_path(tmp_path, "postgresql+psycopg://u:rotated@db.example/clin")
    assert a != anchor_path(tmp_path, "postgresql+psycopg://u:secret@db.example/other")
    assert a.parent == tmp_path and "secret" not in a.name


def test_rolled_back_append_does_not_move_the_anchor(db):
    _fill(db, 2)
    with pytest.raises(RuntimeError), db.write() as s:
        audit.append(s, audit.AuditEntry(type_code=audit.IMPORT, action="C"))
        raise RuntimeError("the change failed")
    db.audit_anchor.flush()
    assert _anchored(db).seq == 2
    report = _verify(db)
    assert report.ok and report.checked == 2


def test_append_in_a_rolled_back_savepoint_does_not_move_the_anchor(db):
    _fill(db, 2)
    with db.write() as s:
        nested = s.begin_nested()
        audit.append(s, audit.AuditEntry(type_code=audit.IMPORT, action="C"))
        nested.rollback()
    db.audit_anchor.flush()
    assert _anchored(db).seq == 2
    assert _verify(db).ok


def test_anchor_never_goes_backwards(db):
    """Two writers (as two processes) handing over heads out of order: the file keeps the highest."""
    _fill(db, 5)
    with db.read() as s:
        trail = s.get(AuditHead, 0).hash
    first = AuditAnchor(db.audit_anchor.path, db.audit_key, db.url)
    second = AuditAnchor(db.audit_anchor.path, db.audit_key, db.url)
    at_five = _anchored(db)
    first.note(AnchorUpdate(audit.AnchorState(trail, 7, "a" * 64), base=at_five, intact=True))
    first.flush()
    second.note(AnchorUpdate(audit.AnchorState(trail, 6, "b" * 64), base=at_five, intact=True))
    second.flush()
    assert _anchored(db) == audit.AnchorState(trail, 7, "a" * 64)
    assert second.known == _anchored(db)  # it learnt where the anchor is, for its next transaction


APPENDER = r"""
import sys
from pathlib import Path
from store import audit
from store.db import Database
db = Database(sys.argv[1], audit_key=audit.load_or_create_key(sys.argv[2]), audit_anchor_dir=Path(sys.argv[2]).parent)
for i in range(int(sys.argv[3])):
    with db.write() as s:
        audit.append(s, audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who=sys.argv[4], detail={"i": i}))
    if sys.argv[5] == "every":  # the most file traffic: one anchor write per commit
        db.audit_anchor.flush()
db.dispose()
"""


def _watch(db: Database, stop: threading.Event, seen: list[int]) -> None:
    reader = AuditAnchor(db.audit_anchor.path, db.audit_key, db.url)
    while not stop.is_set():
        state = reader.read()
        if state is not None and (not seen or seen[-1] != state.seq):
            seen.append(state.seq)


def _assert_anchor_catches_up(db: Database, records: int) -> None:
    """The trail intact; the anchor may trail the last writer's final records (it moves only from the
    state a transaction checked, and another writer may have moved it since), and catches up."""
    report = _verify(db)
    assert report.ok and report.checked == records and 1 <= report.anchored_seq <= records
    _fill(db, 1)  # learns where the anchor is
    _fill(db, 1)
    report = _verify(db)
    assert report.ok and report.anchored_seq == records + 2


def test_concurrent_processes_keep_the_anchor_monotonic(db, tmp_path):
    n = 120
    _fill(db, 1)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(db, stop, seen))
    watcher.start()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, db.url, str(tmp_path / "audit.key"), str(n), who, flush], cwd=REPO)
             for who, flush in (("writer-a", "every"), ("writer-b", "batched"))]
    try:
        assert [p.wait(timeout=240) for p in procs] == [0, 0]
    finally:
        stop.set()
        watcher.join()
    assert seen == sorted(seen) and len(seen) > 1
    _assert_anchor_catches_up(db, 2 * n + 1)


def test_concurrent_threads_keep_the_anchor_monotonic(db, database_url, audit_key):
    """Two Database objects in one process (each its own anchor writer, as in two processes)."""
    _fill(db, 1)
    second = Database(database_url, audit_key=audit_key, audit_anchor_dir=db.audit_anchor.path.parent)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(db, stop, seen))

    def append(target: Database, who: str) -> None:
        for i in range(80):
            with target.write() as s:
                audit.append(s, audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who=who, detail={"i": i}))
            target.audit_anchor.flush()

    writers = [threading.Thread(target=append, args=(target, who)) for target, who in ((db, "a"), (second, "b"))]
    watcher.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    second.dispose()
    assert seen == sorted(seen)
    _assert_anchor_catches_up(db, 161)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(CLINPHOTO_DATA_DIR=str(settings.data_dir), CLINPHOTO_DATABASE_URL=settings.database_url)
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_verify_reports_a_wipe(gw):
    _fill(gw.db)
    assert _cli(gw.settings, "audit", "verify").returncode == 0
    _wipe(gw.db)
    result = _cli(gw.settings, "audit", "verify")
    assert result.returncode == 1
    assert "BROKEN" in result.stdout and "records 1..10 missing" in result.stdout


def test_cli_verify_dropped_table_is_one_line(gw):
    _fill(gw.db, 3)
    with gw.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE audit_events")
    result = _cli(gw.settings, "audit", "verify")
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert "audit_events" in output and "missing" in output


def _append_on_the_writer(db: Database, n: int, who: str) -> None:
    """Append as the HL7 group commit does: on the kept, pipelined writer, expecting the head it left last time
    (store.audit.HEAD), and once more reading the head when that head moved."""
    entries = [audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who=f"{who}{i}") for i in range(n)]
    try:
        with db.writer().transaction() as s:
            audit.append_many(s, entries)
    except audit.AuditHeadMoved:
        with db.writer().transaction() as s:
            audit.append_many(s, entries)
    db.audit_anchor.flush()


@pytest.mark.parametrize("backend", ["postgresql"])  # the pipelined writer is PostgreSQL's
@pytest.mark.parametrize("tamper", ["cut back to a saved head", "anchored record edited"])
def test_the_writer_expecting_its_head_does_not_launder_tampering(db, tamper):
    """A writer that expects the head it left reads it again when the trail was tampered with under it, so the
    anchor does not move past the tampering and verify reports it."""
    _append_on_the_writer(db, 5, "first")
    with db.read() as s:
        saved = s.get(AuditHead, 1)
        s.expunge(saved)
    _append_on_the_writer(db, 5, "second")  # on the guarded path: the head the first append left
    assert _anchored(db).seq == 10 and _verify(db).ok
    if tamper == "cut back to a saved head":
        _cut_back_to_a_saved_head(db, saved)
    else:
        with db.write() as s:
            s.execute(update(AuditEvent).where(AuditEvent.seq == 10).values(hash="0" * 64))
    for _ in range(3):
        _append_on_the_writer(db, 4, "after")
    assert _anchored(db).seq == 10  # not moved on from a trail it no longer finds intact
    report = _verify(db)
    assert not report.ok
