"""STOW-RS with DICOM JSON metadata and JPEG bulk data (IHE Web-based Image Capture), both backends: what the capture
device says about the photo (body site, laterality, when, device, operator, view, descriptions) reaches the photo's
record and the DICOM object built from it, through the same mapping a received DICOM object goes through; a bad
coded value or date fails the instance with 0xC000 and a comment naming the attribute. Every object stored passes
dciodvfy (validate_stored_dicom)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from sqlalchemy import select

from store import audit
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient
from tests.test_dicomweb import DICOM_TS_ANY, mi, multipart_body, parts, stow, web  # noqa: F401 (the fixture)

STUDY, SERIES = "1.2.826.0.8.1", "1.2.826.0.8.1.1"
JSON = "application/dicom+json"


def photo(seed: int) -> bytes:
    """A small camera-like JPEG, different for each seed (the same image twice would be kept once)."""
    rng = np.random.default_rng(seed)
    pixels = (objects.gradient(96, 128).astype(int) + rng.integers(0, 40, (96, 128, 3))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def code(value: str, meaning: str, scheme: str = "SCT") -> dict:
    return {"00080100": {"vr": "SH", "Value": [value]}, "00080102": {"vr": "SH", "Value": [scheme]},
            "00080104": {"vr": "LO", "Value": [meaning]}}


def metadata(sop: str, **extra: dict) -> dict:
    """The data set a capture app sends: identifiers, patient, and what it knows about the photo."""
    return {
        "00080016": {"vr": "UI", "Value": [objects.VL_PHOTO]}, "00080018": {"vr": "UI", "Value": [sop]},
        "0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
        "00100020": {"vr": "LO", "Value": [objects.NHS_NUMBER]}, "00100021": {"vr": "LO", "Value": ["NHS"]},
        "7FE00010": {"vr": "OB", "BulkDataURI": f"photo-{sop}"}, **extra,
    }


FULL = {
    "00082218": {"vr": "SQ", "Value": [{**code("85562004", "Hand"),
                                        "00082220": {"vr": "SQ", "Value": [code("7771000", "Left")]}}]},  # AnatomicRegion + modifier
    "00200060": {"vr": "CS", "Value": ["L"]},  # Laterality
    "0008002A": {"vr": "DT", "Value": ["20240305142231+0100"]},  # AcquisitionDateTime
    "00080070": {"vr": "LO", "Value": ["Acme"]}, "00081090": {"vr": "LO", "Value": ["DermCam 2"]},
    "00081070": {"vr": "PN", "Value": [{"Alphabetic": "Photographer^Pat"}]},  # OperatorsName
    "00081030": {"vr": "LO", "Value": ["Dermatology clinic"]}, "0008103E": {"vr": "LO", "Value": ["Lesion follow-up"]},
    "00540220": {"vr": "SQ", "Value": [code("399067008", "Lateral")]},  # ViewCodeSequence
}


def post(web, gw, items: list[dict], url: str = "/dicomweb/studies"):  # noqa: F811
    parts_ = [(JSON, json.dumps(items).encode(), {})]
    parts_ += [("image/jpeg", photo(i), {"Content-Location": item["7FE00010"]["BulkDataURI"]}) for i, item in enumerate(items)]
    return stow(web, gw, parts_, part_type=JSON, url=url)


def asset(gw, sop: str) -> Asset:
    with gw.db.read() as s:
        row = s.scalars(select(Asset).where(Asset.sop_instance_uid == sop)).one()
        s.expunge(row)
        return row


def test_capture_metadata_reaches_the_record_and_the_object(gw, web, validate_stored_dicom):  # noqa: F811
    add_patient(gw)
    sop = f"{SERIES}.1"
    r = post(web, gw, [metadata(sop, **FULL)])
    assert r.status_code == 200, r.text
    a = asset(gw, sop)
    assert (a.body_site_code, a.body_site_display, a.laterality) == ("85562004", "Hand", "left")
    assert a.taken_at.replace(tzinfo=dt.timezone.utc) == dt.datetime(2024, 3, 5, 13, 22, 31, tzinfo=dt.timezone.utc)
    assert (a.device, a.photographer, a.view) == ("Acme DermCam 2", "Pat Photographer", "Lateral")  # PN read as written
    assert a.description == "Dermatology clinic; Lesion follow-up"
    # the DICOM object built from the JPEG says the same (and passes dciodvfy after the test)
    [(_, body)] = parts(web.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{sop}", headers={**mi(gw), "Accept": DICOM_TS_ANY}))
    ds = pydicom.dcmread(io.BytesIO(body))
    region = ds.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("85562004", "SCT") and ds.Laterality == "L"
    assert region.AnatomicRegionModifierSequence[0].CodeValue == "7771000"
    # the photographer as free text (one component); the device as the record holds it (the building of the object, in
    # the ingest pipeline, has one device field: make and model together)
    assert str(ds.OperatorsName) == "Pat Photographer" and ds.ManufacturerModelName == "Acme DermCam 2"
    assert ds.ContentDate == "20240305" and "Lateral" in ds.ImageComments and "Lesion follow-up" in ds.ImageComments


def test_body_part_examined_and_the_part10_path_map_the_same(gw, web, tmp_path, validate_stored_dicom):  # noqa: F811
    """One mapping: a capture app's JSON and a received Part 10 object with the same attributes give the same record."""
    add_patient(gw)
    attrs = {"00180015": {"vr": "CS", "Value": ["HAND"]}, "00200062": {"vr": "CS", "Value": ["R"]},  # BodyPartExamined, ImageLaterality
             "00080023": {"vr": "DA", "Value": ["20240305"]}, "00080033": {"vr": "TM", "Value": ["142231"]},
             "00080201": {"vr": "SH", "Value": ["+0000"]},  # ContentDate, ContentTime, TimezoneOffsetFromUTC
             "00080070": {"vr": "LO", "Value": ["Acme"]}, "00081090": {"vr": "LO", "Value": ["DermCam 2"]},
             "00081070": {"vr": "PN", "Value": [{"Alphabetic": "Lens^Ann^^Dr"}]}}
    assert post(web, gw, [metadata(f"{SERIES}.2", **attrs)]).status_code == 200
    from_json = asset(gw, f"{SERIES}.2")
    # the same attributes in a Part 10 object (Secondary Capture, stored as received)
    ds = objects.dataset(objects.SECONDARY_CAPTURE, rows=8, columns=8)
    ds.update(Dataset.from_json(attrs))
    ds.PixelData = objects.gradient(8, 8).tobytes()
    ds["PixelData"].VR = "OB"
    path = objects.write(ds, tmp_path / "sc.dcm")
    r = stow(web, gw, [("application/dicom", path.read_bytes(), {})])
    assert r.status_code == 200, r.text
    from_part10 = asset(gw, ds.SOPInstanceUID)
    for field in ("body_site_code", "body_site_display", "laterality", "taken_at", "device", "photographer"):
        assert getattr(from_json, field) == getattr(from_part10, field), field
    assert (from_json.body_site_code, from_json.laterality, from_json.photographer) == ("85562004", "right", "Dr Ann Lens")


