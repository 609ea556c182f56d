from datetime import date

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from store import patients as patient_lookup
from store.db import Database
from store.migrate import current
from store.models import Patient, PatientIdentifier

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def test_migrations_reach_head(db):
    assert current(db) == "0001"


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
