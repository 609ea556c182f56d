from datetime import date

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from store import patients as patient_lookup
from store.db import Database
from store.migrate import MIGRATIONS, current
from store.models import Patient, PatientIdentifier

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_migrations_reach_head(db):
    assert current(db) == head_revision()


def test_sqlite_pragmas(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_write_commits_and_error_rolls_back(db):
    with db.write() as s:
        s.add(Patient(family_name="Keep", birth_date=date(2000, 1, 1)))
    with pytest.raises(RuntimeError):
        with db.write() as s:
            s.add(Patient(family_name="Lose"))
            s.flush()
            raise RuntimeError("boom")
    with db.read() as s:
        assert s.execute(select(Patient.family_name)).scalars().all() == ["Keep"]


def test_identifier_system_value_unique(db):
    with db.write() as s:
        s.add(Patient(identifiers=[PatientIdentifier(system=NHS, value="9990000018")]))
    with pytest.raises(IntegrityError):
        with db.write() as s:
            s.add(Patient(identifiers=[PatientIdentifier(system=NHS, value="9990000018")]))
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(PatientIdentifier)).scalar() == 1


def test_foreign_keys_enforced(db):
    with pytest.raises(IntegrityError):
        with db.write() as s:
            s.add(PatientIdentifier(patient_id=999999, system=NHS, value="x"))


def test_find_patient_follows_merges(db):
    with db.write() as s:
        survivor = Patient(family_name="Survivor", identifiers=[PatientIdentifier(system=NHS, value="9990000026")])
        merged = Patient(family_name="Merged", identifiers=[PatientIdentifier(system="mrn", value="OLD1")])
        s.add_all([survivor, merged])
        s.flush()
        merged.merged_into_id = survivor.id
    with db.read() as s:
        assert patient_lookup.find_patient(s, "mrn", "OLD1").family_name == "Survivor"
        assert patient_lookup.find_patient(s, NHS, "9990000026").family_name == "Survivor"
        assert patient_lookup.find_patient(s, "mrn", "nobody") is None
        ids = [i.value for i in patient_lookup.identifiers_of(s, survivor.id)]
        assert ids == ["9990000026", "OLD1"]


def test_identifier_rows_agree_with_identifiers_of_many(db):
    """The one-statement reading (a query answer's patients) gives what the one-generation-at-a-time one gives:
    merges two deep, a merged record asked for beside its survivor (its identifiers stay its own), a patient
    without identifiers, and a merge cycle written by hand (it ends)."""
    with db.write() as s:
        p = {name: Patient(family_name=name) for name in ("top", "mid", "low", "other", "bare", "c1", "c2")}
        s.add_all(p.values())
        s.flush()
        for n, (name, system) in enumerate([("top", NHS), ("top", "mrn"), ("mid", "mrn"), ("low", "mrn"), ("low", "old"),
                                            ("other", NHS), ("c1", "mrn"), ("c2", "mrn")]):
            s.add(PatientIdentifier(patient_id=p[name].id, system=system, value=f"{name}-{n}"))
        p["mid"].merged_into_id, p["low"].merged_into_id = p["top"].id, p["mid"].id
        s.flush()
        p["c1"].merged_into_id, p["c2"].merged_into_id = p["c2"].id, p["c1"].id
    ids = {name: row.id for name, row in p.items()}
    for asked in (["top"], ["top", "mid"], ["mid", "top"], ["low", "top"], ["other", "bare", "top"], ["c1"], ["c1", "c2"], []):
        with db.read() as s:
            rows = patient_lookup.identifier_rows(s, [ids[a] for a in asked])
            orm = {patient: [(i.id, i.patient_id, i.system, i.value, i.type_code, i.assigner) for i in idents]
                   for patient, idents in patient_lookup.identifiers_of_many(s, [ids[a] for a in asked]).items()}
        assert {patient: [tuple(r) for r in found] for patient, found in rows.items()} == orm, asked
        assert list(rows) == list(orm)
    with db.read() as s:
        assert [r.value for r in patient_lookup.identifier_rows(s, [ids["top"]])[ids["top"]]] == [
            "top-0", "top-1", "mid-2", "low-3", "low-4"]


