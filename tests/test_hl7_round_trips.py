"""Round trips per ADT message through the group commit, counted, on SQLite and PostgreSQL.

On PostgreSQL the count is read off the wire: libpq's trace of the kept writer connection, where every wait
for the server is a Sync (pipeline), a simple Query or a Flush sent by the client. SQLite has no round trips;
there the count is of statements (calls into the library), from the writer's own counters.
"""

from __future__ import annotations

import tempfile

import pytest
from sqlalchemy import func, select

from gateway.hl7.committer import GroupCommitter
from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import build_processor
from store import audit
from store.models import Encounter, Hl7Message, Patient
from store.statements import statements_of

MAX_ROUND_TRIPS = 4  # per message, BEGIN, the audit records and COMMIT included, on a batch of one


def msh(event: str, cid: str, structure: str = "ADT_A01") -> str:
    return f"MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301101500||ADT^{event}^{structure}|{cid}|P|2.4"


def build(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


def pid(mrn: str, family: str = "ROUND") -> str:
    return f"PID|1||{mrn}^^^RX1^MR||{family}^TRIP||19800101|F"


def pv1(visit: str) -> str:
    return f"PV1|1|I|WARD1^B^1^RX1||||C1^DOC^ONE^^^DR|||PLS||||19|||||{visit}"


# the bench's mix, one of each kind: admit (new patient + encounter), update with encounter, person update,
# a second registration under another MRN, its merge into the first, an identifier change
MESSAGES = {
    "A01 new patient and encounter": build(msh("A01", "R1"), "EVN|A01|20240301100000", pid("M1"), pv1("V1")),
    "A08 update and encounter": build(msh("A08", "R2"), "EVN|A08|20240301110000", pid("M1", "UPDATED"), pv1("V1")),
    "A31 person update": build(msh("A31", "R3", "ADT_A05"), "EVN|A31|20240301110000", pid("M1", "PERSON"), "PV1|1|N"),
    "A31 second registration": build(msh("A31", "R4", "ADT_A05"), "EVN|A31|20240301110000", pid("D1"), "PV1|1|N"),
    "A40 merge": build(msh("A40", "R5", "ADT_A39"), "EVN|A40|20240301120000", pid("M1"), "MRG|D1^^^RX1^MR"),
    "A47 identifier change": build(msh("A47", "R6", "ADT_A30"), "EVN|A47|20240301130000", pid("M2"),
                                   "MRG|M1^^^RX1^MR"),
}


class WireCount:
    """Waits for the server on the writer's kept connection, from libpq's protocol trace."""

    def __init__(self, db) -> None:
        self.db = db
        self.pg = db.dialect == "postgresql"
        self.file = tempfile.TemporaryFile()
        if self.pg:
            with db.writer().transaction() as session:  # the kept connection, traced from now on
                self.pgconn = statements_of(session).dbapi_connection.pgconn
            self._trace()

    def _trace(self) -> None:
        from psycopg import pq

        self.pgconn.trace(self.file.fileno())
        self.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def waits(self) -> int:
        """Client Sync / Query / Flush messages traced since the last call."""
        if not self.pg:
            return 0
        self.pgconn.untrace()  # flushes the trace file
        self.file.seek(0)
        lines = self.file.read().decode(errors="replace").splitlines()
        self.file.seek(0)
        self.file.truncate()
        self._trace()
        return sum(1 for line in lines if line.startswith("F\t") and line.split("\t")[2].split(" ")[0] in
                   ("Sync", "Query", "Flush"))


def counted(db, committer, processor, raws: list[bytes]) -> tuple[list, int, int]:
    """Results, round trips (writer's own count) and statements of applying `raws` as one batch."""
    writer = db.writer()
    rt0, st0 = writer.round_trips, writer.statements
    results = committer.apply_now([processor.prepare(raw, "127.0.0.1:1") for raw in raws])
    return results, writer.round_trips - rt0, writer.statements - st0


def warmed_up(db) -> tuple:
    """A processor and committer past a store's first message (which starts the audit trail and draws the first
    blocks of ids: a few round trips once)."""
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    first = build(msh("A01", "W0"), "EVN|A01|20240301100000", pid("WARM"), pv1("WARM"))
    assert committer.apply_now([processor.prepare(first)])[0].code == "AA"
    return processor, committer


def test_each_adt_message_takes_at_most_four_round_trips(db):
    processor, committer = warmed_up(db)
    wire = WireCount(db)
    wire.waits()
    for name, raw in MESSAGES.items():
        (result,), round_trips, statements = counted(db, committer, processor, [raw])
        assert result.code == "AA", (name, result.error)
        if db.dialect == "postgresql":
            on_wire = wire.waits()
            assert on_wire == round_trips, (name, on_wire, round_trips)  # the writer's count is what the wire shows
            assert round_trips <= MAX_ROUND_TRIPS, (name, round_trips)
        else:
            assert round_trips == 0
            assert statements <= 15, (name, statements)  # SQLite: calls into the library (BEGIN included), no network
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Hl7Message)) == len(MESSAGES) + 1
        assert s.scalar(select(func.count()).select_from(Patient).where(Patient.merged_into_id.is_not(None))) == 1
        assert audit.verify(s).ok


