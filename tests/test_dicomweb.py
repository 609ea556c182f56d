"""The DICOMweb door over a real socket, both backends: QIDO-RS matching and paging as C-FIND matches, WADO-RS
(multipart with transfer-syntax negotiation, metadata, frames, rendered, thumbnail) from what is stored, STOW-RS
of Part 10 objects and of DICOM JSON with JPEG bulk data, 405/406/415, CORS, no gzip of image bytes, and every
query and retrieve in the audit trail."""

from __future__ import annotations

import email.parser
import hashlib
import io
import json
import struct
import uuid

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from sqlalchemy import select

from gateway.app import create_app
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.auth_helpers import auth_headers
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient, dicom_tools_check
from tests.test_dicom_association import RunningListener
from tests.test_dicom_find import OTHER_NHS, archive, findscu  # noqa: F401 (the fixture)
from tests.test_photos_api import serving

DICOM_TS_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def web(gw):
    with serving(create_app(gw)) as client:
        yield client


def mi(gw) -> dict[str, str]:
    return auth_headers(gw, role="medical-illustration", sub="mi.jones")


def parts(response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer, read by the standard library's MIME parser (not ours)."""
    ctype = response.headers["content-type"]
    assert ctype.startswith("multipart/related") and "boundary=" in ctype
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + response.content)
    assert message.is_multipart()
    return [({k.lower(): v for k, v in p.items()}, p.get_payload(decode=True)) for p in message.get_payload()]


def value(data: dict, tag: str):
    return (data.get(tag) or {}).get("Value", [None])[0]


# -- QIDO-RS ----------------------------------------------------------------------------------------------


def test_qido_studies_series_instances_match_as_c_find(gw, archive, web):  # noqa: F811
    h = mi(gw)
    r = web.get("/dicomweb/studies", params={"PatientID": objects.NHS_NUMBER, "IssuerOfPatientID": "NHS"}, headers=h)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    studies = r.json()
    assert sorted(value(s, "0020000D") for s in studies) == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    first = next(s for s in studies if value(s, "0020000D") == "1.2.826.0.1.1")
    assert value(first, "00201208") == 2 and value(first, "00080061") == "XC" and value(first, "00080020") == "20240105"
    assert first["00100010"]["Value"][0]["Alphabetic"].startswith("Ó Súilleabháin^Siobhán")
    assert value(first, "00081190").endswith("/dicomweb/studies/1.2.826.0.1.1")
    # matching by keyword or tag, wildcards and ranges, as C-FIND
    assert len(web.get("/dicomweb/studies", params={"00100020": objects.NHS_NUMBER}, headers=h).json()) == 2
    assert len(web.get("/dicomweb/studies", params={"PatientName": "jones*"}, headers=h).json()) == 1
    assert [value(s, "0020000D") for s in web.get("/dicomweb/studies", params={"StudyDate": "20240601-"}, headers=h).json()] == [
        "1.2.826.0.1.2", "1.2.826.0.1.3"]
    assert web.get("/dicomweb/studies", params={"ModalitiesInStudy": "CT"}, headers=h).json() == []
    series = web.get("/dicomweb/studies/1.2.826.0.1.1/series", headers=h).json()
    assert [value(s, "0020000E") for s in series] == ["1.2.826.0.1.1.1"] and value(series[0], "00201209") == 2
    instances = web.get("/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances", headers=h).json()
    assert [value(i, "00080018") for i in instances] == ["1.2.826.0.1.1.1.1", "1.2.826.0.1.1.1.2"]
    assert value(instances[0], "00080016") == objects.VL_PHOTO
    everywhere = web.get("/dicomweb/instances", params={"SOPInstanceUID": "1.2.826.0.1.1.1.2,1.2.826.0.1.3.1.1"}, headers=h).json()
    assert sorted(value(i, "00080018") for i in everywhere) == ["1.2.826.0.1.1.1.2", "1.2.826.0.1.3.1.1"]
    assert value(everywhere[0], "00100020")  # outside a study, instances carry the study's attributes too
    assert len(web.get("/dicomweb/series", params={"Modality": "XC"}, headers=h).json()) == 3
    assert len(web.get("/dicomweb/studies/1.2.826.0.1.1/instances", headers=h).json()) == 2