def test_bad_coded_values_fail_the_instance_naming_the_attribute(gw, web, validate_stored_dicom):  # noqa: F811
    add_patient(gw)
    bad = {
        "bad-sctid": ({"00082218": {"vr": "SQ", "Value": [code("85562005", "Hand")]}}, "AnatomicRegionSequence: '85562005'"),
        "not-sct": ({"00082218": {"vr": "SQ", "Value": [code("T-D8700", "Hand", "SRT")]}}, "scheme 'SRT', not SCT"),
        "body-part": ({"00180015": {"vr": "CS", "Value": ["WING"]}}, "BodyPartExamined 'WING'"),
        "laterality": ({"00200060": {"vr": "CS", "Value": ["X"]}}, "Laterality 'X' is not one of"),
        "sides": ({**FULL, "00200060": {"vr": "CS", "Value": ["R"]}}, "contradicts AnatomicRegionModifier"),
        "date": ({"00080023": {"vr": "DA", "Value": ["20241345"]}, "00080033": {"vr": "TM", "Value": ["1200"]}}, "ContentDate '20241345'"),
        "offset": ({"0008002A": {"vr": "DT", "Value": ["20240305142231"]}, "00080201": {"vr": "SH", "Value": ["CET"]}},
                   "TimezoneOffsetFromUTC"),
    }
    items = [metadata(f"{SERIES}.9{i}", **attrs) for i, (attrs, _) in enumerate(bad.values())]
    r = post(web, gw, items)
    assert r.status_code == 400, r.text  # every instance failed for what the request said
    failed = {f.ReferencedSOPInstanceUID: f for f in Dataset.from_json(r.json()).FailedSOPSequence}
    for i, (name, (_, words)) in enumerate(bad.items()):
        item = failed[f"{SERIES}.9{i}"]
        assert item.FailureReason == 0xC000 and words in item[0x00000902].value, (name, item[0x00000902].value)
        assert len(item[0x00000902].value) <= 64  # ErrorComment is LO
    with gw.db.read() as s:
        assert not s.scalars(select(Asset.id).where(Asset.sop_instance_uid.like(f"{SERIES}.9%"))).all()
    # beside a good one: it is stored, the bad one is not (202)
    r = post(web, gw, [metadata(f"{SERIES}.3", **FULL), items[0]])
    answer = Dataset.from_json(r.json())
    assert r.status_code == 202 and [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [f"{SERIES}.3"]
    assert [f.ReferencedSOPInstanceUID for f in answer.FailedSOPSequence] == [f"{SERIES}.90"]


def test_a_received_object_with_the_same_bad_values_is_kept_as_sent(gw, web, tmp_path):  # noqa: F811
    """The lenient side of the one mapping: a Part 10 object is stored as it came (it is the evidence), its bad coded
    values and offset left out of the record rather than refusing the photo; what can be read is kept."""
    add_patient(gw)
    ds = objects.dataset(objects.SECONDARY_CAPTURE, rows=8, columns=8)
    ds.update(Dataset.from_json({"00082218": {"vr": "SQ", "Value": [code("85562005", "Hand")]},
                                 "00200060": {"vr": "CS", "Value": ["X"]}, "00080201": {"vr": "SH", "Value": ["CET"]}}))
    ds.PixelData = objects.gradient(8, 8).tobytes()
    ds["PixelData"].VR = "OB"
    path = objects.write(ds, tmp_path / "sc.dcm")
    assert stow(web, gw, [("application/dicom", path.read_bytes(), {})]).status_code == 200
    a = asset(gw, ds.SOPInstanceUID)
    assert (a.body_site_code, a.laterality) == (None, None)
    local = dt.datetime(2024, 3, 5, 14, 22, 31).astimezone(dt.timezone.utc)  # the offset unread: the host's local time
    assert a.taken_at.replace(tzinfo=dt.timezone.utc) == local and a.device == "Acme DermCam 2"


def test_a_metadata_part_that_would_cost_more_than_it_says_is_refused_unparsed(gw, web):  # noqa: F811
    """A DICOM JSON part is read whole and parsed: bounded by its own size (the request's limit would let it be
    800 MB) and by what it parses into, so a few MB of empty arrays cannot take the gateway's memory; nested too
    deep for the parser it is a 400, not a failure of ours."""
    from gateway.dicomweb.stow import MAX_JSON_PART
    from gateway.http.json_body import MAX_CONTAINERS

    add_patient(gw)
    sop = f"{SERIES}.9"
    image = [("image/jpeg", photo(9), {"Content-Location": f"photo-{sop}"})]
    big = json.dumps([metadata(sop, **{"00081030": {"vr": "LO", "Value": ["x" * (MAX_JSON_PART + 1)]}})]).encode()
    wide = json.dumps([metadata(sop, **{"00081030": {"vr": "LO", "Value": [[]] * (MAX_CONTAINERS + 1)}})]).encode()
    deep = b"[" * 50_000 + b"]" * 50_000
    answers = [stow(web, gw, [(JSON, body, {}), *image], part_type=JSON) for body in (big, wide, deep)]
    assert [a.status_code for a in answers] == [413, 413, 400], [a.text[:200] for a in answers]
    assert "over 8 MiB" in answers[0].text and "objects and arrays" in answers[1].text and "not JSON" in answers[2].text
    with gw.db.read() as s:
        assert s.scalars(select(Asset)).first() is None
    assert post(web, gw, [metadata(sop)]).status_code == 200  # and the same instance, sent as it should be, is stored


def test_an_image_part_over_the_size_limit_is_refused_for_its_size_having_filled_no_disk(gw, web, fx, tmp_path):  # noqa: F811
    """ingest.max_bytes bounds a STOW-RS part as it arrives, as it does a C-STORE's data set: a Part 10 part and a
    JPEG bulk data part over it (and over the 8 MiB a metadata part may be) are kept no further, and refused by the
    core for their size, audited: 0xA700. The instances beside them are stored."""
    add_patient(gw)
    gw.settings.ingest.max_bytes = 3 * 1024 * 1024
    huge = os.urandom(9 * 1024 * 1024)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "vlp.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    body, ctype = multipart_body([("application/dicom", huge, {}), ("application/dicom", sent.read_bytes(), {})], "application/dicom")
    r = web.post("/dicomweb/studies", content=body, headers={**mi(gw), "Content-Type": ctype, "Accept": "application/dicom+json"})
    answer = Dataset.from_json(r.json())
    assert r.status_code == 202, r.text
    assert [item.FailureReason for item in answer.FailedSOPSequence] == [0xA700]
    assert len(answer.ReferencedSOPSequence) == 1

    sop = "1.2.826.0.1.3680043.10.1.77"
    items = [metadata(sop)]
    parts_ = [(JSON, json.dumps(items).encode(), {}), ("image/jpeg", huge, {"Content-Location": f"photo-{sop}"})]
    r = stow(web, gw, parts_, part_type=JSON)
    answer = Dataset.from_json(r.json())
    assert r.status_code == 409, r.text
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in answer.FailedSOPSequence] == [(sop, 0xA700)]
    with gw.db.read() as s:
        refusals = s.scalars(select(AuditEvent.detail).where(AuditEvent.type_code == audit.IMPORT,
                                                             AuditEvent.outcome == audit.MINOR_FAILURE)).all()
    assert [d["code"] for d in refusals] == ["too-large", "too-large"]
    assert not gw.spool.files()
