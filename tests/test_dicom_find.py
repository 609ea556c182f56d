"""C-FIND, Patient Root and Study Root, on a real socket, both backends: dcmtk's findscu at every level and matching
type, pynetdicom for the access matrix (zero leaks, zero misses for peers of different identities) and refusals."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from sqlalchemy import select

from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.policy.settings import DicomPeer
from store.models import Asset
from tests import dicom_objects as objects
from tests.access_matrix import PEERS, build_access_matrix, dicom_peers
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.test_dicom_association import RunningListener

OTHER_NHS = "9434765919"


@pytest.fixture
def archive(gw, fx, tmp_path):
    """Two patients: Siobhán with two studies (2 photos, then 1), Ann Jones with one; a peer that sees them all."""
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "find"],
                                              sensitivities=["N", "R"])]
    add_patient(gw)
    add_patient(gw, nhs=OTHER_NHS, mrn="M200", family="Jones", given="Ann", visit="V200")
    sent = {}
    for name, nhs, study, date in (("a1", objects.NHS_NUMBER, "1.2.826.0.1.1", "20240105"), ("a2", objects.NHS_NUMBER, "1.2.826.0.1.1", "20240105"),
                                   ("a3", objects.NHS_NUMBER, "1.2.826.0.1.2", "20240610"), ("b1", OTHER_NHS, "1.2.826.0.1.3", "20241120")):
        path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / f"{name}.dcm", PatientID=nhs, IssuerOfPatientID="NHS",
                               StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1", SOPInstanceUID=f"{study}.1.{name[1]}",
                               AcquisitionDateTime=f"{date}101500", ContentDate=date, ContentTime="101500")
        ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
        sent[name] = pydicom.dcmread(path)
    return sent


def findscu(port: int, model: str, level: str, *keys: str) -> list[dict[str, str]]:
    """dcmtk's findscu; each answer as {keyword: value} from the responses it writes (-X)."""
    tool = require_tool("findscu", "dcmtk")
    with tempfile.TemporaryDirectory(prefix="findscu-") as folder:  # answers hold patient names: never left behind
        out = Path(folder)
        args = [tool, model, "-aet", "VIEWER", "-aec", "CLINPHOTO", "-X", "-od", str(out), "-k", f"QueryRetrieveLevel={level}"]
        for key in keys:
            args += ["-k", key]
        run = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        answers = []
        for path in sorted(out.glob("rsp*.dcm")):
            ds = pydicom.dcmread(path)
            answers.append({e.keyword: str(e.value) for e in ds if e.keyword})
    return answers