def test_a_batch_costs_two_round_trips(db):
    processor, committer = warmed_up(db)
    wire = WireCount(db)
    raws = [build(msh("A01", f"B{k}"), "EVN|A01|20240301100000", pid(f"P{k}"), pv1(f"W{k}")) for k in range(8)]
    wire.waits()
    results, round_trips, _statements = counted(db, committer, processor, raws)
    assert [r.code for r in results] == ["AA"] * 8
    if db.dialect == "postgresql":
        assert wire.waits() == round_trips
        # every message's reads, then every write with the audit records (after the head the writer's last commit
        # left, guarded) and COMMIT
        assert round_trips == 2, round_trips
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Encounter)) == 8 + 1


def test_a_batch_after_another_writer_appended_reads_the_audit_head(db, monkeypatch):
    """Another writer appends to the audit trail between two group commits: the second expected the head its
    first left, so its guarded head update aborts it (AuditHeadMoved) and it is applied again reading the head;
    nothing is lost or stored twice and the chain verifies. The next group commit (READ_AFTER_MOVE of them) reads
    the head too, then the head is expected again."""
    monkeypatch.setattr(audit, "READ_AFTER_MOVE", 1)
    processor, committer = warmed_up(db)
    wire = WireCount(db)
    with db.write() as s:
        audit.append(s, audit.AuditEntry(type_code=audit.QUERY, action="E", agent_who="someone-else"))
    raws = [build(msh("A01", f"H{k}"), "EVN|A01|20240301100000", pid(f"H{k}"), pv1(f"HV{k}")) for k in range(3)]
    wire.waits()
    results, round_trips, _statements = counted(db, committer, processor, raws)
    assert [r.code for r in results] == ["AA"] * 3
    if db.dialect == "postgresql":
        # the guarded attempt (2) and its ROLLBACK, then reads, the head, the records with COMMIT (3: the writer
        # counts committed transactions only)
        assert wire.waits() == 2 + 1 + 3
        assert round_trips == 3, round_trips
        for name, expected in (("A08 update and encounter", 3), ("A31 person update", 2)):
            (again,), round_trips, _statements = counted(db, committer, processor, [MESSAGES[name]])
            assert again.code == "AA" and round_trips == expected, (name, round_trips)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Hl7Message)) == 1 + len(raws) + 2 * (db.dialect == "postgresql")
        assert s.scalar(select(func.count()).select_from(Encounter)) == 1 + len(raws) + (db.dialect == "postgresql")
        report = audit.verify(s)
        assert report.ok, report


