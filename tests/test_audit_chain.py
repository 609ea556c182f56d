"""The audit trail catches every kind of tampering, and concurrent writers keep one chain."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from store import audit
from store.models import AuditEvent, AuditHead

REPO = Path(__file__).resolve().parent.parent


def _fill(db, n=10):
    with db.write() as s:
        for i in range(n):
            audit.append(
                s,
                audit.AuditEntry(
                    type_code=audit.QUERY, action="E", agent_who=f"user{i}", purpose_of_use="TREAT",
                    patient_id=i, entities=[{"type": "asset", "id": f"a{i}"}], detail={"n": i, "ünï": "cødé"},
                ),
            )


def _verify(db):
    with db.read() as s:
        return audit.verify(s)


def test_intact_chain_verifies(db):
    _fill(db)
    report = _verify(db)
    assert report.ok and report.checked == 10


def test_empty_chain_verifies(db):
    assert _verify(db).ok


def test_edit_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 4).values(agent_who="someone-else"))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 4 and "edited" in report.reason


def test_edit_of_json_detail_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 7).values(detail={"n": 99}))
    assert _verify(db).first_bad_seq == 7


def test_delete_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(AuditEvent.__table__.delete().where(AuditEvent.seq == 5))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 5


def test_insert_detected(db):
    """Records renumbered to make room for a forged one: the forged record breaks the chain."""
    _fill(db)
    with db.write() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.seq >= 6).order_by(AuditEvent.seq.desc())).scalars().all()
        for row in rows:  # shift up, highest first, to keep the primary key unique
            s.execute(update(AuditEvent).where(AuditEvent.seq == row.seq).values(seq=row.seq + 1))
        stamp = rows[-1].recorded_at
        s.expunge_all()
        forged = AuditEvent(
            seq=6, recorded_at=stamp, type_code=audit.QUERY, action="E", outcome="0",
            agent_who="forger", entities=[], detail={}, prev_hash="f" * 64, hash="e" * 64,
        )
        s.add(forged)
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 6


def test_insert_with_recomputed_hashes_detected(db):
    """A forger who re-chains an appended record without the audit key is caught at that record."""
    _fill(db)
    with db.write() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 10).values(seq=11))
        prev = s.execute(select(AuditEvent.hash).where(AuditEvent.seq == 9)).scalar_one()
        forged = AuditEvent(seq=10, recorded_at=s.get(AuditEvent, 9).recorded_at, type_code=audit.QUERY, action="E",
                            outcome="0", agent_who="forger", entities=[], detail={}, prev_hash=prev)
        forged.hash = audit.record_hash(forged, prev, b"a guessed key, not the real one")
        s.add(forged)
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 10


def test_rewritten_chain_detected(db):
    """Editing records and recomputing every hash (plain SHA-256 or any other key) does not verify."""
    _fill(db)
    with db.write() as s:
        rows = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        prev = audit.GENESIS_HASH
        for row in rows:
            if row.seq >= 4:
                row.agent_who = "rewritten"
            row.prev_hash = prev
            row.hash = prev = audit.record_hash(row, prev, b"not the audit key")
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 1


def test_tail_deletion_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(AuditEvent.__table__.delete().where(AuditEvent.seq >= 7))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 7 and "cut off" in report.reason


def test_tail_deletion_with_head_rewound_detected(db):
    _fill(db)
    with db.write() as s:
        last = s.get(AuditEvent, 6)
        s.execute(AuditEvent.__table__.delete().where(AuditEvent.seq >= 7))
        s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=6, hash=last.hash))  # row 0 is the genesis record
    report = _verify(db)
    assert not report.ok and "head" in report.reason


def test_whole_chain_deleted_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(AuditEvent.__table__.delete())
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 1


def test_wrong_key_cannot_verify(db, database_url):
    from store.db import Database

    _fill(db, 3)
    other = Database(database_url, audit_key=b"0123456789abcdef0123456789abcdef-other")
    with other.read() as s:
        report = audit.verify(s)
    other.dispose()
    assert not report.ok and report.first_bad_seq == 1


def test_reorder_detected(db):
    _fill(db)
    with db.write() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(seq=-3))
        s.execute(update(AuditEvent).where(AuditEvent.seq == 8).values(seq=3))
        s.execute(update(AuditEvent).where(AuditEvent.seq == -3).values(seq=8))
    report = _verify(db)
    assert not report.ok and report.first_bad_seq == 3


def test_audit_rolls_back_with_the_change(db):
    _fill(db, 2)
    with pytest.raises(RuntimeError):
        with db.write() as s:
            audit.append(s, audit.AuditEntry(type_code=audit.IMPORT, action="C"))
            raise RuntimeError("the change failed")
    assert _verify(db).checked == 2


def test_cli_verify_names_first_bad_seq(gw, tmp_path):
    _fill(gw.db, 5)
    with gw.db.write() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(outcome="8"))
    env = dict(os.environ, CLINPHOTO_DATABASE_URL=gw.db.url, CLINPHOTO_DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify"], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "sequence 2" in result.stdout


APPENDER = r"""
import sys
from store import audit
from store.db import Database
db = Database(sys.argv[1], audit_key=audit.load_or_create_key(sys.argv[2]))
for i in range(int(sys.argv[3])):
    with db.write() as s:
        audit.append(s, audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who=sys.argv[4], detail={"i": i}))
"""


def test_concurrent_processes_keep_one_chain(db, tmp_path):
    """Two processes appending at once (on PostgreSQL, and on SQLite) never fork the chain."""
    n = 150
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, db.url, str(tmp_path / "audit.key"), str(n), who], cwd=REPO)
        for who in ("writer-a", "writer-b")
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    report = _verify(db)
    assert report.ok and report.checked == 2 * n
    with db.read() as s:
        assert s.execute(select(func.count(func.distinct(AuditEvent.prev_hash)))).scalar() == 2 * n


def test_odd_values_are_recorded_and_verify(db):
    """NUL bytes (refused by PostgreSQL text) and over-long texts never make an audit write fail."""
    with db.write() as s:
        audit.append(s, audit.AuditEntry(
            type_code=audit.REST, action="E", outcome=audit.MINOR_FAILURE, agent_who="x" * 500 + "\x00",
            purpose_of_use="NOT-A-PURPOSE-" * 5, outcome_desc="bad\x00input",
            entities=[{"type": "query", "query": "patient=a\x00|b"}], detail={"when": __import__("datetime").date(2026, 1, 1)},
        ))
    report = _verify(db)
    assert report.ok and report.checked == 1
    with db.read() as s:
        row = s.get(AuditEvent, 1)
        assert len(row.agent_who) == 200 and "\x00" not in row.outcome_desc
        assert row.entities == [{"type": "query", "query": "patient=a\ufffd|b"}] and row.detail == {"when": "2026-01-01"}


def test_processes_starting_together_all_read_the_one_whole_audit_key(tmp_path):
    """The key is made once, whole, by whichever starter comes first; the others read it, never a file still being
    written (CI saw one of three concurrent `clinphoto db upgrade` fail with "audit key file ... is too short")."""
    import stat
    import threading

    for round_ in range(40):
        path = tmp_path / f"k{round_}" / "audit.key"
        start = threading.Barrier(6)
        keys: list[bytes] = []
        errors: list[BaseException] = []

        def load(start: threading.Barrier = start, path: Path = path, keys: list[bytes] = keys,
                 errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                keys.append(audit.load_or_create_key(path))
            except BaseException as exc:  # collected: a thread's exception would not fail the test
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(keys)) == 1 and len(keys[0]) == 64
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no writer's own file left
