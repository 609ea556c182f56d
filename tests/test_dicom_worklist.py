"""Modality Worklist for photography with dcmtk's findscu -W: the patient index's current encounters as scheduled
procedure steps, filtered by location and date, under the need-to-know rule for the calling peer, audited."""

from __future__ import annotations

import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from gateway.core.policy.settings import DicomPeer
from store.models import AuditEvent, Encounter
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.test_dicom_association import RunningListener


def worklist(port: int, calling: str, *keys: str) -> list[pydicom.Dataset]:
    tool = require_tool("findscu", "dcmtk")
    with tempfile.TemporaryDirectory(prefix="mwl-") as folder:  # answers hold patient names: never left behind
        out = Path(folder)
        args = [tool, "-W", "-aet", calling, "-aec", "CLINPHOTO", "-X", "-od", str(out), "-k", "PatientName", "-k", "PatientID",
                "-k", "IssuerOfPatientID", "-k", "AdmissionID", "-k", "(0040,0100)[0].Modality=XC",
                "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate", "-k", "(0040,0100)[0].ScheduledProcedureStepLocation"]
        for key in keys:
            args += ["-k", key]
        run = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_worklist_lists_current_encounters_by_need_to_know(gw):
    gw.settings.auth.dicom_peers = [
        DicomPeer(ae_title="DERMCAM", hosts=["127.0.0.1"], allow=["find"], specialties=["330"]),
        DicomPeer(ae_title="MEDILL", hosts=["127.0.0.1"], allow=["find"]),
    ]
    derm = add_patient(gw)  # a current dermatology (330) encounter, visit V100
    plastics = add_patient(gw, nhs="9434765919", mrn="M200", family="Jones", given="Ann", visit="V200", specialty="160")
    with gw.db.write() as s:
        s.execute(update(Encounter).where(Encounter.id == derm["encounter_id"]).values(
            location="Ward 7", admitted_at=datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)))
        s.execute(update(Encounter).where(Encounter.id == plastics["encounter_id"]).values(
            location="Burns unit", admitted_at=datetime(2026, 12, 3, 14, 0, tzinfo=timezone.utc)))
    with RunningListener(gw) as port:
        everyone = worklist(port, "MEDILL")
        assert sorted(ds.AdmissionID for ds in everyone) == ["V100", "V200"]
        [step] = [ds for ds in everyone if ds.AdmissionID == "V100"]
        assert step.PatientID == derm["nhs"] and step.IssuerOfPatientID == "NHS" and str(step.PatientName).startswith("Ó Súilleabháin")
        sps = step.ScheduledProcedureStepSequence[0]
        assert (sps.Modality, sps.ScheduledProcedureStepStartDate, sps.ScheduledProcedureStepLocation) == ("XC", "20261201", "Ward 7")
        # the camera's filters: location with a wildcard, the admission date range
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "(0040,0100)[0].ScheduledProcedureStepLocation=Burns*")] == ["V200"]
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "(0040,0100)[0].ScheduledProcedureStepStartDate=20261202-")] == ["V200"]
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "PatientID=9434765919")] == ["V200"]
        # a dermatology camera knows the dermatology patient only
        assert [ds.AdmissionID for ds in worklist(port, "DERMCAM")] == ["V100"]
        # a discharged patient is off the list
        with gw.db.write() as s:
            s.execute(update(Encounter).where(Encounter.id == plastics["encounter_id"]).values(status="finished"))
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL")] == ["V100"]
    with gw.db.read() as s:
        audited = s.execute(select(AuditEvent.agent_who).where(AuditEvent.type_code == "110112", AuditEvent.subtype == "worklist")).all()
    assert {row.agent_who for row in audited} == {"MEDILL", "DERMCAM"}


@pytest.fixture
def two_encounters(gw):
    """Siobhán on Ward 7 since 1 Dec 2026 09:30 under Dr Okafor; Ann Jones (plastics) with no attending."""
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="MEDILL", hosts=["127.0.0.1"], allow=["find"])]
    derm = add_patient(gw)
    jones = add_patient(gw, nhs="9434765919", mrn="M200", family="Jones", given="Ann", visit="V200", specialty="160")
    with gw.db.write() as s:
        s.execute(update(Encounter).where(Encounter.id == derm["encounter_id"]).values(
            location="Ward 7", admitted_at=datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc), attending_name="Okafor^Ngozi"))
    return derm, jones