def test_qido_paging_includefield_and_clear_refusals(gw, archive, web):  # noqa: F811
    h = mi(gw)
    page1 = web.get("/dicomweb/instances", params={"limit": 2}, headers=h)
    assert len(page1.json()) == 2 and "additional results" in page1.headers["warning"]
    page2 = web.get("/dicomweb/instances", params={"limit": 2, "offset": 2}, headers=h)
    assert len(page2.json()) == 2 and "warning" not in page2.headers
    assert {value(i, "00080018") for i in page1.json()} | {value(i, "00080018") for i in page2.json()} == {
        a.SOPInstanceUID for a in archive.values()}
    assert web.get("/dicomweb/instances", params={"offset": 4}, headers=h).json() == []
    # includefield: a study attribute at series level, by tag and keyword, and all
    series = web.get("/dicomweb/studies/1.2.826.0.1.3/series", params={"includefield": "00100020,StudyDate"}, headers=h).json()
    assert value(series[0], "00100020") == OTHER_NHS and value(series[0], "00080020") == "20241120"
    assert "00100020" not in web.get("/dicomweb/studies/1.2.826.0.1.3/series", headers=h).json()[0]
    full = web.get("/dicomweb/studies/1.2.826.0.1.3/series", params={"includefield": "all"}, headers=h).json()[0]
    assert value(full, "00100020") == OTHER_NHS and value(full, "00201206") == 1
    # at instance level the related counts are not worked out: absent, never a wrong 0
    image = web.get("/dicomweb/studies/1.2.826.0.1.3/instances", params={"includefield": "all"}, headers=h).json()[0]
    assert value(image, "00100020") == OTHER_NHS
    assert not {"00201200", "00201206", "00201208", "00201209"} & set(image), sorted(image)
    for params, words in (({"fuzzymatching": "true"}, "fuzzymatching=true is not supported"),
                          ({"SeriesNumber": "1"}, "SeriesNumber cannot be matched here"),
                          ({"StudyTime": "1000-1100"}, "StudyTime is matched with a StudyDate"),
                          ({"NoSuchThing": "x"}, "not a query parameter"),
                          ({"StudyDate": "2024"}, "YYYYMMDD"), ({"limit": "0"}, "limit"),
                          ({"includefield": "Nonsense"}, "neither a DICOM keyword")):
        r = web.get("/dicomweb/studies", params=params, headers=h)
        assert r.status_code == 400 and words in r.json()["detail"], (params, r.text)
    assert web.get("/dicomweb/studies", params={"fuzzymatching": "false", "AccessionNumber": ""}, headers=h).status_code == 200
    # required keys (PS3.18 Table 10.6.1-5): those held by no study match nothing; StudyTime with StudyDate, as one range
    for unheld in ("AccessionNumber", "StudyID", "ReferringPhysicianName"):
        r = web.get("/dicomweb/studies", params={unheld: "A1"}, headers=h)
        assert r.status_code == 200 and r.json() == [], (unheld, r.text)
    at = {t: [value(x, "0020000D") for x in web.get("/dicomweb/studies", params={"StudyDate": "20241120", "StudyTime": t},
                                                     headers=h).json()] for t in ("1000-1030", "1200-")}
    assert at == {"1000-1030": ["1.2.826.0.1.3"], "1200-": []}, at
    assert web.get("/dicomweb/studies").status_code == 401
    # XML only as PS3.18 sends it, multipart (tests/test_dicomweb_rendering.py); anything else is 406 naming both forms
    xml = web.get("/dicomweb/studies", headers={**h, "Accept": "text/xml"})
    assert xml.status_code == 406 and "application/dicom+json" in xml.json()["detail"] and 'type="application/dicom+xml"' in xml.json()["detail"]
    assert web.get("/dicomweb/studies", headers={**h, "Accept": "application/json"}).status_code == 200
    assert web.get("/dicomweb/studies", headers={**h, "X-Purpose-Of-Use": "NONSENSE"}).status_code in (400, 403)
    # every query is audited, as DICOM's query event, on this door's channel
    with gw.db.read() as s:
        queries = s.scalars(select(AuditEvent.entities).where(AuditEvent.agent_who == "mi.jones", AuditEvent.type_code == "110112")).all()
    texts = [e["query"] for entities in queries for e in entities if e.get("type") == "query" and e.get("channel") == "dicomweb"]
    assert any(t.startswith("QIDO-RS GET /dicomweb/instances") and "offset=2" in t for t in texts)


# -- WADO-RS ----------------------------------------------------------------------------------------------