def test_models_and_migrations_agree(db):
    """Autogenerate finds nothing to do: the migration creates exactly what the models say."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from store.models import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_concurrent_first_starts_migrate_once(database_url, tmp_path):
    """Several processes starting on a fresh database at once all succeed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, CLINPHOTO_DATABASE_URL=database_url, CLINPHOTO_DATA_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outcomes = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert current(Database(database_url)) == head_revision()


def test_unknown_setting_names_are_reported(monkeypatch):
    from gateway.settings import unknown_env_names

    monkeypatch.setenv("CLINPHOTO_HTTP_PROT", "9000")
    monkeypatch.setenv("CLINPHOTO_POLICY__SPECIALTY_MATCH", "photo-only")
    monkeypatch.setenv("CLINPHOTO_CONFIG", "/x.yaml")
    assert unknown_env_names() == ["CLINPHOTO_HTTP_PROT"]


def test_migrations_run_on_a_store_holding_data(database_url):
    """Every migration upgrades a store full of rows that refer to each other (SQLite rebuilds tables in batch
    mode: with foreign keys enforced, dropping `patients` failed on any store with an encounter or a photo)."""
    from sqlalchemy import text

    from store.migrate import upgrade

    db = Database(database_url)
    upgrade(db, "0002")
    with db.engine.begin() as conn:
        for n in (1, 2):
            conn.execute(text("INSERT INTO patients (id, family_name, given_names, created_at, updated_at) "
                              "VALUES (:n, :family, 'Siobhán', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                         {"n": n, "family": "Ó SÚILLEABHÁIN" if n == 1 else None})
            conn.execute(text("INSERT INTO patient_identifiers (patient_id, system, value, created_at) "
                              "VALUES (:n, 'urn:s', :v, CURRENT_TIMESTAMP)"), {"n": n, "v": f"V{n}"})
            conn.execute(text("INSERT INTO encounters (patient_id, visit_system, visit_number, status, created_at, updated_at) "
                              "VALUES (:n, 'v', :v, 'in-progress', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"n": n, "v": f"E{n}"})
    upgrade(db)
    assert current(db) == head_revision()
    with db.read() as s:
        ids = s.scalars(select(Patient.public_id).order_by(Patient.id)).all()
        assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 32 for i in ids)
        # 0011 folded the names there were, beyond ASCII, as every later write does
        assert s.scalars(select(Patient.name_key).order_by(Patient.id)).all() == ["ó súilleabháin^siobhán", "^siobhán"]
        assert s.scalar(select(func.count()).select_from(PatientIdentifier)) == 2
    with db.write() as s:  # foreign keys still enforced afterwards
        s.add(PatientIdentifier(patient_id=999, system="urn:s", value="orphan"))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
    db.dispose()


def test_a_moment_reads_back_as_the_same_utc_instant_on_both_backends(db):
    """SQLite kept a datetime's wall clock and dropped its offset while PostgreSQL converted it: the same photo had
    two taken-at times. Every moment is written as UTC and read back aware."""
    from datetime import datetime, timedelta, timezone

    plus_one = timezone(timedelta(hours=1))
    with db.write() as s:
        p = Patient(family_name="T", deceased_at=datetime(2024, 3, 5, 14, 22, 31, tzinfo=plus_one))
        s.add(p)
        s.flush()
        pid = p.id
    with db.read() as s:
        back = s.get(Patient, pid).deceased_at
        found = s.scalar(select(Patient.id).where(Patient.deceased_at == datetime(2024, 3, 5, 13, 22, 31, tzinfo=timezone.utc)))
    assert back == datetime(2024, 3, 5, 13, 22, 31, tzinfo=timezone.utc) and back.utcoffset() == timedelta(0)
    assert found == pid  # compared as the same instant in a query too


@pytest.mark.parametrize("backend", ["postgresql"])  # the Writer's pipeline is PostgreSQL's
def test_a_connection_back_from_the_pool_takes_a_new_wire(db):
    """Statements prepared by a Wire stay on the server with the connection after the Writer gives it back; the
    next Wire on that connection (the Writer restarted) must prepare under names of its own."""
    from store.statements import Statements, Wire

    raw = db.engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        dbapi.autocommit = True
        for _ in range(2):
            wire = Wire(dbapi)
            statements = Statements(dbapi, True, wire)
            wire.begin()
            assert [statements.now("SELECT ?::int + 1", (i,)).one() for i in range(3)] == [(1,), (2,), (3,)]
            wire.end()
    finally:
        raw.close()


def test_identifiers_of_many_patients_follow_their_merge_chains_in_a_few_statements(db):
    """Several patients' identifiers read together (a query answer's patients), each with those of the records merged
    into it two generations deep, own ones first, in as many statements as merge generations plus one."""
    from sqlalchemy import event

    with db.write() as s:
        a = Patient(family_name="A", identifiers=[PatientIdentifier(system="mrn", value="A-OLD"), PatientIdentifier(system=NHS, value="9990000026")])
        b = Patient(family_name="B", identifiers=[PatientIdentifier(system="mrn", value="B1")])
        a1 = Patient(family_name="A1", identifiers=[PatientIdentifier(system="mrn", value="A1")])
        a2 = Patient(family_name="A2", identifiers=[PatientIdentifier(system="mrn", value="A2")])
        alone = Patient(family_name="None")
        s.add_all([a, b, a1, a2, alone])
        s.flush()
        a1.merged_into_id, a2.merged_into_id = a.id, a1.id  # A2 -> A1 -> A
        ids = (a.id, b.id, alone.id)
    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with db.read() as s:
        many = patient_lookup.identifiers_of_many(s, [ids[0], ids[1], ids[2], ids[0]])
        values = {pid: [i.value for i in idents] for pid, idents in many.items()}
    assert len([x for x in statements if x.lstrip().upper().startswith("SELECT")]) == 4  # 3 generations (the last finds none) + 1
    assert values == {ids[0]: ["A-OLD", "9990000026", "A1", "A2"], ids[1]: ["B1"], ids[2]: []}
    with db.read() as s:  # one at a time, the same answer
        assert {pid: [i.value for i in patient_lookup.identifiers_of(s, pid)] for pid in ids} == values


def test_sqlite_writers_of_one_process_take_turns_without_polling(tmp_path):
    """A writer waiting for another of the same process starts the moment that one commits (SQLite's busy handler
    would sleep 1, 2, 5, 10 ms... between looks), and gives up as SQLite would after BUSY_TIMEOUT."""
    import threading
    import time

    from sqlalchemy.exc import OperationalError

    from store import db as db_module

    db = Database(f"sqlite:///{tmp_path / 't.db'}")
    with db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    first_in, committed_at, second_began = threading.Event(), [], []

    def first() -> None:
        with db.write() as s:
            first_in.set()
            s.execute(text("INSERT INTO t VALUES (1)"))
            time.sleep(0.2)
        committed_at.append(time.monotonic())

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with db.write() as s:
        second_began.append(time.monotonic())
        s.execute(text("INSERT INTO t VALUES (2)"))
    thread.join()
    assert second_began[0] >= committed_at[0] - 0.1  # after the first's commit (the two clocks read apart)
    assert second_began[0] - committed_at[0] < 0.1  # and at once (a loaded machine's scheduling aside), not polling
    with db.read() as s:
        assert sorted(s.execute(text("SELECT n FROM t")).scalars()) == [1, 2]

    db_module_timeout = db_module.BUSY_TIMEOUT
    db_module.BUSY_TIMEOUT = 0.2
    try:
        assert db.turnstile is not None
        with db.turnstile:  # another writer of this process that does not finish
            started = time.monotonic()
            with pytest.raises(OperationalError, match="database is locked"):
                with db.write():
                    pass
            assert 0.15 < time.monotonic() - started < 5
    finally:
        db_module.BUSY_TIMEOUT = db_module_timeout
        db.dispose()


def test_only_sqlite_writers_take_turns_in_process(db):
    # PostgreSQL: row locks decide, and two writers of one process run at once
    assert (db.turnstile is not None) == (db.dialect == "sqlite")