def test_a_change_refused_after_it_wrote_is_undone_and_its_batch_kept(db):
    """An admission whose visit number is another patient's: refused (AE 205) after the new patient was written.
    On PostgreSQL there is no savepoint in the pipeline: the batch is redone on an ordinary transaction."""
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    first = build(msh("A01", "C1"), "EVN|A01|20240301100000", pid("OWNER"), pv1("SHARED"))
    good = build(msh("A01", "C2"), "EVN|A01|20240301100000", pid("GOOD"), pv1("OWN"))
    clash = build(msh("A01", "C3"), "EVN|A01|20240301100000", pid("INTRUDER"), pv1("SHARED"))
    results = committer.apply_now([processor.prepare(r) for r in (first, good, clash)])
    assert [r.code for r in results] == ["AA", "AA", "AE"]
    assert b"|205^" in results[2].ack
    with db.read() as s:
        names = set(s.scalars(select(Patient.id)))
        assert len(names) == 2  # OWNER and GOOD; INTRUDER's registration undone with its refused admission
        assert s.scalar(select(func.count()).select_from(Hl7Message)) == 3
        assert audit.verify(s).ok


@pytest.mark.parametrize("backend", ["postgresql"])  # a dropped server connection is PostgreSQL's
def test_the_writer_recovers_when_the_database_drops_its_connection(db):
    from sqlalchemy import text

    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    assert committer.apply_now([processor.prepare(MESSAGES["A01 new patient and encounter"])])[0].code == "AA"
    with db.writer().transaction() as session:
        backend = statements_of(session).now("SELECT pg_backend_pid()").one()[0]
    with db.write() as s:
        s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    result = committer.apply_now([processor.prepare(MESSAGES["A08 update and encounter"])])[0]
    assert result.code == "AA"  # stored on a fresh connection, not answered "not stored"
    again = committer.apply_now([processor.prepare(MESSAGES["A31 person update"])])[0]
    assert again.code == "AA"
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Hl7Message)) == 3


# Messages that depend on one another: each must see what the ones before it in its batch wrote, although the
# batch's reads were all asked for before any of them wrote (gateway.core.patients.Change).
DEPENDENT = [
    build(msh("A01", "D1"), "EVN|A01|20240301100000", pid("X1"), pv1("XV1")),
    build(msh("A08", "D2"), "EVN|A08|20240301110000", pid("X1", "CHANGED"), pv1("XV1")),  # the patient just made
    build(msh("A01", "D1"), "EVN|A01|20240301100000", pid("X1"), pv1("XV1")),  # a resend of the first
    build(msh("A01", "D3"), "EVN|A01|20240301100000", "PID|1||X1^^^RX1^MR~Y9^^^RX2^MR||X^ONE", pv1("XV2")),
    build(msh("A31", "D4", "ADT_A05"), "EVN|A31|20240301110000", pid("DUP1"), "PV1|1|N"),
    build(msh("A08", "D4B"), "EVN|A08|20240301113000", pid("DUP1"), pv1("XV3")),  # the duplicate's own visit
    build(msh("A40", "D5", "ADT_A39"), "EVN|A40|20240301120000", pid("X1"), "MRG|DUP1^^^RX1^MR"),
    build(msh("A08", "D5B"), "EVN|A08|20240301123000", pid("X1", "SURVIVOR"), pv1("XV3")),  # the visit the merge moved
    build(msh("A08", "D6"), "EVN|A08|20240301130000", pid("DUP1", "MERGED"), pv1("XV1")),  # about the merged record
    build(msh("A01", "D7"), "EVN|A01|20240301100000", pid("Z1"), pv1("XV2")),  # a visit another patient holds
    build(msh("A47", "D8", "ADT_A30"), "EVN|A47|20240301140000", pid("X2"), "MRG|X1^^^RX1^MR"),
    build(msh("A08", "D9"), "EVN|A08|20240301150000", pid("X2", "RENAMED"), pv1("XV1")),
]