def test_wado_instances_as_stored_or_decoded_and_valid(gw, archive, web, tmp_path):  # noqa: F811
    require_tool("dciodvfy", "dicom3tools")
    h = mi(gw)
    a1 = archive["a1"]
    url = f"/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances/{a1.SOPInstanceUID}"
    r = web.get(url, headers={**h, "Accept": DICOM_TS_ANY, "Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers  # image bytes are never gzipped
    # as stored, the parts' sizes are known before the first byte: sent with a Content-Length, not chunked
    assert r.headers["content-length"] == str(len(r.content)) and "transfer-encoding" not in r.headers
    [(head, body)] = parts(r)
    assert head["content-type"] == f"application/dicom; transfer-syntax={JPEG_BASELINE}"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE and ds.PixelData == a1.PixelData
    assert ds.PatientName == "Ó Súilleabháin^Siobhán"  # the patient index's name, not the sender's
    (tmp_path / "as-stored.dcm").write_bytes(body)
    body_as_stored = body
    dicom_tools_check(tmp_path / "as-stored.dcm")
    # no transfer-syntax parameter: the media type's default, Explicit VR Little Endian, decoded
    r = web.get(url, headers={**h, "Accept": 'multipart/related; type="application/dicom"'})
    [(head, body)] = parts(r)
    assert head["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    decoded = pydicom.dcmread(io.BytesIO(body))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and decoded.PhotometricInterpretation == "RGB"
    assert len(decoded.PixelData) == decoded.Rows * decoded.Columns * 3
    (tmp_path / "decoded.dcm").write_bytes(body)
    dicom_tools_check(tmp_path / "decoded.dcm")
    # a whole study, every instance a part
    r = web.get("/dicomweb/studies/1.2.826.0.1.1", headers={**h, "Accept": DICOM_TS_ANY})
    assert r.headers["content-length"] == str(len(r.content))
    study = parts(r)
    assert sorted(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for _, b in study) == sorted(
        [a1.SOPInstanceUID, archive["a2"].SOPInstanceUID])
    series = parts(web.get("/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1", headers={**h, "Accept": "*/*"}))
    assert len(series) == 2
    # a client that leaves mid-answer: the next one is answered in full
    with web.stream("GET", "/dicomweb/studies/1.2.826.0.1.1", headers={**h, "Accept": DICOM_TS_ANY}) as partial:
        next(partial.iter_raw(1024))
    assert parts(web.get(url, headers={**h, "Accept": DICOM_TS_ANY}))[0][1] == body_as_stored
    # nothing acceptable: 406 saying what is
    r = web.get(url, headers={**h, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90'})
    assert r.status_code == 406 and "transfer-syntax=*" in r.json()["detail"]
    assert web.get(url, headers={**h, "Accept": "text/html"}).status_code == 406
    # absent and hidden alike
    assert web.get("/dicomweb/studies/1.2.3.4", headers={**h, "Accept": DICOM_TS_ANY}).status_code == 404
    with gw.db.read() as s:
        transferred = s.scalars(select(AuditEvent.type_code).where(AuditEvent.agent_who == "mi.jones",
                                                                   AuditEvent.type_code == "110104")).all()
    assert len(transferred) >= 5


def test_wado_retrieve_refuses_as_every_route_does(gw, archive, web):  # noqa: F811
    """The retrieve routes authenticate the caller in their own call to the thread pool, not by the Caller dependency:
    the same refusals as a route with it (the instance's /metadata), and the caller before the Accept header."""
    url = f"/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances/{archive['a1'].SOPInstanceUID}"
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {**mi(gw), "X-Purpose-Of-Use": "NOSUCH"},
                    {**mi(gw), "X-Purpose-Of-Use": "ETREAT"}):
        retrieve = web.get(url, headers={**headers, "Accept": "text/html"})
        metadata = web.get(f"{url}/metadata", headers=headers)
        assert retrieve.status_code == metadata.status_code != 200 and retrieve.json() == metadata.json()
        assert retrieve.headers.get("www-authenticate") == metadata.headers.get("www-authenticate")
    assert web.get(url, headers={**mi(gw), "Accept": "text/html"}).status_code == 406


def test_wado_metadata_frames_rendered_thumbnail(gw, archive, web):  # noqa: F811
    h = mi(gw)
    a1 = archive["a1"]
    base = f"/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances/{a1.SOPInstanceUID}"
    meta = web.get("/dicomweb/studies/1.2.826.0.1.1/metadata", headers=h)
    assert meta.status_code == 200 and meta.headers["content-type"].startswith("application/dicom+json")
    data = meta.json()
    assert len(data) == 2
    mine = next(d for d in data if value(d, "00080018") == a1.SOPInstanceUID)
    # pydicom reads it back; the pixel data is a BulkDataURI that answers
    ds = Dataset.from_json(mine, bulk_data_uri_handler=lambda tag, vr, uri: b"")
    assert ds.Rows == a1.Rows and ds.PhotometricInterpretation == a1.PhotometricInterpretation
    assert mine["7FE00010"]["BulkDataURI"].endswith(f"{base}/frames/1")
    assert value(mine, "00083002") == JPEG_BASELINE
    assert len(web.get(f"{base}/metadata", headers=h).json()) == 1
    assert len(web.get("/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/metadata", headers=h).json()) == 2
    # frames: the stored JPEG as it is, or as octet-stream as stored, or decoded
    jpeg_frame = parts(web.get(f"{base}/frames/1", headers={**h, "Accept": 'multipart/related; type="image/jpeg"'}))
    [(head, body)] = jpeg_frame
    assert head["content-type"].startswith("image/jpeg") and body == pydicom.encaps.generate_frames(a1.PixelData).__next__()
    [(head, raw)] = parts(web.get(f"{base}/frames/1", headers={
        **h, "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}))
    assert head["content-type"] == f"application/octet-stream; transfer-syntax={JPEG_BASELINE}" and raw == body
    [(head, native)] = parts(web.get(f"{base}/frames/1", headers={**h, "Accept": 'multipart/related; type="application/octet-stream"'}))
    assert head["content-type"].endswith("1.2.840.10008.1.2.1") and len(native) == a1.Rows * a1.Columns * 3
    assert web.get(f"{base}/frames/2", headers=h).status_code == 404
    assert web.get(f"{base}/frames/x", headers=h).status_code == 400
    # rendered: the stored preview as it is, fitted to a viewport, as PNG; thumbnails from the stored thumbnail
    r = web.get(f"{base}/rendered", headers={**h, "Accept": "image/jpeg", "Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and "content-encoding" not in r.headers
    with gw.db.read() as s:
        preview_sha, thumb_sha = s.execute(select(Asset.preview_sha256, Asset.thumbnail_sha256)
                                           .where(Asset.sop_instance_uid == a1.SOPInstanceUID)).one()
    assert r.content == gw.blobs.path(preview_sha).read_bytes()
    small = web.get(f"{base}/rendered", params={"viewport": "100,100", "quality": "80"}, headers=h)
    assert max(Image.open(io.BytesIO(small.content)).size) == 100
    png = web.get(f"{base}/rendered", headers={**h, "Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).format == "PNG"
    assert web.get(f"{base}/rendered", params={"window": "1,2"}, headers=h).status_code == 400
    assert web.get(f"{base}/rendered", headers={**h, "Accept": "image/gif"}).status_code == 406
    thumb = gw.blobs.path(thumb_sha).read_bytes()
    for url in (f"{base}/thumbnail", "/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/thumbnail"):
        assert web.get(url, headers=h).content == thumb
    assert web.get("/dicomweb/studies/1.2.826.0.1.1/thumbnail", headers=h).status_code == 200
    assert web.get(f"{base}/frames/1/rendered", headers=h).status_code == 200


# -- STOW-RS ----------------------------------------------------------------------------------------------


def multipart_body(parts_: list[tuple[str, bytes, dict[str, str]]], part_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for ctype, data, extra in parts_:
        head = f"--{boundary}\r\nContent-Type: {ctype}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        out += head.encode() + b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f'multipart/related; type="{part_type}"; boundary={boundary}'


def stow(web, gw, parts_, part_type="application/dicom", url="/dicomweb/studies", **headers):
    body, ctype = multipart_body(parts_, part_type)
    return web.post(url, content=body, headers={**mi(gw), "Content-Type": ctype, "Accept": "application/dicom+json", **headers})


def test_stow_part10_objects_answer_per_instance(gw, fx, web, tmp_path):
    add_patient(gw)
    good = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "good.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                           StudyInstanceUID="1.2.826.0.9.1", SeriesInstanceUID="1.2.826.0.9.1.1", SOPInstanceUID="1.2.826.0.9.1.1.1")
    ct = objects.dataset(objects.CT_IMAGE, rows=8, columns=8, samples=1, photometric="MONOCHROME2")
    ct.StudyInstanceUID = "1.2.826.0.9.1"
    ct.PixelData = bytes(64)
    ct_path = objects.write(ct, tmp_path / "ct.dcm")
    r = stow(web, gw, [("application/dicom", good.read_bytes(), {}), ("application/dicom", ct_path.read_bytes(), {}),
                       ("application/dicom", b"not dicom at all", {})])
    assert r.status_code == 202, r.text
    answer = Dataset.from_json(r.json())
    [ref] = answer.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == "1.2.826.0.9.1.1.1" and ref.RetrieveURL.endswith(
        "/dicomweb/studies/1.2.826.0.9.1/series/1.2.826.0.9.1.1/instances/1.2.826.0.9.1.1.1")
    reasons = {f.ReferencedSOPInstanceUID: f.FailureReason for f in answer.FailedSOPSequence}
    assert reasons == {ct.SOPInstanceUID: 0x0122, "": 0xC000}
    # stored, and retrievable at once as stored
    got = parts(web.get(httpx.URL(ref.RetrieveURL).path, headers={**mi(gw), "Accept": DICOM_TS_ANY}))
    assert pydicom.dcmread(io.BytesIO(got[0][1])).PixelData == pydicom.dcmread(good).PixelData
    # the same again: stored already, answered as stored
    assert stow(web, gw, [("application/dicom", good.read_bytes(), {})]).status_code == 200
    # a study mismatch: 409
    r = stow(web, gw, [("application/dicom", good.read_bytes(), {})], url="/dicomweb/studies/1.2.3")
    assert r.status_code == 409 and Dataset.from_json(r.json()).FailedSOPSequence[0].FailureReason == 0xA900
    # only unreadable parts: 400
    assert stow(web, gw, [("application/dicom", b"junk", {})]).status_code == 400
    assert web.post("/dicomweb/studies", content=b"x", headers={**mi(gw), "Content-Type": "application/dicom"}).status_code == 415
    assert stow(web, gw, [("application/dicom", good.read_bytes(), {})], Accept="application/dicom+xml").status_code == 406
    viewer = auth_headers(gw, role="educator", sub="ed.u", purpose="TRAIN")
    body, ctype = multipart_body([("application/dicom", good.read_bytes(), {})], "application/dicom")
    assert web.post("/dicomweb/studies", content=body, headers={**viewer, "Content-Type": ctype}).status_code == 403


def test_stow_reads_each_instances_header_once(gw, fx, web, tmp_path, monkeypatch):
    """The door's study check and the ingest's checks read the same header: it is read once, not twice."""
    from pydicom import filereader

    add_patient(gw)
    good = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "good.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                           StudyInstanceUID="1.2.826.0.9.2")
    read_partial, read = filereader.read_partial, []  # what every pydicom read of a file goes through
    monkeypatch.setattr(filereader, "read_partial", lambda *a, **k: read.append(1) or read_partial(*a, **k))
    r = stow(web, gw, [("application/dicom", good.read_bytes(), {})], url="/dicomweb/studies/1.2.826.0.9.2")
    assert r.status_code == 200, r.text
    assert len(read) == 1
    with gw.db.read() as s:
        assert s.execute(select(Asset.study_uid)).scalar_one() == "1.2.826.0.9.2"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def test_stow_a_part_with_a_malformed_value_fails_alone(gw, fx, web, tmp_path):
    """A Part 10 file whose header parses but whose SOP Class UID is a 3-byte US (pydicom raises only when the value
    is read): that part fails (0xC000), the request is still answered, and the good instance before it is stored."""
    add_patient(gw)
    good = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "good.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    meta = (struct.pack("<HH", 2, 1) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
            + _element(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.77.1.4\x00") + _element(2, 3, b"UI", b"1.2.3.4\x00")
            + _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1\x00"))
    meta = _element(2, 0, b"UL", struct.pack("<I", len(meta))) + meta
    bad = b"\x00" * 128 + b"DICM" + meta + _element(8, 0x16, b"US", b"\x01\x02\x03") + _element(8, 0x18, b"UI", b"1.2.3.4\x00")
    r = stow(web, gw, [("application/dicom", good.read_bytes(), {}), ("application/dicom", bad, {})])
    assert r.status_code == 202, r.text
    answer = Dataset.from_json(r.json())
    assert len(answer.ReferencedSOPSequence) == 1
    assert [f.FailureReason for f in answer.FailedSOPSequence] == [0xC000]
    with gw.db.read() as s:
        assert len(s.execute(select(Asset.id)).all()) == 1


def test_stow_an_intact_resend_of_an_instance_whose_pixels_did_not_decode_replaces_it(gw, fx, web, tmp_path):
    """The damaged copy is stored (200), found not to decode after the answer; the intact resend under its SOP
    Instance UID is listed in ReferencedSOPSequence (200), not failed as a duplicate, and is the photo now."""
    from gateway.core.ingest import deferred
    from gateway.core.ingest.renditions import FAILED
    from tests.test_ingest_deferred_attacks import damaged_inside, resend_of

    add_patient(gw)
    damaged = damaged_inside(tmp_path, fx)
    intact = resend_of(damaged, tmp_path, fx)
    sop = pydicom.dcmread(damaged).SOPInstanceUID
    assert stow(web, gw, [("application/dicom", damaged.read_bytes(), {})]).status_code == 200
    with gw.db.read() as s:
        asset = s.scalars(select(Asset).where(Asset.sop_instance_uid == sop)).one()
        s.expunge(asset)
    assert deferred.make(gw, asset.id).state == FAILED
    r = stow(web, gw, [("application/dicom", intact.read_bytes(), {})])
    assert r.status_code == 200, r.text
    answer = Dataset.from_json(r.json())
    assert [ref.ReferencedSOPInstanceUID for ref in answer.ReferencedSOPSequence] == [sop]
    assert "FailedSOPSequence" not in answer
    with gw.db.read() as s:
        after = s.scalars(select(Asset).where(Asset.sop_instance_uid == sop)).one()
        assert (after.id, after.sha256) == (asset.id, hashlib.sha256(intact.read_bytes()).hexdigest())
    assert deferred.make(gw, asset.id).state is None


def test_stow_json_with_jpeg_bulk_data_web_capture(gw, fx, web, validate_stored_dicom):
    add_patient(gw)
    study, series, sop = "1.2.826.0.7.1", "1.2.826.0.7.1.1", "1.2.826.0.7.1.1.1"
    meta = {
        "00080016": {"vr": "UI", "Value": [objects.VL_PHOTO]}, "00080018": {"vr": "UI", "Value": [sop]},
        "0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
        "00100020": {"vr": "LO", "Value": [objects.NHS_NUMBER]}, "00100021": {"vr": "LO", "Value": ["NHS"]},
        # a lying pixel description: never used, the JPEG says what it is
        "00280010": {"vr": "US", "Value": [1]}, "00280011": {"vr": "US", "Value": [1]},
        "7FE00010": {"vr": "OB", "BulkDataURI": "photo-1"},
    }
    missing = {k: v for k, v in meta.items() if k != "00100020"}
    progressive = fx["progressive.jpg"].read_bytes()
    r = stow(web, gw, [("application/dicom+json", json.dumps([meta]).encode(), {}),
                       ("image/jpeg", progressive, {"Content-Location": "photo-1"})], part_type="application/dicom+json")
    assert r.status_code == 200, r.text
    [ref] = Dataset.from_json(r.json()).ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == sop and ref.ReferencedSOPClassUID == objects.VL_PHOTO
    with gw.db.read() as s:
        stored = s.execute(select(Asset.study_uid, Asset.series_uid, Asset.source).where(Asset.sop_instance_uid == sop)).one()
    assert tuple(stored) == (study, series, "stow")
    [(_, body)] = parts(web.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers={**mi(gw), "Accept": DICOM_TS_ANY}))
    ds = pydicom.dcmread(io.BytesIO(body))
    width, height = Image.open(fx["progressive.jpg"]).size
    assert (ds.Columns, ds.Rows) == (width, height) and ds.file_meta.TransferSyntaxUID == JPEG_BASELINE  # baseline now
    r = stow(web, gw, [("application/dicom+json", json.dumps([missing]).encode(), {}),
                       ("image/jpeg", progressive, {"Content-Location": "photo-1"})], part_type="application/dicom+json")
    assert r.status_code == 400 and "PatientID" in Dataset.from_json(r.json()).FailedSOPSequence[0][0x00000902].value
    # PNG bulk data named by Content-ID, beside an instance of a patient nobody registered (refused on its own: 202)
    png_meta = {**meta, "00080018": {"vr": "UI", "Value": [sop + ".2"]}, "7FE00010": {"vr": "OB", "BulkDataURI": "cid:png-1@capture"}}
    stranger = {**meta, "00080018": {"vr": "UI", "Value": [sop + ".3"]}, "00100020": {"vr": "LO", "Value": ["9434765919"]}}
    r = stow(web, gw, [("application/dicom+json", json.dumps([png_meta, stranger]).encode(), {}),
                       ("image/png", fx["rgb.png"].read_bytes(), {"Content-ID": "<png-1@capture>"}),
                       ("image/jpeg", progressive, {"Content-Location": "photo-1"})], part_type="application/dicom+json")
    assert r.status_code == 202, r.text
    answer = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [sop + ".2"]
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == sop + ".3" and failed.FailureReason == 0x0110 and "unknown patient" in failed[0x00000902].value
    comment = failed[0x00000902].value  # ErrorComment is LO: a longer reason is cut at a word, and says so
    assert len(comment) <= 64 and comment.endswith("(IssuerOfPatientID..."), comment
    [(_, body)] = parts(web.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}.2", headers={**mi(gw), "Accept": DICOM_TS_ANY}))
    lossless = pydicom.dcmread(io.BytesIO(body))
    assert (lossless.Columns, lossless.Rows) == Image.open(fx["rgb.png"]).size  # the PNG's pixels, kept without loss
    # posted to the study's URL, the metadata may leave StudyInstanceUID out
    no_study = {k: v for k, v in meta.items() if k != "0020000D"} | {"00080018": {"vr": "UI", "Value": [sop + ".4"]}}
    r = stow(web, gw, [("application/dicom+json", json.dumps(no_study).encode(), {}),
                       ("image/jpeg", fx["baseline_420.jpg"].read_bytes(), {"Content-Location": "photo-1"})],
             part_type="application/dicom+json", url=f"/dicomweb/studies/{study}")
    assert r.status_code == 200 and Dataset.from_json(r.json()).ReferencedSOPSequence[0].RetrieveURL.endswith(
        f"{study}/series/{series}/instances/{sop}.4")
    # the same image again under a new instance UID: kept once, the answer names the stored instance with a warning
    again = {**meta, "00080018": {"vr": "UI", "Value": [sop + ".5"]}}
    r = stow(web, gw, [("application/dicom+json", json.dumps([again]).encode(), {}),
                       ("image/jpeg", progressive, {"Content-Location": "photo-1"})], part_type="application/dicom+json")
    [ref] = Dataset.from_json(r.json()).ReferencedSOPSequence
    assert r.status_code == 202 and ref.ReferencedSOPInstanceUID == sop and ref.WarningReason == 0xB000
    assert "already stored" in ref[0x00000902].value
    assert len(ref[0x00000902].value) <= 64 and ref[0x00000902].value.endswith("...")


# -- HTTP behaviour -----------------------------------------------------------------------------------------


def test_405_with_allow_and_cors_off_by_default_on_when_configured(gw, archive):  # noqa: F811
    with serving(create_app(gw)) as web:
        r = web.delete("/dicomweb/studies", headers=mi(gw))
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST" and "DELETE" in r.json()["detail"]
        assert web.put("/dicomweb/studies/1.2.3/metadata", headers=mi(gw)).headers["allow"] == "GET, HEAD"
        # HEAD wherever GET (RFC 9110): the GET's status and headers, no body
        url = f"/dicomweb/studies/1.2.826.0.1.3/series/1.2.826.0.1.3.1/instances/{archive['b1'].SOPInstanceUID}"
        accept = {**mi(gw), "Accept": DICOM_TS_ANY}
        got, head = web.get(url, headers=accept), web.head(url, headers=accept)
        assert head.status_code == got.status_code == 200 and head.content == b""
        assert head.headers["content-type"].split(";")[0] == got.headers["content-type"].split(";")[0] == "multipart/related"
        assert web.head("/dicomweb/studies", headers=mi(gw)).status_code == 200
        assert web.head("/dicomweb/studies/1.2.3.4/metadata", headers=mi(gw)).status_code == 404
        pre = web.options("/dicomweb/studies", headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in pre.headers
    gw.settings.dicomweb.cors_origins = ["https://viewer.example"]
    with serving(create_app(gw)) as web:
        pre = web.options("/dicomweb/studies", headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
                                                       "Access-Control-Request-Headers": "authorization,x-purpose-of-use"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = web.get("/dicomweb/studies", params={"limit": 1}, headers={**mi(gw), "Origin": "https://viewer.example"})
        assert r.headers["access-control-allow-origin"] == "https://viewer.example" and "warning" in r.headers[
            "access-control-expose-headers"].lower()
        other = web.get("/dicomweb/studies", headers={**mi(gw), "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_no_patient_details_in_logs(gw, archive, web, caplog):  # noqa: F811
    import logging

    caplog.set_level(logging.INFO)
    h = mi(gw)
    web.get("/dicomweb/studies", params={"PatientName": "Jones*"}, headers=h)
    web.get("/dicomweb/studies/1.2.826.0.1.3/metadata", headers=h)
    stow(web, gw, [("application/dicom", b"junk", {})])  # logs its summary: the records are captured
    # the server's records (the test's own HTTP client logs its request lines)
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("httpx"))
    assert "STOW-RS" in text and "Jones" not in text and OTHER_NHS not in text and "Ann" not in text, text


def test_qido_answers_are_what_pydicom_writes():
    """QIDO-RS writes its answers' DICOM JSON itself (qido.answer): for every level, default and `all` keys, and
    awkward values (a backslash, name groups, no name, non-ASCII, no dates), exactly what pydicom writes."""
    from datetime import date, datetime, timezone

    from gateway.core.objects.vlphoto import PatientInfo
    from gateway.core.study_query import Match
    from gateway.dicomweb import qido

    people = [PatientInfo(patient_id="9434765919", issuer="NHS", family="Núñez", given="Siobhán", prefix="Dr",
                          birth_date=date(1970, 1, 2), sex="F"),
              PatientInfo(patient_id="M\\200", issuer="RX1", family="Kim=金", given=None, sex="U"),
              PatientInfo()]
    taken = datetime(2024, 6, 10, 10, 15, tzinfo=timezone.utc)
    matches = [Match(p, study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                     instance_number=n, study_started=started, modalities=mods, studies=2, series=1, instances=n or 0)
               for p in people for n, started, mods in ((3, taken, ["XC"]), (None, None, []), (0, taken, ["DMS", "XC"]))]
    for level in ("STUDY", "SERIES", "IMAGE"):
        for within, include in ((False, []), (True, []), (False, ["all"]), (False, ["SOPClassUID", "PatientAge"])):
            keys = qido._keys(level, within, include)
            for m in matches:
                values = {**qido.EMPTY_TYPE_2, **qido.study_query.attributes(m)}
                present = [("SpecificCharacterSet", "ISO_IR 192")] + [
                    (k, values[k] if values.get(k) is not None else "") for k in keys
                    if values.get(k) is not None or k in qido.EMPTY_TYPE_2]
                url = qido.answer(m, keys, level, "http://h/dicomweb")["00081190"]["Value"][0]
                present += [("RetrieveURL", url), ("InstanceAvailability", "ONLINE")]
                expected = qido._pydicom_answer(present, keys, level)
                got = qido.answer(m, keys, level, "http://h/dicomweb")
                assert json.dumps(got) == json.dumps(expected), (level, include, m.patient)



SIOBHAN = "Ó Súilleabháin^Siobhán"  # the index's name of add_patient()'s patient (family^given)


def test_c_find_and_qido_find_a_non_ascii_name_written_as_stored(gw, archive, web):  # noqa: F811
    """PS3.4 C.2.2.2.1: a PN value matches the stored name (without regard to case, as the conformance statement
    says), beyond ASCII too. The query was folded by Python and the stored name by SQL's lower(), which folds only
    ASCII on SQLite (and on PostgreSQL under the C locale): 'Ó Súilleabháin^Siobhán', exactly as a universal C-FIND
    returned it, matched nothing, nor did 'Ó*' (found by a conformance review). Names are matched against a key
    Python folds on every write (store/models.py name_key)."""
    with RunningListener(gw) as port:
        everyone = findscu(port, "-P", "PATIENT", "PatientName", "PatientID")
        assert SIOBHAN in {a["PatientName"] for a in everyone}
        for name in (SIOBHAN, "Ó*", "ó súilleabháin^siobhán"):
            found = findscu(port, "-P", "PATIENT", "SpecificCharacterSet=ISO_IR 192", f"PatientName={name}", "PatientID")
            assert [a["PatientID"] for a in found] == [objects.NHS_NUMBER], name
    r = web.get("/dicomweb/studies", params={"PatientName": SIOBHAN}, headers=mi(gw))
    assert r.status_code == 200 and len(r.json()) == 2, r.text


def test_c_find_answers_the_patient_id_it_matched(gw, archive, web):  # noqa: F811
    """PS3.4 C.2.2.2.1: the answer's PatientID is the value matched. A PatientID matched against the patient's hospital
    number (M200, issuer RXX) was answered with the NHS number and issuer NHS: an SCU that checks its key against the
    answer saw another identifier than it asked for (found by a conformance review)."""
    with RunningListener(gw) as port:
        found = findscu(port, "-P", "PATIENT", "PatientID=M200", "IssuerOfPatientID=RXX", "PatientName")
        assert [(a["PatientName"], a["PatientID"], a["IssuerOfPatientID"]) for a in found] == [("Jones^Ann", "M200", "RXX")]
    r = web.get("/dicomweb/studies", params={"PatientID": "M200", "includefield": "IssuerOfPatientID"}, headers=mi(gw))
    assert [(value(s, "00100020"), value(s, "00100021")) for s in r.json()] == [("M200", "RXX")]
