"""Shared helpers for the photo-ingest tests: fixtures on disk, patients in the store, DICOM tool runs."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

from gateway.core.ingest.metadata import PhotoMetadata, parse_metadata
from gateway.core.ingest.request import CaptureRequest, Channel, ImageFile, Source
from store.models import Consent, Encounter, Patient, PatientIdentifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures" / "photos"))

import make as photo_fixtures  # noqa: E402,F401  (fixtures/photos/make.py, used by the test modules)

NHS = "https://fhir.nhs.uk/Id/nhs-number"
MRN = "https://fhir.test-trust.nhs.uk/Id/mrn"
UPLOADER = Source(Channel.UPLOAD, who="dr.jones", role="clinician", network="127.0.0.1")


def capture(files: list[ImageFile], meta: dict | PhotoMetadata, source: Source = UPLOADER, **kw) -> CaptureRequest:
    """A capture request for image files described by the upload API's metadata (a dict, or parsed)."""
    meta = meta if isinstance(meta, PhotoMetadata) else parse_metadata(meta)
    return CaptureRequest(source=source, items=files, patient=meta.patient_ref(), governance=meta.governance(), **kw)


def add_patient(gw, nhs: str = "9449305552", mrn: str = "M100", family: str = "Ó Súilleabháin", given: str = "Siobhán",
                visit: str | None = "V100", specialty: str = "330") -> dict:
    with gw.db.write() as session:
        patient = Patient(family_name=family, given_names=given, birth_date=date(1980, 2, 3), sex="F")
        patient.identifiers = [
            PatientIdentifier(system=NHS, value=nhs, type_code="NH", assigner="NHS"),
            PatientIdentifier(system=MRN, value=mrn, type_code="MR", assigner="RXX"),
        ]
        session.add(patient)
        session.flush()
        encounter_id = None
        if visit:
            enc = Encounter(patient_id=patient.id, visit_system="RXX", visit_number=visit, class_code="AMB", specialty=specialty)
            session.add(enc)
            session.flush()
            encounter_id = enc.id
        consent = Consent(patient_id=patient.id, level="record", given_by="patient")
        session.add(consent)
        session.flush()
        return {"id": patient.id, "nhs": nhs, "mrn": mrn, "encounter_id": encounter_id, "visit": visit, "consent_id": consent.id}


def dicom_tools_check(path: Path, iod: bool = True) -> str:
    """dciodvfy (zero errors; `iod=False`: not run), dcmdump and dcmj2pnm (dcml2pnm for JPEG-LS) on one file;
    returns dcmdump's text."""
    if iod:
        verify = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = verify.stdout + verify.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy errors for {path.name}:\n{report}"
    dump = subprocess.run(["dcmdump", "-M", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    out = path.with_suffix(".pnm-check.png")
    # dcmj2pnm decodes baseline JPEG; JPEG-LS (lossless sources) needs its sibling dcml2pnm
    renderer = "dcml2pnm" if "=JPEGLSLossless" in dump.stdout else "dcmj2pnm"
    render = subprocess.run([renderer, "+on", str(path), str(out)], capture_output=True, text=True, timeout=60)
    assert render.returncode == 0 and out.stat().st_size > 0, render.stderr
    out.unlink()
    return dump.stdout


def assert_stored_dicom_valid(gw, tmp_path: Path) -> int:
    """Run the DICOM tools on every stored photo's DICOM object as it is served (the patient module of the
    moment, gateway/core/objects/coerce.py); VL Photographic objects must pass dciodvfy without an error (a
    received Secondary Capture is served as its sender made it). Returns how many were checked."""
    from sqlalchemy import select

    from gateway.core.ingest.dicom_patients import patient_info
    from gateway.core.objects.coerce import coerce
    from gateway.core.objects.vlphoto import VL_PHOTOGRAPHIC_IMAGE
    from store.models import Asset
    from store.patients import survivor

    with gw.db.read() as session:
        assets = session.execute(select(Asset).where(Asset.dicom_sha256.is_not(None)).order_by(Asset.id)).scalars().all()
        stored = [(a.id, a.dicom_sha256, a.sop_class_uid, a.laterality,
                   patient_info(session, survivor(session, session.get(Patient, a.patient_id)))) for a in assets]
    for asset_id, sha, sop_class, laterality, patient in stored:
        served = coerce(gw.blobs.path(sha), patient, laterality=laterality, uid_root=gw.settings.uid_root)
        path = tmp_path / f"check-{asset_id[:12]}.dcm"
        path.write_bytes(served.read())
        dicom_tools_check(path, iod=sop_class == VL_PHOTOGRAPHIC_IMAGE)
        path.unlink()
    return len(stored)