def test_findscu_at_every_level_and_matching_type(gw, archive):
    with RunningListener(gw) as port:
        patients = findscu(port, "-P", "PATIENT", "PatientID", "PatientName", "IssuerOfPatientID", "NumberOfPatientRelatedStudies")
        assert sorted((a["PatientID"], a["NumberOfPatientRelatedStudies"]) for a in patients) == [(OTHER_NHS, "1"), (objects.NHS_NUMBER, "2")]
        assert {a["IssuerOfPatientID"] for a in patients} == {"NHS"}
        # names from the patient index, not from the objects; PN matching without regard to case, with wildcards
        jones = findscu(port, "-P", "PATIENT", "PatientName=jon*", "PatientID")
        assert [(a["PatientName"], a["PatientID"]) for a in jones] == [("Jones^Ann", OTHER_NHS)]
        wildcard = findscu(port, "-P", "PATIENT", "PatientID=94347?5919", "PatientName")
        assert [(a["PatientID"], a["PatientName"]) for a in wildcard] == [(OTHER_NHS, "Jones^Ann")]
        studies = findscu(port, "-S", "STUDY", f"PatientID={objects.NHS_NUMBER}", "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
                          "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
        assert sorted((a["StudyInstanceUID"], a["StudyDate"], a["NumberOfStudyRelatedInstances"]) for a in studies) == [
            ("1.2.826.0.1.1", "20240105", "2"), ("1.2.826.0.1.2", "20240610", "1")]
        assert {a["ModalitiesInStudy"] for a in studies} == {"XC"} and {a["NumberOfStudyRelatedSeries"] for a in studies} == {"1"}
        # date ranges, UID lists, modality
        assert [a["StudyInstanceUID"] for a in findscu(port, "-S", "STUDY", "StudyDate=20240601-", "StudyInstanceUID")] == [
            "1.2.826.0.1.2", "1.2.826.0.1.3"]
        assert [a["StudyInstanceUID"] for a in findscu(port, "-S", "STUDY", "StudyDate=-20240301", "StudyInstanceUID")] == ["1.2.826.0.1.1"]
        listed = findscu(port, "-S", "STUDY", "StudyInstanceUID=1.2.826.0.1.1\\1.2.826.0.1.3")
        assert sorted(a["StudyInstanceUID"] for a in listed) == ["1.2.826.0.1.1", "1.2.826.0.1.3"]
        assert findscu(port, "-S", "STUDY", "ModalitiesInStudy=DMS", "StudyInstanceUID") == []
        series = findscu(port, "-S", "SERIES", "StudyInstanceUID=1.2.826.0.1.1", "SeriesInstanceUID", "Modality",
                         "NumberOfSeriesRelatedInstances")
        assert [(a["SeriesInstanceUID"], a["Modality"], a["NumberOfSeriesRelatedInstances"]) for a in series] == [("1.2.826.0.1.1.1", "XC", "2")]
        images = findscu(port, "-S", "IMAGE", "StudyInstanceUID=1.2.826.0.1.1", "SeriesInstanceUID=1.2.826.0.1.1.1", "SOPInstanceUID",
                         "SOPClassUID", "NumberOfStudyRelatedInstances")
        assert sorted(a["SOPInstanceUID"] for a in images) == ["1.2.826.0.1.1.1.1", "1.2.826.0.1.1.1.2"]
        assert {a["SOPClassUID"] for a in images} == {objects.VL_PHOTO}
        # a count not worked out at this level comes back empty (a key not held), never a wrong 0
        assert {a["NumberOfStudyRelatedInstances"] for a in images} == {"None"}  # empty: pydicom reads an empty IS as None


def _find(port: int, calling: str, model, identifier: pydicom.Dataset) -> tuple[list[int], list[pydicom.Dataset]]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
    assert assoc.is_established
    statuses, answers = [], []
    try:
        for status, found in assoc.send_c_find(identifier, model):
            statuses.append(status.Status)
            if found is not None and status.Status in (0xFF00, 0xFF01):
                answers.append(found)
    finally:
        assoc.release()
    return statuses, answers


def _images(**keys) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = keys.pop("level", "IMAGE")
    ds.SOPInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_the_access_matrix_through_c_find(gw):
    world = build_access_matrix(gw, with_blobs=False)
    gw.settings.auth.dicom_peers = [p.model_copy(update={"allow": ["echo", "find"]}) for p in dicom_peers("127.0.0.1")]
    with gw.db.read() as s:
        sop_of = dict(s.execute(select(Asset.id, Asset.sop_instance_uid)).all())
    problems = []
    with RunningListener(gw) as port:
        for peer in PEERS:
            statuses, answers = _find(port, peer.sub, STUDY_ROOT, _images())
            assert statuses[-1] == 0x0000
            got = {a.SOPInstanceUID for a in answers}
            want = {sop_of[a] for a in world.visible_asset_ids(peer)}
            problems += [f"LEAK {peer.key} finds {uid}" for uid in got - want] + [f"MISS {peer.key} misses {uid}" for uid in want - got]
    assert not problems, "\n".join(problems)


def test_bad_levels_and_peers_without_find(gw, archive):
    gw.settings.auth.dicom_peers.append(DicomPeer(ae_title="STOREONLY", hosts=["127.0.0.1"], allow=["store"]))
    with RunningListener(gw) as port:
        statuses, _ = _find(port, "VIEWER", STUDY_ROOT, _images(level="PATIENT"))  # no PATIENT level in Study Root
        assert statuses == [0xA900]
        statuses, _ = _find(port, "VIEWER", STUDY_ROOT, _images(level="STUDY", StudyDate="2024-01"))
        assert statuses == [0xA900]
        statuses, _ = _find(port, "STOREONLY", PATIENT_ROOT, _images())
        assert statuses == [0x0124]


def many_studies(gw, n: int) -> None:
    """n more one-photo studies of the first patient, as rows (C-FIND reads only the index, never the files)."""
    with gw.db.write() as s:
        base = s.scalars(select(Asset).order_by(Asset.sop_instance_uid)).first()
        columns = {c.key: getattr(base, c.key) for c in Asset.__table__.columns}
        for i in range(n):
            s.add(Asset(**{**columns, "id": f"{i:032x}", "study_uid": f"1.2.826.0.9.{i}", "series_uid": f"1.2.826.0.9.{i}.1",
                           "sop_instance_uid": f"1.2.826.0.9.{i}.1.1", "sha256": f"{i:064x}"}))


def test_findscu_cancel_stops_the_answers(gw, archive):
    """dcmtk's findscu sends C-CANCEL after its first answer: the SCP stops between answers with 0xFE00 Cancel,
    long before the 3,000 matches are all sent."""
    many_studies(gw, 3000)
    tool = require_tool("findscu", "dcmtk")
    with RunningListener(gw) as port:
        run = subprocess.run([tool, "-S", "-v", "--cancel", "1", "-aet", "VIEWER", "-aec", "CLINPHOTO", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"PatientID={objects.NHS_NUMBER}", "-k", "StudyInstanceUID", "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        answered = run.stderr.count("Find Response:") + run.stdout.count("Find Response:")
        final = (run.stdout + run.stderr).split("Find Response:")[-1]
        assert "Cancel" in final, final[:400]
        assert 1 <= answered < 3000  # stopped early (pending answers already on the wire still arrive)
        # the listener is still in order: the next query on a new association is answered in full
        assert len(findscu(port, "-S", "STUDY", f"PatientID={OTHER_NHS}", "StudyInstanceUID")) == 1


@pytest.fixture
def two_day_study(gw, archive, fx, tmp_path):  # noqa: F811
    """Study 1.2.826.0.1.1 (two photos taken 2024-01-05) gets a second series of one photo taken 2024-01-07."""
    path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "a4.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                           StudyInstanceUID="1.2.826.0.1.1", SeriesInstanceUID="1.2.826.0.1.1.2", SOPInstanceUID="1.2.826.0.1.1.2.1",
                           AcquisitionDateTime="20240107101500", ContentDate="20240107", ContentTime="101500")
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
    return archive


def test_c_find_study_attributes_do_not_depend_on_lower_level_matches(gw, two_day_study):
    """PS3.4 C.2.2.2 / C.6.2.1: StudyDate and the Number of Study Related Series/Instances are attributes of the study.
    Photos were matched before being grouped into studies, so StudyDate=20240107 matched the study whose date is
    20240105 and answered it with that date, 1 series and 1 instance instead of 2 and 3; at SERIES level each series
    had a StudyDate of its own (found by a conformance review)."""
    keys = ("StudyInstanceUID=1.2.826.0.1.1", "StudyDate", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
    with RunningListener(gw) as port:
        [study] = findscu(port, "-S", "STUDY", *keys)
        whole = (study["StudyDate"], study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"])
        assert whole == ("20240105", "2", "3")
        series = findscu(port, "-S", "SERIES", "StudyInstanceUID=1.2.826.0.1.1", "SeriesInstanceUID", "StudyDate")
        assert {a["StudyDate"] for a in series} == {"20240105"}, series
        # below STUDY level too, StudyDate is the study's: both its series on the 5th, none of them on the 7th
        for date, expected in (("20240105", {"1.2.826.0.1.1.1", "1.2.826.0.1.1.2"}), ("20240107", set())):
            got = findscu(port, "-S", "SERIES", "StudyInstanceUID=1.2.826.0.1.1", f"StudyDate={date}", "SeriesInstanceUID")
            assert {a["SeriesInstanceUID"] for a in got} == expected, date
        images = findscu(port, "-S", "IMAGE", "StudyInstanceUID=1.2.826.0.1.1", "SeriesInstanceUID=1.2.826.0.1.1.2",
                         "StudyDate=20240105", "SOPInstanceUID")
        assert [a["SOPInstanceUID"] for a in images] == ["1.2.826.0.1.1.2.1"]
        for date in ("20240107", "20240105"):
            for a in findscu(port, "-S", "STUDY", *keys[1:], f"StudyDate={date}", "StudyInstanceUID"):
                if a["StudyInstanceUID"] == "1.2.826.0.1.1":
                    assert (a["StudyDate"], a["NumberOfStudyRelatedSeries"], a["NumberOfStudyRelatedInstances"]) == whole, date


def test_c_find_required_study_keys_are_matched(gw, archive):  # noqa: F811
    """PS3.4 C.6.2.1.2 (Table C.6-5): AccessionNumber, StudyTime and StudyID are Required keys at STUDY level. They were
    ignored: AccessionNumber=ACC-NOPE answered every study, StudyTime=120000-130000 a study started at 10:15. StudyTime
    is matched with StudyDate as one date-time range; the keys this archive holds no value for match nothing."""
    with RunningListener(gw) as port:
        assert findscu(port, "-S", "STUDY", "AccessionNumber=ACC-NOPE", "StudyInstanceUID") == []
        assert findscu(port, "-S", "STUDY", "StudyID=NOPE", "StudyInstanceUID") == []
        at_noon = findscu(port, "-S", "STUDY", "StudyDate=20240105", "StudyTime=120000-130000", "StudyInstanceUID")
        assert at_noon == []
        at_ten = findscu(port, "-S", "STUDY", "StudyDate=20240105", "StudyTime=1000-1030", "StudyInstanceUID")
        assert [a["StudyInstanceUID"] for a in at_ten] == ["1.2.826.0.1.1"]
        assert [a["StudyInstanceUID"] for a in findscu(port, "-S", "STUDY", "AccessionNumber", "StudyID", "StudyDate=20240105",
                                                       "StudyInstanceUID")] == ["1.2.826.0.1.1"]  # asked for, not matched