def _state(db) -> tuple:
    from store.models import PatientIdentifier

    with db.read() as s:
        patients = sorted((p.family_name, p.merged_into_id is not None) for p in s.scalars(select(Patient)))
        identifiers = sorted(s.execute(select(PatientIdentifier.system, PatientIdentifier.value)).all())
        encounters = sorted(s.execute(select(Encounter.visit_number, Encounter.status, Patient.family_name)
                                      .join(Patient, Patient.id == Encounter.patient_id)).all())
        assert audit.verify(s).ok
    return patients, identifiers, encounters


@pytest.mark.parametrize("refusal", [False, True], ids=["all-applied", "with-a-refusal-after-writing"])
def test_a_batch_of_dependent_messages_ends_as_one_by_one(db, tmp_path, refusal):
    """Without the refusal the batch commits on the kept, pipelined connection; with it (D7 registers a patient, then
    its visit is refused) on PostgreSQL the batch is redone on an ordinary transaction."""
    from store.audit import load_or_create_key
    from store.db import Database
    from store.migrate import upgrade

    messages = DEPENDENT if refusal else [m for m in DEPENDENT if b"|D7|" not in m]
    processor = build_processor(Hl7Settings())
    committed = db.writer().transactions
    batched = GroupCommitter(db, processor).apply_now([processor.prepare(r) for r in messages])
    if not refusal or db.dialect == "sqlite":
        assert db.writer().transactions == committed + 1  # the fast path went through
    # the same messages one at a time, on a second store of the same kind
    other_url = (f"sqlite:///{tmp_path / 'one-by-one.db'}" if db.dialect == "sqlite" else None)
    if other_url is None:
        from tests.conftest import _PgSchema, postgres_url

        schema = _PgSchema(postgres_url())
        other_url = f"{schema.url}{'&' if '?' in schema.url else '?'}options=-csearch_path%3D{schema.name}"
    else:
        schema = None
    other = Database(other_url, audit_key=load_or_create_key(tmp_path / "k2"), audit_anchor_dir=tmp_path / "a2")
    try:
        upgrade(other)
        single = GroupCommitter(other, processor)
        one_by_one = [single.apply_now([processor.prepare(r)])[0] for r in messages]
        assert [(r.code, r.duplicate) for r in batched] == [(r.code, r.duplicate) for r in one_by_one]
        assert [r.error for r in batched] == [r.error for r in one_by_one]
        assert _state(db) == _state(other)
    finally:
        other.dispose()
        if schema is not None:
            schema.drop()


@pytest.mark.parametrize("backend", ["postgresql"])  # prepared statements and generic plans are PostgreSQL's
def test_the_identifier_look_up_is_an_index_probe_on_a_young_store(db):
    """A prepared statement keeps the generic plan it got on a table of a page or two (a sequential scan) until the
    table is analysed again: the writer plans index probes only, and gives its connection back as it found it."""
    processor, committer = warmed_up(db)
    for k in range(8):  # a table of a few rows, past the writer's and the server's prepare thresholds
        raw = build(msh("A01", f"Y{k}"), "EVN|A01|20240301100000", pid(f"Y{k}"), pv1(f"YV{k}"))
        assert committer.apply_now([processor.prepare(raw)])[0].code == "AA"
    with db.writer().transaction() as session:
        plan = [row[0] for row in statements_of(session).now(
            "EXPLAIN SELECT i.id FROM patient_identifiers i WHERE (i.system = ? AND i.value = ?) OR (i.system = ? AND "
            "i.value = ?)", ("a", "b", "c", "d")).rows()]
    assert not any("Seq Scan" in line for line in plan), plan
    db.writer().close()
    with db.engine.connect() as conn:  # the pool's other users plan as usual
        assert conn.exec_driver_sql("SHOW enable_seqscan").scalar() == "on"