def test_worklist_matches_its_required_keys(gw, two_encounters):
    """PS3.4 K.6.1.2.2: PatientName, ScheduledStationAETitle, ScheduledProcedureStepStartDate and Time (as one
    date-time range) and ScheduledPerformingPhysicianName are Required matching keys; they were ignored, so a camera
    asking for 'Jones*' got Siobhán's step too (found by a conformance review)."""
    with RunningListener(gw) as port:
        assert [str(ds.PatientName) for ds in worklist(port, "MEDILL", "PatientName=Jones*")] == ["Jones^Ann"]
        assert [str(ds.PatientName) for ds in worklist(port, "MEDILL", "SpecificCharacterSet=ISO_IR 192",
                                                        "PatientName=ó súilleabháin")] == ["Ó Súilleabháin^Siobhán"]
        for ds in worklist(port, "MEDILL", "(0040,0100)[0].ScheduledStationAETitle=DERMCAM1"):  # steps for any station
            assert ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "DERMCAM1"
        day = "(0040,0100)[0].ScheduledProcedureStepStartDate=20261201"
        assert worklist(port, "MEDILL", day, "(0040,0100)[0].ScheduledProcedureStepStartTime=0000-0100") == []
        assert [str(ds.AdmissionID) for ds in worklist(port, "MEDILL", day, "(0040,0100)[0].ScheduledProcedureStepStartTime=0900-1000")] == ["V100"]
        assert [str(ds.AdmissionID) for ds in worklist(port, "MEDILL", "(0040,0100)[0].ScheduledPerformingPhysicianName=Okafor*")] == ["V100"]
        assert worklist(port, "MEDILL", "(0040,0100)[0].ScheduledPerformingPhysicianName=NOBODY^AT^ALL") == []


def test_a_worklist_start_time_without_its_date_is_refused(gw, two_encounters):
    tool = require_tool("findscu", "dcmtk")
    with RunningListener(gw) as port:
        run = subprocess.run([tool, "-v", "-W", "-aet", "MEDILL", "-aec", "CLINPHOTO", "-k", "PatientName",
                              "-k", "(0040,0100)[0].ScheduledProcedureStepStartTime=0900-1000", "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=60)
    said = run.stdout + run.stderr
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in said, said  # dcmtk's name for 0xA900


def test_worklist_answers_its_type_1_return_keys_and_a_camera_s_photos_join_the_encounter_s_study(gw, two_encounters, fx, tmp_path):
    """PS3.4 K.6.1.2.2: StudyInstanceUID and ScheduledStationAETitle are Type 1 return keys; they were answered empty,
    leaving a camera no study to file its photos in. The study is the one the encounter's photos are filed in: an
    upload for the encounter lands in it, and so does the camera's object that carries it."""
    from gateway.core.ingest.pipeline import ingest
    from gateway.core.ingest.request import ImageFile
    from store.models import Asset
    from tests.ingest_helpers import capture

    with RunningListener(gw) as port:
        steps = worklist(port, "MEDILL", "StudyInstanceUID", "(0040,0100)[0].ScheduledStationAETitle")
        again = worklist(port, "MEDILL", "StudyInstanceUID")
    assert len(steps) == 2
    for ds in steps:
        assert ds.StudyInstanceUID and ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MEDILL", ds
    study = {str(ds.AdmissionID): str(ds.StudyInstanceUID) for ds in steps}
    assert study == {str(ds.AdmissionID): str(ds.StudyInstanceUID) for ds in again} and len(set(study.values())) == 2
    derm, _jones = two_encounters
    ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])], {"patient": f"nhs|{derm['nhs']}", "encounter": "V100", "specialty": "330"}))
    with gw.db.read() as s:
        assert s.scalars(select(Asset.study_uid)).all() == [study["V100"]]


def test_patients_the_hl7_feed_registers_and_renames_are_found_by_name(gw):
    """The ADT feed writes patients with plain statements (gateway/core/patients.py), past the ORM event that keeps
    patients.name_key: a patient it registered had no key, so no PatientName matched it (C-FIND, QIDO-RS, the
    worklist, FHIR/REST family and given), and a rename (A08) was still found by the old name."""
    from tests.test_adt_events import Feed, build, msh
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="MEDILL", hosts=["127.0.0.1"], allow=["find"])]
    feed = Feed(gw.db)
    assert feed.fixture("adt_a01_admit.hl7").status == "applied"  # SMITH^JOHN^PAUL, visit V900001
    with RunningListener(gw) as port:
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "PatientName=smith^john*")] == ["V900001"]
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "PatientName=SMITH")] == ["V900001"]
        renamed = feed.send(build(msh("A08", "A08-N1", t="20240302101500"), "EVN|A08|20240302101500",
                                  "PID|1||9449305552^^^NHS^NH||JONES^MARY"))
        assert renamed.status == "applied"
        assert [ds.AdmissionID for ds in worklist(port, "MEDILL", "PatientName=jones^mary")] == ["V900001"]
        assert worklist(port, "MEDILL", "PatientName=SMITH*") == []


def test_the_worklist_modality_key_takes_a_wildcard(gw, two_encounters):
    """Modality is matched as PS3.4 C.2.2.2 has it: a single value or a wildcard naming photography (XC) finds the
    steps; one naming another modality finds none. 'X?' found nothing."""
    with RunningListener(gw) as port:
        for asked, found in (("X?", 2), ("*C", 2), ("XC", 2), ("CT", 0), ("D?", 0)):
            assert len(worklist(port, "MEDILL", f"(0040,0100)[0].Modality={asked}")) == found, asked
